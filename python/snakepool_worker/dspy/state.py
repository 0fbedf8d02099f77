"""A session's DSPy state, and running its programs with its language model.

Each session has its own LM and programs, kept in ``ctx.session[STATE_KEY]`` on the
session's worker until ``cleanup_session``. Programs run under ``dspy.context(lm=<the
session's LM>, ...)``, which also names the LM's own response cache (see ``caches``):
DSPy keeps those settings in a context variable, so each run, and each of the runs that
overlap on the worker's event loop, sees its own. Nothing here calls ``dspy.configure``.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Dict, Mapping, Optional, Protocol, Tuple

from ..arguments import get_str, names
from ..registry import Context
from .caches import cache_setting, install_router
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
from .programs import Program, jsonable

STATE_KEY = "dspy"
"""Key of the per-session DSPy state in ``ctx.session``."""

_ID_PREFIX = "prog_"
_log = logging.getLogger(__package__)


class SessionState:
    """A session's language model (with its response cache) and programs.

    ``lm_settings`` are the ``configure_lm`` arguments the LM was made from (see
    ``configure``), which configure the same LM again on another worker.
    """

    __slots__ = (
        "lm",
        "lm_info",
        "lm_settings",
        "adapter",
        "response_cache",
        "programs",
        "counter",
    )

    def __init__(self) -> None:
        self.lm: Any = None
        self.lm_info: Optional[Dict[str, Any]] = None
        self.lm_settings: Optional[Dict[str, Any]] = None
        self.adapter: Any = None
        self.response_cache: Any = None
        self.programs: Dict[str, Program] = {}
        self.counter = 0

    def set_lm(
        self,
        lm: Any,
        info: Dict[str, Any],
        settings: Dict[str, Any],
        adapter: Any,
        response_cache: Any = None,
    ) -> None:
        """Install the session's LM, made from ``settings``; ``response_cache`` is its
        profile's cache, if any."""
        self.close_lm()
        self.lm = lm
        self.lm_info = info
        self.lm_settings = settings
        self.adapter = adapter
        self.response_cache = response_cache

    def close_lm(self) -> bool:
        """Drop the LM (closing its connections); return whether there was one."""
        lm = self.lm
        self.lm = self.lm_info = self.lm_settings = self.adapter = self.response_cache = None
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


class LMBinding(Protocol):
    """What a program runs with: an LM, what to call it in errors, its adapter and cache.

    ``SessionState`` is one; a served program's LM is another (see ``served``).
    """

    lm: Any
    lm_info: Optional[Dict[str, Any]]
    adapter: Any
    response_cache: Any


def _settings(dspy: Any, binding: LMBinding) -> Dict[str, Any]:
    """The ``dspy.context`` settings of a run with ``binding``.

    The history is off and the trace is the run's own list because DSPy otherwise keeps
    every LM call (in a process-wide history and in each module) and every predictor call
    (in a process-wide trace, with its inputs and outputs), which would hold one session's
    prompts and replies after it is cleaned up, shared by every call on the worker.
    """
    install_router(dspy)
    settings: Dict[str, Any] = {
        "lm": binding.lm,
        "track_usage": True,
        "disable_history": True,
        "trace": [],
    }
    if binding.adapter is not None:
        settings["adapter"] = binding.adapter
    settings.update(cache_setting(binding.response_cache))
    return settings


def _failure(exc: Exception, lm_info: Optional[Dict[str, Any]], dspy: Any) -> Optional[str]:
    """The ``LMCallFailed`` message for ``exc`` (logged with it), or ``None``: keep ``exc``.

    A used-up dummy script is raised as itself (DSPy wraps errors raised inside an LM
    call).
    """
    exhausted = exhausted_script(exc)
    if exhausted is not None:
        raise DummyAnswersExhausted(str(exhausted)) from exc
    message = lm_call_failure(exc, lm_info, dspy)
    if message is not None:
        _log.error("%s; the error as raised:", message, exc_info=exc)
    return message


def run(binding: LMBinding, func: Callable[[], Any]) -> Any:
    """Run ``func`` with the binding's LM and response cache, usage tracking on, history off.

    A failure at the provider or on the way to it becomes ``LMCallFailed`` (see
    ``failures``): the original is logged on stderr and not chained, so neither the
    reply's message nor its traceback carries the provider's words.
    """
    dspy = load_dspy()
    lm_info = binding.lm_info
    try:
        with dspy.context(**_settings(dspy, binding)):
            return func()
    except Exception as exc:
        message = _failure(exc, lm_info, dspy)
        if message is None:
            raise
    # Raised outside the handler, so the provider's error is neither cause nor context.
    raise LMCallFailed(message) from None


async def arun(binding: LMBinding, func: Callable[[], Awaitable[Any]]) -> Any:
    """``run`` for a coroutine: await ``func()`` with the binding's LM, cache and settings.

    The settings live in DSPy's context variable, so they belong to the calling task:
    runs that overlap on one event loop never see each other's LM, cache or usage. The
    binding is read before the first ``await``, so a run keeps the LM it started with.
    """
    dspy = load_dspy()
    lm_info = binding.lm_info
    try:
        with dspy.context(**_settings(dspy, binding)):
            return await func()
    except Exception as exc:
        message = _failure(exc, lm_info, dspy)
        if message is None:
            raise
    raise LMCallFailed(message) from None


def program_result(program: Program, prediction: Any) -> Dict[str, Any]:
    """What ``execute_program`` returns for ``prediction``, a run of ``program``.

    ``{outputs, reasoning, usage}``: the declared outputs as JSON, the reasoning of a chain
    of thought (else null) and the run's LM usage (null when no LM call was made).
    """
    outputs = {field.name: jsonable(prediction.get(field.name)) for field in program.outputs}
    reasoning = prediction.get("reasoning") if program.type == "chain_of_thought" else None
    usage = None
    get_usage = getattr(prediction, "get_lm_usage", None)
    if callable(get_usage):
        usage = get_usage() or None
    return {
        "outputs": outputs,
        "reasoning": None if reasoning is None else str(reasoning),
        "usage": jsonable(usage),
    }


def cleanup_session_state(session_id: str, session: Dict[str, Any]) -> None:
    """Session cleanup hook: drop the session's programs and close its LM."""
    state = session.pop(STATE_KEY, None)
    if isinstance(state, SessionState):
        state.clear()
