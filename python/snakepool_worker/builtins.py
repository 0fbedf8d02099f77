"""Built-in commands every worker serves: ping, get_stats, cleanup_session,
snapshot_session, restore_session, shutdown.

``ping`` and ``get_stats`` are public. The others are internal: the manifest flags them,
only the host sends them, and the host refuses clients' calls to them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

from .protocol import BadRequest
from .registry import Context, Registry

if TYPE_CHECKING:
    from .runtime import Runtime


def _runtime(ctx: Context) -> "Runtime":
    runtime: Optional[Runtime] = ctx._runtime
    if runtime is None:
        raise RuntimeError(f"built-in command {ctx.command!r} needs a worker runtime")
    return runtime


def ping(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Liveness check; with initialization/manifest set, also returns the manifest.

    A sync handler: it runs on the event loop thread without a task, so it answers at
    once while async calls are in flight, and not at all while the loop is blocked,
    which is what the host's heartbeat detects.

    ``args.worker_id`` (a non-empty string) names this worker, but only in the handshake:
    the first request the worker serves, which the host sends as ``{"id": 0, "command":
    "ping", "args": {"initialization": true, "worker_id": "w3"}}``. In any later ping the
    argument is ignored (not checked, not an error), so a client's ping cannot rename a
    worker; the reply always carries the worker's actual id.
    """
    runtime = _runtime(ctx)
    worker_id = args.get("worker_id")
    if worker_id is not None and runtime.in_handshake:
        if not isinstance(worker_id, str) or not worker_id:
            raise BadRequest("args.worker_id must be a non-empty string")
        runtime.worker_id = worker_id
    reply: Dict[str, Any] = {"status": "ok", "worker_id": runtime.worker_id, "pid": runtime.pid}
    if args.get("initialization") or args.get("manifest"):
        reply["manifest"] = runtime.manifest()
    return reply


def get_stats(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Counters for this worker: requests, errors, calls, sessions, memory, per command."""
    return _runtime(ctx).stats()


def cleanup_session(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Run the session cleanup hooks and drop the session's state on this worker."""
    session_id = args.get("session_id")
    if not isinstance(session_id, str):
        raise BadRequest("cleanup_session requires args.session_id (a string)")
    existed = _runtime(ctx).drop_session(session_id)
    return {"session_id": session_id, "existed": existed}


def _session_id(args: Dict[str, Any], command: str) -> str:
    session_id = args.get("session_id")
    if not isinstance(session_id, str):
        raise BadRequest(f"{command} requires args.session_id (a string)")
    return session_id


async def snapshot_session(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Each module's part of the session's state, as JSON: ``{"parts": {part: ...}}``.

    Async so that it may run beside other sessions' calls; it never awaits, so no call
    changes the session while the snapshot is taken.
    """
    runtime = _runtime(ctx)
    session = runtime.sessions.get(_session_id(args, "snapshot_session"), {})
    return {"parts": runtime.registry.snapshots.take(session)}


async def restore_session(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Rebuild the session's state from ``args.parts`` (a ``snapshot_session`` result)."""
    runtime = _runtime(ctx)
    session_id = _session_id(args, "restore_session")
    parts = args.get("parts")
    if not isinstance(parts, dict):
        raise BadRequest("restore_session requires args.parts (an object of part -> snapshot)")
    created = session_id not in runtime.sessions
    session = runtime.sessions.setdefault(session_id, {})
    try:
        runtime.registry.snapshots.restore(session, parts)
    except Exception:
        if created:
            # A failed restore leaves no empty session behind.
            runtime.sessions.pop(session_id, None)
        raise
    return {"session_id": session_id, "parts": sorted(parts)}


def shutdown(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Reply, then stop serving and exit with code 0 (calls in flight are cancelled)."""
    runtime = _runtime(ctx)
    runtime.request_stop()
    return {"status": "shutting_down", "worker_id": runtime.worker_id}


BUILTIN_COMMANDS = {
    "ping": ping,
    "get_stats": get_stats,
    "cleanup_session": cleanup_session,
    "snapshot_session": snapshot_session,
    "restore_session": restore_session,
    "shutdown": shutdown,
}
"""Built-in command names and handlers; none of them mutates session state."""

_SESSION_ID = {"type": "string", "description": "The session, as the host names it."}

BUILTIN_ARGS_SCHEMAS: Dict[str, Dict[str, Any]] = {
    "ping": {
        "type": "object",
        "properties": {
            "manifest": {
                "type": "boolean",
                "default": False,
                "description": "Also return the worker's manifest: its runtime, versions, "
                "and commands with their flags and argument schemas.",
            },
            "initialization": {
                "type": "boolean",
                "default": False,
                "description": "Set by the host's handshake ping; returns the manifest too.",
            },
            "worker_id": {
                "type": "string",
                "minLength": 1,
                "description": "The worker's id, taken only in the host's handshake ping; "
                "ignored in any later ping.",
            },
        },
    },
    "get_stats": {"type": "object", "properties": {}},
    "cleanup_session": {
        "type": "object",
        "properties": {"session_id": _SESSION_ID},
        "required": ["session_id"],
    },
    "snapshot_session": {
        "type": "object",
        "properties": {"session_id": _SESSION_ID},
        "required": ["session_id"],
    },
    "restore_session": {
        "type": "object",
        "properties": {
            "session_id": _SESSION_ID,
            "parts": {
                "type": "object",
                "description": "A snapshot_session result's parts: part name -> snapshot.",
            },
        },
        "required": ["session_id", "parts"],
    },
    "shutdown": {"type": "object", "properties": {}},
}
"""The JSON Schema of each built-in command's ``args``. The built-ins ignore arguments
they do not read, so no schema forbids others."""

INTERNAL_BUILTINS = frozenset(
    {"cleanup_session", "snapshot_session", "restore_session", "shutdown"}
)
"""Built-ins only the host may send (registered with ``internal=True``)."""


def register_builtins(registry: Registry) -> None:
    """Register the built-in commands into ``registry``."""
    for name, func in BUILTIN_COMMANDS.items():
        registry.register(
            name,
            func,
            mutates_session=False,
            internal=name in INTERNAL_BUILTINS,
            args_schema=BUILTIN_ARGS_SCHEMAS[name],
        )
