"""Served programs: saved programs run without a session (``SNAKEPOOL_PROGRAMS``)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

pytest.importorskip("dspy")

from bridge_for_tests import Bridge  # noqa: E402
from conftest import DEFAULT_TIMEOUT, LMEnv, SpawnWorker, worker_env  # noqa: E402
from fake_lm_server import FakeLMServer, chat_reply  # noqa: E402

from snakepool_worker.dspy import PROGRAMS_ENV  # noqa: E402

DEMOS = [
    {"question": "What is the capital of Atlantis?", "answer": "Poseidonia"},
    {"question": "What colour is the sky?", "answer": "blue"},
]


class EchoLMServer(FakeLMServer):
    """Answers ``<prefix>:<the call's question>`` where no other behaviour is set."""

    def _record(self, path: str, headers: Dict[str, str], body: bytes) -> Tuple[int, str, bytes]:
        route = super()._record(path, headers, body)
        prefix = path.strip("/").split("/", 1)[0]
        if prefix in self._routes:
            return route
        messages = json.loads(body)["messages"]
        question = messages[-1]["content"].split("\n")[1]
        fields = {"answer": f"{prefix}:{question}"}
        if "[[ ## reasoning ## ]]" in messages[0]["content"]:
            fields = {"reasoning": "echoed", **fields}
        return 200, "application/json", json.dumps(chat_reply(fields)).encode()

    def prompts(self) -> List[str]:
        """The whole prompt of each request, in order of arrival."""
        return [json.dumps(json.loads(r.body)["messages"]) for r in self.requests]


@pytest.fixture
def server() -> Iterator[EchoLMServer]:
    fake = EchoLMServer()
    yield fake
    fake.close()


@pytest.fixture
def env(lm_env: LMEnv, server: EchoLMServer) -> LMEnv:
    lm_env.set("SP_TEST_PROFILE_KEY", "sk-test")
    lm_env.profiles({"mini": profile(server, "m"), "other": profile(server, "o")})
    return lm_env


@pytest.fixture
def bridge(env: LMEnv) -> Iterator[Bridge]:
    bridge = Bridge()
    yield bridge
    bridge.close()


def profile(server: FakeLMServer, prefix: str) -> Dict[str, Any]:
    return {
        "model": "openai/test-model",
        "api_base": server.base(prefix),
        "api_key_env": "SP_TEST_PROFILE_KEY",
        "num_retries": 0,
    }


def saved_program(bridge: Bridge, path: Path, program_type: str = "predict") -> Dict[str, Any]:
    """Create a program with demos in a session and save what dump_program_state returns."""
    program_id = bridge.ok(
        "create_program",
        "author",
        signature="question -> answer",
        type=program_type,
        demos=[
            {**demo, "reasoning": "known"} if program_type != "predict" else demo for demo in DEMOS
        ],
    )["program_id"]
    dumped: Dict[str, Any] = bridge.ok("dump_program_state", "author", program_id=program_id)
    path.write_text(json.dumps(dumped))
    return dumped


def serve(env: LMEnv, **programs: Tuple[Path, str]) -> None:
    env.set(
        PROGRAMS_ENV,
        json.dumps(
            {name: {"path": str(path), "profile": p} for name, (path, p) in programs.items()}
        ),
    )


def run(bridge: Bridge, name: str, question: str) -> Dict[str, Any]:
    return bridge.reply("execute_program", None, program=name, inputs={"question": question})


def test_dump_program_state_is_a_servable_file(
    bridge: Bridge, env: LMEnv, server: EchoLMServer, tmp_path: Path
) -> None:
    dumped = saved_program(bridge, tmp_path / "qa.json")
    assert dumped["type"] == "predict"
    assert [f["name"] for f in dumped["signature"]["inputs"]] == ["question"]
    saved_program(bridge, tmp_path / "cot.json", "chain_of_thought")
    serve(env, qa=(tmp_path / "qa.json", "mini"), cot=(tmp_path / "cot.json", "other"))
    reply = run(bridge, "qa", "Who wrote it?")
    assert reply["success"] is True, reply
    assert reply["result"]["outputs"] == {"answer": "m:Who wrote it?"}
    assert set(reply["result"]["usage"]) == {"openai/test-model"}
    # The saved demos reach the LM: the program is the one that was saved.
    assert "Poseidonia" in server.prompts()[-1]
    cot = run(bridge, "cot", "Why?")
    assert cot["result"]["outputs"] == {"answer": "o:Why?"}, cot
    assert cot["result"]["reasoning"] == "echoed"
    assert server.count("o") == 1
    # Plain calls: nothing was stored in a session.
    assert set(bridge.runtime.sessions) == {"author"}


