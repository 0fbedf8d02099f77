"""The program commands, and the table of every DSPy command with its manifest flags.

``create_program`` builds a ``dspy.Predict`` or ``dspy.ChainOfThought`` from a signature
(see ``signatures``), optionally with demos or a state; ``execute_program`` runs one with
the session's LM, or a served program (see ``served``) with its profile's LM, through
DSPy's ``acall``: it is the one concurrent command (an async generator), so runs overlap
on the worker's event loop while they wait for their LMs, and with ``stream`` it sends
the program's string outputs as chunks first (see ``streaming``). Its inline handler
serves a run without a stream of a session's program with the scripted LM at once,
through DSPy's synchronous call, without a task: such a run does no I/O. The others (all
synchronous) list, describe, save, load and delete programs. Every command rejects
arguments it does not know (``InvalidArgument``).

``register_commands`` registers the commands with their argument schemas (``schemas``),
the inline handler and their session hooks: the cleanup hook, and the snapshot and
restore hooks of the part ``snakepool_worker.dspy`` (see ``snapshot``), which cover every
DSPy command.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Dict, Optional, Tuple

from ..arguments import (
    InvalidArgument,
    check_known,
    describe,
    get_bool,
    get_str,
    names,
    quoted,
)
from ..registry import RUN_AS_TASK, Context, Final, Handler, Registry
from .configure import configure_lm
from .errors import MissingInput, UnknownInput
from .optimize import optimize_program
from .programs import (
    MAX_PROGRAM_ID_CHARS,
    Program,
    load_state,
    program_from_args,
    program_record,
)
from .schemas import ARGS_SCHEMAS
from .served import find_served, served_lm
from .signatures import RESERVED_FIELD_NAMES, reserved_error
from .snapshot import SNAPSHOT_PART, restore_session_state, snapshot_session_state
from .state import (
    STATE_KEY,
    LMBinding,
    SessionState,
    arun,
    cleanup_session_state,
    find_program,
    program_result,
    require_lm,
    run,
    session_state,
)
from .streaming import stream_program

_CREATE_ARGS = (
    "signature",
    "type",
    "program_type",
    "instructions",
    "demos",
    "state",
    "program_id",
    "id",
)


def create_program(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Create a Predict or ChainOfThought program from a signature; returns its id."""
    state = session_state(ctx)
    command = ctx.command
    check_known(command, args, _CREATE_ARGS)
    for alias, name in (("id", "program_id"), ("program_type", "type")):
        if alias in args:
            if name in args and args[name] != args[alias]:
                raise InvalidArgument(f"{command}: give args.{name} or args.{alias}, not both")
            args = {**args, name: args[alias]}
    program_id = get_str(command, args, "program_id", None)
    if program_id is not None:
        if len(program_id) > MAX_PROGRAM_ID_CHARS:
            raise InvalidArgument(
                f"{command}: args.program_id is longer than {MAX_PROGRAM_ID_CHARS} characters"
            )
        if program_id in state.programs:
            raise InvalidArgument(
                f"{command}: program {program_id!r} already exists in session "
                f"{ctx.session_id!r}; delete it first or choose another id"
            )
    program = program_from_args(command, args, program_id or "")
    program.program_id = program_id or state.next_program_id()
    state.programs[program.program_id] = program
    return {
        "program_id": program.program_id,
        "type": program.type,
        "signature": program.describe_signature(),
    }


async def execute_program(args: Dict[str, Any], ctx: Context) -> AsyncIterator[Any]:
    """Run a program on args.inputs with the session's LM (or a served program); typed outputs.

    With ``args.stream`` true, its string outputs are streamed as chunks first (see
    ``streaming``); either way the call's result is ``{outputs, reasoning, usage}``.
    """
    binding, program, inputs = _run_of(args, ctx)
    if get_bool(ctx.command, args, "stream", False):
        chunks = stream_program(binding, program, inputs)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()
        return
    module = program.module
    prediction = await arun(binding, lambda: module.acall(**inputs))
    yield Final(program_result(program, prediction))


