"""``execute_program`` as an async command: many runs overlap on one event loop.

Each test drives the handlers with ``asyncio.gather`` on one loop against dummy LMs and
an OpenAI-compatible server on 127.0.0.1 that holds its answers until a condition is
met, so the calls are provably in flight together; nothing here measures time.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Tuple

import pytest

pytest.importorskip("dspy")

from bridge_for_tests import Bridge  # noqa: E402
from conftest import DEFAULT_TIMEOUT, LMEnv  # noqa: E402
from fake_lm_server import FakeLMServer, chat_reply  # noqa: E402

import dspy  # noqa: E402
from snakepool_worker import dspy as bridge_module  # noqa: E402
from snakepool_worker.dspy.failures import exhausted_script  # noqa: E402

MODEL = "openai/test-model"
ONE_CALL = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
"""The usage the fake server reports for one call."""

_QUESTION = re.compile(r"\[\[ ## question ## \]\]\n(.*?)\n")


class HeldLMServer(FakeLMServer):
    """The fake server, holding each request until ``hold``'s condition is met.

    An endpoint given no behaviour (``answer``, ``fail`` ...) answers
    ``<prefix><n>:<question>``, n counting that endpoint's requests.
    """

    def __init__(self) -> None:
        super().__init__()
        # http.server listens with a backlog of 5: room for every call held at once.
        self._server.socket.listen(64)
        self._release: Callable[["HeldLMServer"], bool] = lambda server: True
        self._released = threading.Condition()
        self._serial: Dict[str, int] = {}

    def hold(self, release: Callable[["HeldLMServer"], bool]) -> None:
        """Hold each request until ``release(server)`` is true (checked on every arrival)."""
        self._release = release

    def hold_until_set(self, event: threading.Event) -> None:
        self.hold(lambda server: event.is_set())

    def hold_until_count(self, count: int) -> None:
        """Hold each request until ``count`` requests have arrived in all."""
        self.hold(lambda server: len(server.requests) >= count)

    def recheck(self) -> None:
        """Wake the held requests to look at their condition again."""
        with self._released:
            self._released.notify_all()

    def _record(self, path: str, headers: Dict[str, str], body: bytes) -> Tuple[int, str, bytes]:
        route = super()._record(path, headers, body)
        prefix = path.strip("/").split("/", 1)[0]
        with self._released:
            self._serial[prefix] = serial = self._serial.get(prefix, 0) + 1
            self._released.notify_all()
            if not self._released.wait_for(lambda: self._release(self), DEFAULT_TIMEOUT):
                return 503, "text/plain", b"never released"
        if prefix in self._routes:
            return route
        messages = json.loads(body)["messages"]
        found = _QUESTION.search(messages[-1]["content"])
        question = found.group(1) if found else "?"
        reply = chat_reply({"answer": f"{prefix}{serial}:{question}"})
        return 200, "application/json", json.dumps(reply).encode()


@pytest.fixture
def server() -> Iterator[HeldLMServer]:
    fake = HeldLMServer()
    yield fake
    fake.recheck()
    fake.close()


@pytest.fixture
def env(lm_env: LMEnv) -> LMEnv:
    lm_env.set("SP_TEST_PROFILE_KEY", "sk-test")
    return lm_env


@pytest.fixture
def bridge(env: LMEnv) -> Iterator[Bridge]:
    bridge = Bridge()
    yield bridge
    bridge.close()


def profile(server: FakeLMServer, prefix: str, **extra: Any) -> Dict[str, Any]:
    settings: Dict[str, Any] = {
        "model": MODEL,
        "api_base": server.base(prefix),
        "api_key_env": "SP_TEST_PROFILE_KEY",
        "num_retries": 0,
    }
    settings.update(extra)
    return settings


def program(bridge: Bridge, session: str, signature: str = "question -> answer") -> str:
    program_id: str = bridge.ok("create_program", session, signature=signature)["program_id"]
    return program_id


def ask(bridge: Bridge, session: str, question: str) -> Awaitable[Dict[str, Any]]:
    return bridge.areply(
        "execute_program", session, program_id="prog_1", inputs={"question": question}
    )


def answer(reply: Dict[str, Any]) -> str:
    assert reply["success"] is True, reply
    text: str = reply["result"]["outputs"]["answer"]
    return text


def history_lengths() -> Tuple[int, int]:
    """DSPy's process-wide LM history and predictor trace."""
    from dspy.clients.base_lm import GLOBAL_HISTORY

    return len(GLOBAL_HISTORY), len(dspy.settings.trace)


async def released_after(
    waits: List["asyncio.Task[Any]"], server: HeldLMServer, count: int, event: threading.Event
) -> None:
    """Once ``waits`` are done and ``count`` requests are held at ``server``, release them."""
    await asyncio.gather(*waits)
    await asyncio.to_thread(server.wait_for, count)
    event.set()
    server.recheck()


