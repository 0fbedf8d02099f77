"""A session's DSPy state, and running its programs with its language model.

Each session has its own LM and programs, kept in ``ctx.session[STATE_KEY]`` on the
session's worker until ``cleanup_session``. Programs run under ``dspy.context(lm=<the
session's LM>)`` with the LM's own response cache in place; nothing here calls
``dspy.configure``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from ..arguments import get_str, names
from ..registry import Context
from .caches import response_cache
from .errors import (
    DummyAnswersExhausted,
    LMCallFailed,
    LMNotConfigured,
    ProgramNotFound,
    SessionRequired,
)
from .failures import exhausted_script, lm_call_failure
from .loader import load_dspy
from .policy import profile_names
from .programs import Program

STATE_KEY = "dspy"
"""Key of the per-session DSPy state in ``ctx.session``."""

_ID_PREFIX = "prog_"
_log = logging.getLogger(__package__)


class SessionState:
    """A session's language model (with its response cache) and programs."""

    __slots__ = ("lm", "lm_info", "adapter", "response_cache", "programs", "counter")

    def __init__(self) -> None:
        self.lm: Any = None
        self.lm_info: Optional[Dict[str, Any]] = None
        self.adapter: Any = None
        self.response_cache: Any = None
        self.programs: Dict[str, Program] = {}
        self.counter = 0

    def set_lm(
        self, lm: Any, info: Dict[str, Any], adapter: Any, response_cache: Any = None
    ) -> None:
        """Install the session's LM; ``response_cache`` is its profile's cache, if any."""
        self.close_lm()
        self.lm = lm
        self.lm_info = info
        self.adapter = adapter
        self.response_cache = response_cache

    def close_lm(self) -> bool:
        """Drop the LM (closing its connections); return whether there was one."""
        lm = self.lm
        self.lm = self.lm_info = self.adapter = self.response_cache = None
        if lm is None:
            return False
        close = getattr(lm, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # releasing connections must not fail a command
                pass
        return True

    def next_program_id(self) -> str:
        """``prog_<n>`` from the session's counter, skipping ids taken explicitly."""
        while True:
            self.counter += 1
            program_id = f"{_ID_PREFIX}{self.counter}"
            if program_id not in self.programs:
                return program_id

    def clear(self) -> Tuple[int, bool]:
        """Drop programs and LM; return ``(programs dropped, had an LM)``."""
        count = len(self.programs)
        self.programs.clear()
        had_lm = self.close_lm()
        self.counter = 0
        return count, had_lm


def session_state(ctx: Context) -> SessionState:
    """The calling session's state (created on first use); ``SessionRequired`` without one."""
    if ctx.session_id is None:
        raise SessionRequired(
            f"DSPy programs live in a session's worker; call through a session "
            f"({ctx.command!r} was called without args.session_id)"
        )
    session = ctx.session
    state = session.get(STATE_KEY)
    if state is None:
        state = session[STATE_KEY] = SessionState()
    return state


def find_program(state: SessionState, ctx: Context, args: Mapping[str, Any]) -> Program:
    """The program named by ``args.program_id``; ``ProgramNotFound`` listing the others."""
    program_id = get_str(ctx.command, args, "program_id")
    program = state.programs.get(program_id)
    if program is None:
        if state.programs:
            known = f"its programs: {names(state.programs)}"
        else:
            known = "it has no programs; create one with create_program"
        raise ProgramNotFound(f"no program {program_id!r} in session {ctx.session_id!r} ({known})")
    return program


def require_lm(state: SessionState, ctx: Context) -> None:
    """``LMNotConfigured`` (saying how to configure one) when the session has no LM."""
    if state.lm is None:
        raise LMNotConfigured(
            f"{ctx.command}: session {ctx.session_id!r} has no language model; call "
            'configure_lm first, e.g. {"profile": NAME} (profiles: '
            f'{profile_names()}) or {{"provider": "dummy", "answers": [...]}}'
        )


def run(state: SessionState, func: Callable[[], Any]) -> Any:
    """Run ``func`` with the session's LM and response cache, usage tracking on, history off.

    The history is off because DSPy keeps every LM call in a process-wide list (and in
    each module) that would hold one session's prompts and replies after it is cleaned up.

    A failure at the provider or on the way to it becomes ``LMCallFailed`` (see
    ``failures``): the original is logged on stderr and not chained, so neither the
    reply's message nor its traceback carries the provider's words.
    """
    dspy = load_dspy()
    settings: Dict[str, Any] = {"lm": state.lm, "track_usage": True, "disable_history": True}
    if state.adapter is not None:
        settings["adapter"] = state.adapter
    try:
        with dspy.context(**settings), response_cache(dspy, state.response_cache):
            return func()
    except Exception as exc:
        # DSPy wraps errors raised inside an LM call; report a used-up script as itself.
        exhausted = exhausted_script(exc)
        if exhausted is not None:
            raise DummyAnswersExhausted(str(exhausted)) from exc
        message = lm_call_failure(exc, state.lm_info, dspy)
        if message is None:
            raise
        _log.error("%s; the error as raised:", message, exc_info=exc)
    # Raised outside the handler, so the provider's error is neither cause nor context.
    raise LMCallFailed(message) from None


def cleanup_session_state(session_id: str, session: Dict[str, Any]) -> None:
    """Session cleanup hook: drop the session's programs and close its LM."""
    state = session.pop(STATE_KEY, None)
    if isinstance(state, SessionState):
        state.clear()