def test_dspy_save_json_is_served_inside_a_file_that_gives_its_signature(
    bridge: Bridge, env: LMEnv, server: EchoLMServer, tmp_path: Path
) -> None:
    import dspy

    module = dspy.ChainOfThought("question -> answer")
    module.predict.demos = [dspy.Example(**DEMOS[0], reasoning="known")]
    module.save(str(tmp_path / "dspy.json"))
    saved = json.loads((tmp_path / "dspy.json").read_text())
    assert "metadata" in saved
    wrapped = {"signature": "question -> answer", "type": "chain_of_thought", "state": saved}
    (tmp_path / "wrapped.json").write_text(json.dumps(wrapped))
    serve(env, wrapped=(tmp_path / "wrapped.json", "mini"), bare=(tmp_path / "dspy.json", "mini"))
    reply = run(bridge, "wrapped", "Why?")
    assert reply["result"]["outputs"] == {"answer": "m:Why?"}, reply
    assert "Poseidonia" in server.prompts()[-1]
    # DSPy's file alone names no fields or types: refused, saying how to wrap it.
    error = run(bridge, "bare", "Why?")["error"]
    assert error["type"] == "ServedProgramInvalid"
    assert error["message"].startswith(f"served program 'bare' ({tmp_path / 'dspy.json'}): ")
    assert "carries no signature" in error["message"] and '"state": <its JSON>' in error["message"]


def test_served_programs_are_plain_calls_and_unknown_names_list_the_known(
    bridge: Bridge, env: LMEnv, server: EchoLMServer, tmp_path: Path
) -> None:
    saved_program(bridge, tmp_path / "qa.json")
    kind, message = bridge.fail("execute_program", None, program="qa", inputs={})
    assert (kind, message) == (
        "ProgramNotFound",
        "no served program 'qa' (this worker serves none (the operator serves saved programs "
        "with `snakepool serve --program NAME=PATH`); a session's programs are run with "
        "args.program_id)",
    )
    serve(env, qa=(tmp_path / "qa.json", "mini"), b=(tmp_path / "qa.json", "mini"))
    kind, message = bridge.fail("execute_program", None, program="nope", inputs={})
    assert (kind, message) == (
        "ProgramNotFound",
        "no served program 'nope' (served programs: b, qa)",
    )
    kind, message = bridge.fail("execute_program", "s1", program="qa", inputs={"question": "q"})
    assert (
        kind == "InvalidArgument"
        and "in a session, run the session's programs with " "args.program_id" in message
    )
    kind, message = bridge.fail("execute_program", None, program="qa", program_id="prog_1")
    assert kind == "InvalidArgument" and "unknown argument(s) 'program_id'" in message
    assert bridge.fail("execute_program", None, program="qa", inputs={})[0] == "MissingInput"
    assert server.count() == 0


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "the file does not exist"),
        ("not json", "the file cannot be read as JSON"),
        ("[]", "the file must hold a JSON object"),
        ({"signature": "question -> answer", "extra": 1}, "unknown key(s) 'extra'"),
        ({"signature": "question ->"}, "has no output fields"),
        ({"signature": "question -> answer", "type": "react"}, "unknown program type 'react'"),
        (
            {"signature": "a, b -> c", "state": "STATE"},
            "the state comes from a different signature",
        ),
    ],
)
def test_a_bad_file_fails_its_calls_only_and_names_program_and_path(
    bridge: Bridge, env: LMEnv, server: EchoLMServer, tmp_path: Path, content: Any, fragment: str
) -> None:
    good = tmp_path / "good.json"
    state = saved_program(bridge, good)["state"]
    bad = tmp_path / "bad.json"
    if isinstance(content, dict):
        content = json.dumps({k: state if v == "STATE" else v for k, v in content.items()})
    if content is not None:
        bad.write_text(content)
    serve(env, bad=(bad, "mini"), good=(good, "mini"))
    for _ in range(2):
        kind, message = bridge.fail("execute_program", None, program="bad", inputs={})
        assert kind == "ServedProgramInvalid"
        assert (
            message.startswith(f"served program 'bad' ({bad}): ") and fragment in message
        ), message
    assert run(bridge, "good", "q")["result"]["outputs"] == {"answer": "m:q"}