def test_three_sessions_overlap_on_one_loop_and_keep_to_themselves(
    bridge: Bridge, env: LMEnv, server: HeldLMServer
) -> None:
    questions = {label: [f"{label}-{i:02}" for i in range(1, 11)] for label in "abc"}
    for label in "ab":
        script = {q: {"answer": f"{label.upper()}:{q}"} for q in questions[label]}
        bridge.ok("configure_lm", label, provider="dummy", answers=script)
        program(bridge, label)
    env.profiles({"pc": profile(server, "c", cache=True)})
    bridge.ok("configure_lm", "c", profile="pc")
    program(bridge, "c")
    before = history_lengths()
    event = threading.Event()
    server.hold_until_set(event)

    async def main() -> Dict[str, List[Dict[str, Any]]]:
        tasks: Dict[str, List["asyncio.Task[Dict[str, Any]]"]] = {"a": [], "b": [], "c": []}
        for i in range(10):
            for label in "abc":
                task = asyncio.ensure_future(ask(bridge, label, questions[label][i]))
                tasks[label].append(task)
        # The dummies answer while all ten calls of session c wait at the server.
        await released_after(tasks["a"] + tasks["b"], server, 10, event)
        return {label: list(await asyncio.gather(*tasks[label])) for label in "abc"}

    replies = asyncio.run(main())
    assert [answer(r) for r in replies["a"]] == [f"A:{q}" for q in questions["a"]]
    assert [answer(r) for r in replies["b"]] == [f"B:{q}" for q in questions["b"]]
    got = [answer(r) for r in replies["c"]]
    assert [text.split(":", 1)[1] for text in got] == questions["c"]
    assert sorted(text.split(":", 1)[0] for text in got) == sorted(f"c{n}" for n in range(1, 11))
    # Usage is each call's own: one LM call's tokens, under the session's own model.
    for label in "ab":
        assert all(set(r["result"]["usage"]) == {"dummy"} for r in replies[label])
    for reply in replies["c"]:
        usage = reply["result"]["usage"]
        assert set(usage) == {MODEL}
        assert {key: usage[MODEL][key] for key in ONE_CALL} == ONE_CALL
    # No history anywhere: not DSPy's process-wide one, not the LMs', not the programs'.
    assert history_lengths() == before
    for label in "abc":
        state = bridge.state(label)
        assert state.lm.history == []
        module = state.programs["prog_1"].module
        assert module.history == [] and all(p.history == [] for _, p in module.named_predictors())

    # Session c's profile caches: asked again, all at once, the server hears nothing new,
    # and the cached answers are exactly the first ones (no usage: no LM call was made).
    async def again() -> List[Dict[str, Any]]:
        return list(await asyncio.gather(*(ask(bridge, "c", q) for q in questions["c"])))

    cached = asyncio.run(again())
    assert server.count("c") == 10
    assert [answer(r) for r in cached] == got
    assert all(r["result"]["usage"] is None for r in cached)


def test_a_cached_profile_never_answers_for_another_while_calls_overlap(
    bridge: Bridge, env: LMEnv, server: HeldLMServer
) -> None:
    # Same model, same prompt: "pc" and "pu" share an endpoint, "pc" and "pd" both cache.
    env.profiles(
        {
            "pc": profile(server, "c", cache=True),
            "pu": profile(server, "c"),
            "pd": profile(server, "d", cache=True),
        }
    )
    for session, name in (("cached", "pc"), ("uncached", "pu"), ("other", "pd")):
        bridge.ok("configure_lm", session, profile=name)
        program(bridge, session)
    question = "the same question"
    first = bridge.ok(
        "execute_program", "cached", program_id="prog_1", inputs={"question": question}
    )
    assert first["outputs"]["answer"] == f"c1:{question}"
    event = threading.Event()
    server.hold_until_set(event)

    async def main() -> Dict[str, List[Dict[str, Any]]]:
        tasks: Dict[str, List["asyncio.Task[Dict[str, Any]]"]] = {}
        for _ in range(5):
            for session in ("cached", "uncached", "other"):
                task = asyncio.ensure_future(ask(bridge, session, question))
                tasks.setdefault(session, []).append(task)
        # "cached" is answered from its cache while the ten others wait at the server.
        await released_after(tasks["cached"], server, 1 + 10, event)
        return {name: list(await asyncio.gather(*found)) for name, found in tasks.items()}

    replies = asyncio.run(main())
    assert [answer(r) for r in replies["cached"]] == [f"c1:{question}"] * 5
    uncached = [answer(r) for r in replies["uncached"]]
    assert sorted(uncached) == sorted(f"c{n}:{question}" for n in range(2, 7)), uncached
    other = [answer(r) for r in replies["other"]]
    assert sorted(other) == sorted(f"d{n}:{question}" for n in range(1, 6)), other
    assert (server.count("c"), server.count("d")) == (6, 5)
    # Afterwards each cached profile answers from its own cache; the other one never does.
    again = bridge.ok(
        "execute_program", "other", program_id="prog_1", inputs={"question": question}
    )
    assert again["outputs"]["answer"] in other and server.count("d") == 5
    bridge.ok("execute_program", "uncached", program_id="prog_1", inputs={"question": question})
    assert server.count("c") == 7
    assert vars(dspy)["cache"] is bridge_module.NO_STORE


