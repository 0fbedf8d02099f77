"""A worker runtime with the DSPy commands, driven in-process frame by frame.

``async def`` handlers run on an event loop the bridge owns (an async generator handler,
``execute_program``, as one: its chunks dropped, its ``Final`` value the result): the
frame-by-frame helpers (``ok``, ``fail`` ...) run each call to completion on it, and the
``a``-prefixed helpers (``aok``, ``areply`` ...) are coroutines for tests that overlap
calls on an event loop of their own.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import weakref
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from snakepool_worker.builtins import register_builtins
from snakepool_worker.dspy import COMMANDS, STATE_KEY, SessionState, register_session_hooks
from snakepool_worker.dspy.schemas import ARGS_SCHEMAS
from snakepool_worker.registry import Context, Final, Registry
from snakepool_worker.runtime import Runtime

AsyncHandler = Callable[[Dict[str, Any], Context], Awaitable[Any]]


def _final_result(func: Callable[..., Any]) -> AsyncHandler:
    """An async generator handler as an ``async def`` one: its chunks are dropped, and its
    result is the value of the ``Final`` it yields (``None`` without one)."""

    @functools.wraps(func)
    async def handler(args: Dict[str, Any], ctx: Context) -> Any:
        stream = func(args, ctx)
        try:
            async for value in stream:
                if type(value) is Final:
                    return value.value
            return None
        finally:
            await stream.aclose()

    return handler


class Bridge:
    """A fresh worker runtime with the DSPy commands, driven frame by frame."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        weakref.finalize(self, self._loop.close)
        self._async: Dict[str, AsyncHandler] = {}
        registry = Registry()
        register_builtins(registry)
        for name, func, mutates_session in COMMANDS:
            if inspect.isasyncgenfunction(func):
                func = _final_result(func)
            if inspect.iscoroutinefunction(func):
                self._async[name] = func
                func = self._blocking(func)
            registry.register(
                name, func, mutates_session=mutates_session, args_schema=ARGS_SCHEMAS[name]
            )
        register_session_hooks(registry)
        self.runtime = Runtime(registry, worker_id="unit")
        self._next_id = 0

    def _blocking(self, func: AsyncHandler) -> Callable[[Dict[str, Any], Context], Any]:
        """``func`` as a plain handler: each call runs to completion on the bridge's loop."""

        @functools.wraps(func)
        def handler(args: Dict[str, Any], ctx: Context) -> Any:
            return self._loop.run_until_complete(func(args, ctx))

        return handler

    def close(self) -> None:
        """Close the bridge's event loop (also done when the bridge is collected)."""
        self._loop.close()

    def _request(self, command: str, session: Optional[str], args: Dict[str, Any]) -> Any:
        self._next_id += 1
        if session is not None:
            args["session_id"] = session
        return {"id": self._next_id, "command": command, "args": args}

    def raw(self, command: str, session: Optional[str] = "s1", **args: Any) -> bytes:
        request = self._request(command, session, args)
        reply = self.runtime.handle_frame(json.dumps(request).encode())
        assert reply is not None
        return reply

    def reply(self, command: str, session: Optional[str] = "s1", **args: Any) -> Dict[str, Any]:
        reply: Dict[str, Any] = json.loads(self.raw(command, session, **args))
        return reply

    def ok(self, command: str, session: Optional[str] = "s1", **args: Any) -> Any:
        reply = self.reply(command, session, **args)
        assert reply["success"] is True, reply["error"]
        return reply["result"]

    def error(self, command: str, session: Optional[str] = "s1", **args: Any) -> Dict[str, Any]:
        """The whole ``error`` object (type, message, traceback) of a failing call."""
        reply = self.reply(command, session, **args)
        assert reply["success"] is False, reply
        error: Dict[str, Any] = reply["error"]
        return error

    def fail(self, command: str, session: Optional[str] = "s1", **args: Any) -> Tuple[str, str]:
        error = self.error(command, session, **args)
        return error["type"], error["message"]

    # -- async commands, awaited on the caller's event loop ---------------------------------

    async def areply(
        self, command: str, session: Optional[str] = "s1", **args: Any
    ) -> Dict[str, Any]:
        """Await an ``async`` command's handler in the calling task; a reply as ``reply``.

        The arguments and the result go through JSON, as on the wire.
        """
        request = json.loads(json.dumps(self._request(command, session, args)))
        args = request["args"]
        runtime = self.runtime
        spec = runtime.registry.get(command)
        assert spec is not None and command in self._async, f"{command!r} is not async"
        ctx = Context(
            runtime.worker_id,
            args.get("session_id"),
            spec.log,
            request["id"],
            command,
            runtime.sessions,
            runtime,
        )
        try:
            result = await self._async[command](args, ctx)
        except Exception as exc:
            return {
                "id": request["id"],
                "success": False,
                "error": {"type": type(exc).__name__, "message": str(exc)},
            }
        return {"id": request["id"], "success": True, "result": json.loads(json.dumps(result))}

    async def aok(self, command: str, session: Optional[str] = "s1", **args: Any) -> Any:
        reply = await self.areply(command, session, **args)
        assert reply["success"] is True, reply["error"]
        return reply["result"]

    async def afail(
        self, command: str, session: Optional[str] = "s1", **args: Any
    ) -> Tuple[str, str]:
        reply = await self.areply(command, session, **args)
        assert reply["success"] is False, reply
        return reply["error"]["type"], reply["error"]["message"]

    def state(self, session: str = "s1") -> SessionState:
        state: SessionState = self.runtime.sessions[session][STATE_KEY]
        return state