def test_unknown_profile_or_entry_fails_at_first_use_naming_program_and_path(
    bridge: Bridge, env: LMEnv, server: EchoLMServer, tmp_path: Path
) -> None:
    saved_program(bridge, tmp_path / "qa.json")
    env.set(
        PROGRAMS_ENV,
        json.dumps(
            {
                "qa": {"path": str(tmp_path / "qa.json"), "profile": "gone"},
                "rel": {"path": "qa.json", "profile": "mini"},
                "a/b": {"path": str(tmp_path / "qa.json"), "profile": "mini"},
                "ok": {"path": str(tmp_path / "qa.json"), "profile": "mini"},
            }
        ),
    )
    kind, message = bridge.fail("execute_program", None, program="qa", inputs={"question": "q"})
    assert kind == "LMProfileNotFound"
    assert message == (
        f"served program 'qa' ({tmp_path / 'qa.json'}) runs with LM profile 'gone', which is "
        "not defined; profiles: mini, other"
    )
    kind, message = bridge.fail("execute_program", None, program="rel", inputs={"question": "q"})
    assert kind == "ServedProgramInvalid" and "must be an absolute file path" in message
    kind, message = bridge.fail("execute_program", None, program="a/b", inputs={"question": "q"})
    assert kind == "ServedProgramInvalid" and "the name is not usable" in message
    assert run(bridge, "ok", "q")["success"] is True
    env.set(PROGRAMS_ENV, "{not json")
    kind, message = bridge.fail("execute_program", None, program="ok", inputs={"question": "q"})
    assert kind == "ServedProgramInvalid" and f"{PROGRAMS_ENV} is not valid JSON" in message


def test_served_programs_are_read_only_and_calls_do_not_meet(
    bridge: Bridge, env: LMEnv, server: EchoLMServer, tmp_path: Path
) -> None:
    from snakepool_worker.dspy.programs import dump_state
    from snakepool_worker.dspy.served import find_served

    saved_program(bridge, tmp_path / "qa.json")
    serve(env, qa=(tmp_path / "qa.json", "mini"))
    program = find_served("qa")[1]
    before = dump_state(program)
    # Nothing a client sends reaches the program's options: demos, config, lm ... are refused.
    for name in ("demos", "config", "lm", "signature"):
        reply = bridge.reply(
            "execute_program", None, program="qa", inputs={"question": "q", name: [{"x": 1}]}
        )
        assert reply["error"]["type"] == "ReservedFieldName", reply
    questions = [f"secret-{i}" for i in range(6)]

    async def main() -> List[Dict[str, Any]]:
        calls = (
            bridge.areply("execute_program", None, program="qa", inputs={"question": q})
            for q in questions
        )
        return list(await asyncio.gather(*calls))

    replies = asyncio.run(main())
    assert [r["result"]["outputs"]["answer"] for r in replies] == [f"m:{q}" for q in questions]
    # Each prompt holds the saved demos and its own question, never another call's.
    for prompt in server.prompts():
        assert "Poseidonia" in prompt
        assert sum(q in prompt for q in questions) == 1, prompt
    assert dump_state(program) == before
    assert program.module.history == [] and find_served("qa")[1] is program
    import dspy

    assert not any(entry[0] is program.module for entry in dspy.settings.trace)


LOAD_AT_IMPORT = """
import json, os, sys, threading
import snakepool_worker.dspy as bridge
from snakepool_worker.dspy import served
loaded = served._loaded
print(json.dumps({
    "dspy": "dspy" in sys.modules,
    "loaded": sorted(loaded[1]) if loaded else None,
    "errors": {name: s.error for name, s in loaded[1].items()} if loaded else None,
    "threads": threading.active_count(),
    "tasks": len(os.listdir("/proc/self/task")),
}))
"""


def test_programs_load_at_import_without_threads(
    bridge: Bridge, server: EchoLMServer, tmp_path: Path
) -> None:
    saved_program(bridge, tmp_path / "qa.json")
    (tmp_path / "bad.json").write_text("{")
    programs = {
        "qa": {"path": str(tmp_path / "qa.json"), "profile": "mini"},
        "bad": {"path": str(tmp_path / "bad.json"), "profile": "mini"},
    }
    env = worker_env({PROGRAMS_ENV: json.dumps(programs)})
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AT_IMPORT],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEFAULT_TIMEOUT * 3,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["dspy"] is True and found["loaded"] == ["bad", "qa"]
    assert found["errors"]["qa"] is None and "cannot be read as JSON" in found["errors"]["bad"]
    # Safe to fork: loading started no thread (Python's or native).
    assert (found["threads"], found["tasks"]) == (1, 1)
    assert f"served program 'bad' ({tmp_path / 'bad.json'})" in done.stderr


def test_a_worker_with_a_bad_served_program_keeps_serving(
    spawn_worker: SpawnWorker, server: EchoLMServer, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.json"
    env = {PROGRAMS_ENV: json.dumps({"gone": {"path": str(missing), "profile": "mini"}})}
    worker = spawn_worker(default_modules=True, env=env)
    worker.handshake()
    worker.stderr.wait_for(f"served program 'gone' ({missing}): the file does not exist")
    assert worker.result("add", {"a": 1, "b": 2}) == 3
