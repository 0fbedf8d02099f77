"""Session snapshots of the DSPy commands: a session's LM settings and programs, as JSON.

The part ``snakepool_worker.dspy`` (the package) covers every DSPy command module, so the
host may replace a session's journal of DSPy calls by one snapshot (see
``snakepool_worker.snapshots``). A session's part is::

    {
        "lm": {"settings": {"provider": "dummy", "answers": [...]}, "answers_used": 2},
        "programs": [{"program_id": "prog_1", "type": "predict", "signature": {...},
                      "state": {...}}, ...],
        "counter": 3,
    }

- ``lm`` is null without an LM. ``settings`` are the arguments ``configure_lm`` accepted:
  a profile's name with the client's temperature and max_tokens, the dummy provider with
  its script, or a client's own settings (``api_key_env`` names a variable, it holds no
  key). Never a key, nor anything read from the environment: a restore resolves the
  profile and reads the key on the restoring worker, and fails, naming the profile,
  where the operator no longer defines it. ``answers_used`` (only for a dummy LM with a
  list of answers) is how many of them the LM has given, so that the restored LM answers
  on from the same point.
- ``programs``, in creation order, are what ``dump_program_state`` returns: the arguments
  of a ``create_program`` that makes the same program (instructions and demos included)
  under the same id.
- ``counter`` is the session's program-id counter, so that a program created after a
  restore gets the id it would have got without one.

A session without DSPy state (no LM, no program, the counter at 0) has no part.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..arguments import check_known, describe, get_str, quoted
from ..runtime import LOG_FILTER
from .configure import set_session_lm
from .dummy import script_of
from .errors import InvalidState
from .programs import program_from_args, program_record
from .state import STATE_KEY, SessionState

SNAPSHOT_PART = "snakepool_worker.dspy"
"""The part of the DSPy commands: their package, so it covers each of their modules."""

_PART_KEYS = ("lm", "programs", "counter")
_LM_KEYS = ("settings", "answers_used")
_PROGRAM_KEYS = ("program_id", "type", "signature", "state")


def snapshot_session_state(session: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The session's DSPy state as JSON (see the module docstring), or ``None`` without any."""
    state = session.get(STATE_KEY)
    if not isinstance(state, SessionState) or _holds_nothing(state):
        return None
    return {
        "lm": _lm_snapshot(state),
        "programs": [program_record(program) for program in state.programs.values()],
        "counter": state.counter,
    }


def _holds_nothing(state: SessionState) -> bool:
    return state.lm is None and not state.programs and state.counter == 0


def _lm_snapshot(state: SessionState) -> Optional[Dict[str, Any]]:
    """``{settings, answers_used?}`` of the session's LM, or ``None`` without one."""
    if state.lm_settings is None:
        return None
    snapshot: Dict[str, Any] = {"settings": state.lm_settings}
    script = script_of(state.lm)
    if script is not None:
        snapshot["answers_used"] = script.used
    return snapshot


def restore_session_state(session: Dict[str, Any], part: Any) -> None:
    """Rebuild a snapshot's programs, counter and LM as the session's DSPy state.

    The new state replaces the session's only once it is complete: a restore that fails
    (a program that does not fit its state, a profile the operator removed ...) leaves
    the session as it was.
    """
    lm, programs, counter = _contents(part)
    state = SessionState()
    for record in programs:
        _restore_program(state, record)
    state.counter = counter
    if lm is not None:
        _restore_lm(state, lm)
    previous = session.get(STATE_KEY)
    session[STATE_KEY] = state
    if isinstance(previous, SessionState):
        previous.clear()


def _contents(part: Any) -> Tuple[Optional[Dict[str, Any]], List[Any], int]:
    """``(lm, programs, counter)`` of a snapshot; ``InvalidState`` when it is not one."""
    if not isinstance(part, dict) or set(part) != set(_PART_KEYS):
        found = f"keys {quoted(part)}" if isinstance(part, dict) else describe(part)
        raise InvalidState(
            f"a DSPy session snapshot is an object {{lm, programs, counter}}, got {found}"
        )
    lm, programs, counter = part["lm"], part["programs"], part["counter"]
    if lm is not None:
        if not isinstance(lm, dict) or not isinstance(lm.get("settings"), dict):
            raise InvalidState(
                f"snapshot: 'lm' must be null or an object {{settings, answers_used?}}, got "
                f"{describe(lm)}"
            )
        check_known("snapshot: 'lm'", lm, _LM_KEYS)
    if not isinstance(programs, list):
        raise InvalidState(f"snapshot: 'programs' must be a list, got {describe(programs)}")
    if isinstance(counter, bool) or not isinstance(counter, int) or counter < 0:
        raise InvalidState(f"snapshot: 'counter' must be an integer >= 0, got {describe(counter)}")
    return lm, programs, counter


def _restore_program(state: SessionState, record: Any) -> None:
    """Make a snapshot's program again, as ``create_program`` makes it, under its id."""
    command = "create_program"
    if not isinstance(record, dict):
        raise InvalidState(
            f"snapshot: a program must be an object {{program_id, type, signature, state}}, "
            f"got {describe(record)}"
        )
    check_known(command, record, _PROGRAM_KEYS)
    program_id = get_str(command, record, "program_id")
    if program_id in state.programs:
        raise InvalidState(f"snapshot: program {program_id!r} is in it twice")
    state.programs[program_id] = program_from_args(command, record, program_id)


def _restore_lm(state: SessionState, lm: Dict[str, Any]) -> None:
    """Configure the snapshot's LM again; a dummy's script resumes where it was.

    A restore hook is given no call: the worker's id, for the errors, is the one its log
    lines carry.
    """
    set_session_lm(state, lm["settings"], "configure_lm", LOG_FILTER.worker_id)
    used = lm.get("answers_used")
    if used is None:
        return
    script = script_of(state.lm)
    if script is None:
        raise InvalidState(
            "snapshot: 'answers_used' belongs to a dummy LM with a list of answers, and "
            "the LM's settings are not one"
        )
    script.resume(used)
