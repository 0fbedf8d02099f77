"""Inline handlers: the calls of a concurrent command that have nothing to wait for are
served at once, without a task; every other call runs as a task, as without one."""

from __future__ import annotations

import contextvars
import json
from typing import Any, Dict, List

import pytest

from snakepool_worker import Context
from snakepool_worker.calls import Call
from snakepool_worker.registry import RUN_AS_TASK, Registry
from snakepool_worker.runtime import Runtime

seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="outside")


async def work(args: Dict[str, Any], ctx: Context) -> Dict[str, str]:
    return {"by": "task"}


def work_inline(args: Dict[str, Any], ctx: Context) -> Any:
    seen.set("inline")
    if args.get("fail"):
        raise KeyError("nope")
    return {"by": "inline", "seen": seen.get()} if args.get("quick") else RUN_AS_TASK


def work_runtime(max_concurrency: int = 32) -> Runtime:
    registry = Registry()
    registry.register("work", work, inline=work_inline)
    return Runtime(registry, worker_id="unit", max_concurrency=max_concurrency)


def handle(runtime: Runtime, request_id: int, command: str, **args: Any) -> Any:
    message = {"id": request_id, "command": command, "args": args}
    reply = runtime.handle_frame(json.dumps(message).encode())
    return None if reply is None else json.loads(reply)


def test_a_call_the_inline_handler_answers_starts_no_task() -> None:
    runtime = work_runtime()
    launched: List[Call] = []
    runtime.attach(launched.append)
    reply = handle(runtime, 1, "work", quick=True)
    assert reply == {"id": 1, "success": True, "result": {"by": "inline", "seen": "inline"}}
    assert launched == [] and runtime.calls == {}


def test_a_call_the_inline_handler_hands_back_runs_as_a_task() -> None:
    runtime = work_runtime()
    launched: List[Call] = []
    runtime.attach(launched.append)
    assert handle(runtime, 1, "work") is None
    assert [call.request_id for call in launched] == [1] and list(runtime.calls) == [1]
    runtime.attach(None)
    runtime.calls.clear()
    assert handle(runtime, 2, "work") == {"id": 2, "success": True, "result": {"by": "task"}}


def test_an_inline_handler_runs_in_a_copy_of_the_context() -> None:
    runtime = work_runtime()
    assert handle(runtime, 1, "work", quick=True)["result"]["seen"] == "inline"
    assert seen.get() == "outside"


def test_an_inline_handler_that_raises_fails_the_call_with_its_traceback() -> None:
    error = handle(work_runtime(), 1, "work", fail=True)["error"]
    assert (error["type"], error["message"]) == ("KeyError", "'nope'")
    assert "in work_inline" in error["traceback"]
    assert "_serve_inline" not in error["traceback"]


def test_at_max_concurrency_a_call_is_refused_though_it_could_run_inline() -> None:
    runtime = work_runtime(max_concurrency=1)
    launched: List[Call] = []
    runtime.attach(launched.append)
    assert handle(runtime, 1, "work") is None
    reply = handle(runtime, 2, "work", quick=True)
    assert reply["error"]["type"] == "Overloaded"
    assert [call.request_id for call in launched] == [1]


def test_an_inline_handler_is_checked_when_registered() -> None:
    registry = Registry()

    def plain(args: Dict[str, Any], ctx: Context) -> int:
        return 1

    async def not_plain(args: Dict[str, Any], ctx: Context) -> int:
        return 1

    with pytest.raises(ValueError, match="only a handler that runs as a task"):
        registry.register("plain", plain, inline=plain)
    with pytest.raises(TypeError, match="must be a plain function"):
        registry.register("async_inline", work, inline=not_plain)
    with pytest.raises(TypeError, match="must be a plain function"):
        registry.register("not_callable", work, inline=42)  # type: ignore[arg-type]
    spec = registry.register("work", work, inline=work_inline)
    assert spec.inline is work_inline
    assert spec.describe() == {"mutates_session": False, "doc": "", "concurrent": True}