def test_twenty_calls_are_in_flight_at_once(
    bridge: Bridge, env: LMEnv, server: HeldLMServer
) -> None:
    env.profiles({"pb": profile(server, "b")})
    sessions = [f"s{i:02}" for i in range(20)]
    for session in sessions:
        bridge.ok("configure_lm", session, profile="pb")
        program(bridge, session)
    # No request is answered before all twenty have arrived.
    server.hold_until_count(20)

    async def main() -> List[Dict[str, Any]]:
        return list(await asyncio.gather(*(ask(bridge, s, f"q-{s}") for s in sessions)))

    replies = asyncio.run(main())
    assert [answer(r).split(":", 1)[1] for r in replies] == [f"q-{s}" for s in sessions]
    assert server.count("b") == 20


def test_errors_keep_their_types_when_calls_overlap(
    bridge: Bridge, env: LMEnv, server: HeldLMServer
) -> None:
    marker = "INTERNAL-BODY-MARKER"
    server.fail("down", 500, marker)
    env.profiles({"down": profile(server, "down"), "up": profile(server, "b")})
    bridge.ok("configure_lm", "down", profile="down")
    bridge.ok("configure_lm", "up", profile="up")
    bridge.ok("configure_lm", "used-up", provider="dummy", answers=[{"answer": "once"}])
    bridge.ok("configure_lm", "unparsable", provider="dummy", answers=[{"other": "x"}])
    for session in ("down", "up", "used-up", "unparsable"):
        program(bridge, session)
    bridge.ok("execute_program", "used-up", program_id="prog_1", inputs={"question": "q"})
    # The two calls that reach the server are held there until both have arrived.
    server.hold_until_count(2)

    async def main() -> List[Dict[str, Any]]:
        return list(
            await asyncio.gather(
                *(ask(bridge, s, "q") for s in ("down", "used-up", "unparsable", "up"))
            )
        )

    down, used_up, unparsable, up = asyncio.run(main())
    assert down["error"]["type"] == "LMCallFailed"
    assert down["error"]["message"].startswith(
        f"LM call failed (profile 'down', model '{MODEL}'): HTTP 500 from the provider ("
    )
    assert marker not in json.dumps(down)
    assert used_up["error"]["type"] == "DummyAnswersExhausted"
    assert unparsable["error"]["type"] == "AdapterParseError"
    assert answer(up) == "b1:q"


def test_a_configured_global_cache_does_not_replace_the_runs_own(
    bridge: Bridge, env: LMEnv, server: HeldLMServer
) -> None:
    env.profiles({"pu": profile(server, "c")})
    bridge.ok("configure_lm", profile="pu")
    program(bridge, "s1")
    router = bridge_module.NO_STORE
    outside = router.outside
    try:
        dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
        configured = vars(dspy)["cache"]
        assert configured is not router
        for _ in range(2):
            bridge.ok("execute_program", program_id="prog_1", inputs={"question": "q"})
        # The uncached profile reached its endpoint both times, with the router back in place;
        # outside program runs the configured cache is still the one in use.
        assert server.count("c") == 2
        assert vars(dspy)["cache"] is router and router.current() is configured
    finally:
        with dspy._cache_lock:
            vars(dspy)["cache"] = router
        router.outside = outside


def test_the_scripted_lm_answers_acall_and_aforward_from_one_script(bridge: Bridge) -> None:
    bridge.ok("configure_lm", provider="dummy", answers=[{"answer": "one"}, {"answer": "two"}])
    lm = bridge.state().lm

    async def main() -> Tuple[Any, Any, BaseException]:
        first = await lm.acall("q")
        second = await lm.aforward(prompt="q")
        with pytest.raises(Exception) as raised:
            await lm.acall("q")
        return first, second, raised.value

    first, second, error = asyncio.run(main())
    assert "one" in first[0] and "two" in second.choices[0].message.content
    assert isinstance(exhausted_script(error), bridge_module.DummyAnswersExhausted)