def execute_program_inline(args: Dict[str, Any], ctx: Context) -> Any:
    """``execute_program`` at once, without a task, for a session's program with a scripted
    LM and no stream: such a run does no I/O, so it has nothing to overlap with, and DSPy's
    synchronous call is the cheaper one. Any other call: ``RUN_AS_TASK``."""
    state = _scripted_session(args, ctx)
    if state is None:
        return RUN_AS_TASK
    program, inputs = _session_run_of(args, ctx, state)
    module = program.module
    prediction = run(state, lambda: module(**inputs))
    return program_result(program, prediction)


def _scripted_session(args: Dict[str, Any], ctx: Context) -> Optional[SessionState]:
    """The calling session's state, when ``args`` ask for a run without a stream of one of
    its programs and its LM is the scripted one; else ``None``."""
    stream = args.get("stream")
    if (stream is not None and stream is not False) or args.get("program") is not None:
        return None
    if ctx.session_id is None:
        return None
    state = ctx.session.get(STATE_KEY)
    if not isinstance(state, SessionState) or state.lm_info is None:
        return None
    return state if state.lm_info.get("provider") == "dummy" else None


def _run_of(args: Dict[str, Any], ctx: Context) -> Tuple[LMBinding, Program, Dict[str, Any]]:
    """The LM binding, program and checked inputs ``execute_program`` runs."""
    if args.get("program") is not None:
        return _served_run_of(args, ctx)
    state = session_state(ctx)
    program, inputs = _session_run_of(args, ctx, state)
    return state, program, inputs


def _served_run_of(
    args: Dict[str, Any], ctx: Context
) -> Tuple[LMBinding, Program, Dict[str, Any]]:
    """``_run_of`` for a served program (``args.program``), in a plain call."""
    command = ctx.command
    if ctx.session_id is not None:
        raise InvalidArgument(
            f"{command}: args.program names a served program, which runs as a plain call "
            "without a session; in a session, run the session's programs with "
            "args.program_id"
        )
    check_known(command, args, ("program", "inputs", "stream"))
    served, program = find_served(get_str(command, args, "program"))
    inputs = _checked_inputs(command, program, args.get("inputs"))
    return served_lm(served, ctx.worker_id, command), program, inputs


def _session_run_of(
    args: Dict[str, Any], ctx: Context, state: SessionState
) -> Tuple[Program, Dict[str, Any]]:
    """The program of the session (``state``) that ``args.program_id`` names and its
    checked inputs; ``LMNotConfigured`` when the session has no LM."""
    command = ctx.command
    check_known(command, args, ("program_id", "inputs", "stream"))
    program = find_program(state, ctx, args)
    inputs = _checked_inputs(command, program, args.get("inputs"))
    require_lm(state, ctx)
    return program, inputs


def _checked_inputs(command: str, program: Program, inputs: Any) -> Dict[str, Any]:
    """``args.inputs``, holding every input field of ``program`` and nothing else.

    Inputs naming exactly the program's input fields pass at once: no declared field
    has a reserved name.
    """
    if type(inputs) is dict and inputs.keys() == program.input_names:
        return inputs
    if inputs is None:
        inputs = {}
    if not isinstance(inputs, dict):
        raise InvalidArgument(
            f"{command}: args.inputs must be an object of input field -> value, got "
            f"{describe(inputs)}"
        )
    reserved = [name for name in inputs if name in RESERVED_FIELD_NAMES]
    if reserved:
        raise reserved_error(reserved, f"program {program.program_id!r} inputs")
    expected = [field.name for field in program.inputs]
    missing = [name for name in expected if name not in inputs]
    unknown = [name for name in inputs if name not in expected]
    if unknown:
        also = f"; missing: {quoted(missing)}" if missing else ""
        raise UnknownInput(
            f"program {program.program_id!r} got unknown input(s) {quoted(unknown)}; it "
            f"expects: {names(expected)}{also}"
        )
    if missing:
        raise MissingInput(
            f"program {program.program_id!r} is missing input(s) {quoted(missing)}; it "
            f"expects: {names(expected)}"
        )
    return inputs


