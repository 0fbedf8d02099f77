"""A worker runtime with the DSPy commands, driven in-process frame by frame."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

from snakepool_worker.builtins import register_builtins
from snakepool_worker.dspy import STATE_KEY, SessionState, register_commands
from snakepool_worker.registry import Registry
from snakepool_worker.runtime import Runtime


class Bridge:
    """A fresh worker runtime with the DSPy commands, driven frame by frame."""

    def __init__(self) -> None:
        registry = Registry()
        register_builtins(registry)
        register_commands(registry)
        self.runtime = Runtime(registry, worker_id="unit")
        self._next_id = 0

    def raw(self, command: str, session: Optional[str] = "s1", **args: Any) -> bytes:
        self._next_id += 1
        if session is not None:
            args["session_id"] = session
        request = {"id": self._next_id, "command": command, "args": args}
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

    def state(self, session: str = "s1") -> SessionState:
        state: SessionState = self.runtime.sessions[session][STATE_KEY]
        return state
