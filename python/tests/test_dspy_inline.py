"""``execute_program``'s inline handler: a run without a stream of a session's program with
the scripted LM is served at once, without a task, with the result and the errors the
command's task gives; every other run is still a task."""

from __future__ import annotations

import json
from typing import Any, Dict, Iterator, List, Optional

import pytest

pytest.importorskip("dspy")

from bridge_for_tests import Bridge  # noqa: E402
from conftest import LMEnv  # noqa: E402

from snakepool_worker.builtins import register_builtins  # noqa: E402
from snakepool_worker.calls import Call  # noqa: E402
from snakepool_worker.dspy import register_commands  # noqa: E402
from snakepool_worker.registry import Registry  # noqa: E402
from snakepool_worker.runtime import Runtime  # noqa: E402

SCRIPT = {"40 + 2?": {"reasoning": "Forty plus two.", "answer": "42"}}
"""Answers by prompt: as many runs as asked, each the same."""


class Worker:
    """A runtime with the DSPy commands as a worker registers them, whose frame loop
    only records the calls it is given to start as tasks."""

    def __init__(self) -> None:
        registry = Registry()
        register_builtins(registry)
        register_commands(registry)
        self.runtime = Runtime(registry, worker_id="unit")
        self.launched: List[Call] = []
        self._next_id = 0

    def reply(self, command: str, session: Optional[str] = "s1", **args: Any) -> Any:
        self._next_id += 1
        if session is not None:
            args["session_id"] = session
        message = {"id": self._next_id, "command": command, "args": args}
        reply = self.runtime.handle_frame(json.dumps(message).encode())
        return None if reply is None else json.loads(reply)

    def ok(self, command: str, session: Optional[str] = "s1", **args: Any) -> Any:
        reply = self.reply(command, session, **args)
        assert reply["success"] is True, reply
        return reply["result"]

    def serving(self) -> None:
        """From now on, calls that run as tasks are only recorded."""
        self.runtime.attach(self.launched.append)


def set_up(target: Any, session: str = "s1") -> None:
    target.ok("configure_lm", session, provider="dummy", answers=SCRIPT)
    target.ok(
        "create_program", session, signature="question -> answer: int", type="chain_of_thought"
    )


@pytest.fixture
def worker(lm_env: LMEnv) -> Worker:
    worker = Worker()
    set_up(worker)
    worker.serving()
    return worker


@pytest.fixture
def bridge(lm_env: LMEnv) -> Iterator[Bridge]:
    """The same session, whose ``execute_program`` runs the command's task."""
    bridge = Bridge()
    set_up(bridge)
    yield bridge
    bridge.close()


RUN = {"program_id": "prog_1", "inputs": {"question": "40 + 2?"}}


@pytest.mark.parametrize("stream", [None, False])
def test_a_scripted_run_is_served_at_once_with_the_tasks_result(
    worker: Worker, bridge: Bridge, stream: Optional[bool]
) -> None:
    args: Dict[str, Any] = dict(RUN) if stream is None else {**RUN, "stream": stream}
    result = worker.ok("execute_program", **args)
    assert worker.launched == [] and worker.runtime.calls == {}
    assert result == bridge.ok("execute_program", **args)
    assert result["outputs"] == {"answer": 42} and result["reasoning"] == "Forty plus two."


@pytest.mark.parametrize(
    "args",
    [
        {"stream": True},
        {"stream": "yes"},
        {"program": "served"},
    ],
)
def test_other_runs_of_a_scripted_session_are_tasks(worker: Worker, args: Dict[str, Any]) -> None:
    assert worker.reply("execute_program", **{**RUN, **args}) is None
    assert [call.command for call in worker.launched] == ["execute_program"]


def test_runs_in_a_session_without_the_scripted_lm_or_without_a_session_are_tasks(
    worker: Worker,
) -> None:
    worker.ok("create_program", "no-lm", signature="question -> answer")
    assert worker.reply("execute_program", "no-lm", **RUN) is None
    assert worker.reply("execute_program", "new", **RUN) is None
    assert worker.reply("execute_program", None, program="served", inputs={}) is None
    assert len(worker.launched) == 3


@pytest.mark.parametrize(
    "args",
    [
        {"program_id": "prog_9", "inputs": {"question": "q"}},
        {"program_id": "prog_1", "inputs": {}},
        {"program_id": "prog_1", "inputs": {"question": "q", "extra": 1}},
        {"program_id": "prog_1", "inputs": {"question": "q", "config": 1}},
        {"program_id": "prog_1", "inputs": ["q"]},
        {"program_id": "prog_1", "inputs": {"question": "q"}, "spelling": 1},
        {"inputs": {"question": "q"}},
    ],
)
def test_a_scripted_run_fails_as_the_task_would(
    worker: Worker, bridge: Bridge, args: Dict[str, Any]
) -> None:
    error = worker.reply("execute_program", **args)["error"]
    assert worker.launched == []
    assert (error["type"], error["message"]) == bridge.fail("execute_program", **args)