def dump_program_state(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Return a program's state (demos, instructions) as JSON for load_program_state.

    With its type and signature, so the reply saved to a file is a servable program.
    """
    state = session_state(ctx)
    check_known(ctx.command, args, ("program_id",))
    return program_record(find_program(state, ctx, args))


def load_program_state(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Load a state from dump_program_state (or optimize_program) into a program."""
    state = session_state(ctx)
    check_known(ctx.command, args, ("program_id", "state"))
    program = find_program(state, ctx, args)
    if "state" not in args:
        raise InvalidArgument(f"{ctx.command}: args.state is required")
    load_state(ctx.command, program, args["state"])
    return {"program_id": program.program_id, "demos": program.demo_count()}


def list_programs(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """The session's programs, in creation order."""
    state = session_state(ctx)
    check_known(ctx.command, args, ())
    return {
        "programs": [
            {
                "program_id": program.program_id,
                "type": program.type,
                "signature": program.signature_text(),
            }
            for program in state.programs.values()
        ]
    }


def get_program_info(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """A program's type, signature, instructions and number of demos."""
    state = session_state(ctx)
    check_known(ctx.command, args, ("program_id",))
    program = find_program(state, ctx, args)
    return {
        "program_id": program.program_id,
        "type": program.type,
        "signature": program.describe_signature(),
        "demos": program.demo_count(),
        "instructions": program.instructions(),
    }


def delete_program(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Delete a program from the session."""
    state = session_state(ctx)
    check_known(ctx.command, args, ("program_id",))
    program = find_program(state, ctx, args)
    del state.programs[program.program_id]
    return {"deleted": program.program_id}


def reset_state(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Drop the session's programs and language model."""
    state = session_state(ctx)
    check_known(ctx.command, args, ())
    count, had_lm = state.clear()
    return {"programs_deleted": count, "lm_cleared": had_lm}


COMMANDS: Tuple[Tuple[str, Handler, bool], ...] = (
    ("configure_lm", configure_lm, True),
    ("create_program", create_program, True),
    ("execute_program", execute_program, False),
    ("optimize_program", optimize_program, True),
    ("dump_program_state", dump_program_state, False),
    ("load_program_state", load_program_state, True),
    ("list_programs", list_programs, False),
    ("get_program_info", get_program_info, False),
    ("delete_program", delete_program, True),
    ("reset_state", reset_state, True),
)
"""``(name, handler, mutates_session)`` of every DSPy command."""

COMMAND_NAMES: Tuple[str, ...] = tuple(name for name, _, _ in COMMANDS)
"""Names of the DSPy commands."""

INLINE_HANDLERS: Dict[str, Handler] = {"execute_program": execute_program_inline}
"""The inline handler (see ``snakepool_worker.registry``) of each DSPy command with one."""


def register_commands(registry: Registry) -> None:
    """Register the DSPy commands, with their argument schemas (see ``schemas``) and inline
    handlers, and their session hooks into ``registry``."""
    for name, func, mutates_session in COMMANDS:
        registry.register(
            name,
            func,
            mutates_session=mutates_session,
            args_schema=ARGS_SCHEMAS[name],
            inline=INLINE_HANDLERS.get(name),
        )
    register_session_hooks(registry)


def register_session_hooks(registry: Registry) -> None:
    """Register the session cleanup hook and the session snapshot and restore hooks of the
    DSPy commands into ``registry``, the registry of the commands."""
    registry.on_session_cleanup(cleanup_session_state)
    registry.session_snapshot(snapshot_session_state, part=SNAPSHOT_PART)
    registry.session_restore(restore_session_state, part=SNAPSHOT_PART)
