"""Command registry, the ``@command`` decorator and the per-call ``Context``.

What kind of function a handler is decides how the worker runs it (see ``runtime.py``
for the whole concurrency model):

- ``def``: a sync handler, called inline on the worker's event loop thread. The host
  sends nothing else while a sync call runs, so it has the worker to itself.
- ``async def``: a concurrent handler, run as an asyncio task; several may be in flight.
  The manifest flags it ``"concurrent": true``.
- a generator function (``def`` with ``yield``): a streaming handler. Each yielded
  value goes to the host as a chunk, the return value is the result. It runs as a task
  that advances the generator one step at a time, but like a sync handler it is not
  concurrent. The manifest flags it ``"streams": true``.
- an async generator function (``async def`` with ``yield``): a concurrent streaming
  handler (``"concurrent": true, "streams": true``); its result is ``null``, or the
  value of the ``Final`` it yields (which ends the stream).

A handler that is not a plain function may come with an **inline** handler
(``register(..., inline=fn)``): a plain function of the same arguments that the runtime
tries first, on the loop thread, for the calls that have nothing to wait for. It returns
the call's result, served at once like a sync handler's (a task's cost saved), or
``RUN_AS_TASK`` when the call must run as a task after all, as it would without one; it
then must have changed nothing. The manifest does not show it.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, TypeVar, overload

from .snapshots import SessionSnapshots

Handler = Callable[[Dict[str, Any], "Context"], Any]
"""A command handler: ``fn(args, ctx) -> JSON-serialisable value`` (or a coroutine or
generator function of the same arguments; see the module docstring)."""

SYNC = "sync"
"""Handler kind: a plain function, run inline."""
ASYNC = "async"
"""Handler kind: an ``async def`` function, run as a task."""
STREAM = "stream"
"""Handler kind: a generator function, run as a task one step at a time."""
ASYNC_STREAM = "async_stream"
"""Handler kind: an async generator function, run as a task."""


RUN_AS_TASK: Any = object()
"""Returned by an inline handler: this call runs as a task, as if there were no inline."""


class Final:
    """Yielded by a streaming handler to end its stream with ``value`` as the call's
    result: an async generator cannot ``return`` a value. The generator is closed
    after it yields one (a sync generator may ``return`` its result instead)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Final({self.value!r:.60})"


def handler_kind(func: Callable[..., Any]) -> str:
    """``SYNC``, ``ASYNC``, ``STREAM`` or ``ASYNC_STREAM`` for ``func``.

    Decided by what ``func`` is (``functools.partial`` objects are looked through); a
    plain function that merely returns a coroutine is ``SYNC``, and the runtime fails
    its calls with a hint to declare it ``async def``.
    """
    if inspect.isasyncgenfunction(func):
        return ASYNC_STREAM
    if inspect.iscoroutinefunction(func):
        return ASYNC
    if inspect.isgeneratorfunction(func):
        return STREAM
    return SYNC

CleanupHook = Callable[[str, Dict[str, Any]], None]
"""A session cleanup hook: ``fn(session_id, session) -> None``."""

F = TypeVar("F", bound=Callable[..., Any])

_log = logging.getLogger("snakepool_worker.registry")


class Context:
    """What a handler knows about the call it is serving.

    Attributes:
        worker_id: id of this worker process, as assigned by the host.
        session_id: the call's ``args["session_id"]``, or ``None`` for a plain call.
        log: a logger for the handler (named after the handler's module).
        request_id: the request's ``id``.
        command: the command name being served.

    ``session`` is the per-session dict: created on first access and kept on this worker
    across the calls of that session until ``cleanup_session``. For a call without a
    session id it is a fresh dict that is not stored.

    ``journal_as(command, args)`` asks the host to journal a different call in place of
    this request (see its docstring).
    """

    __slots__ = (
        "worker_id",
        "session_id",
        "log",
        "request_id",
        "command",
        "_session",
        "_sessions",
        "_runtime",
        "_journal",
    )

    def __init__(
        self,
        worker_id: str,
        session_id: Optional[str] = None,
        log: Optional[logging.Logger] = None,
        request_id: int = 0,
        command: str = "",
        sessions: Optional[Dict[str, Dict[str, Any]]] = None,
        runtime: Any = None,
    ) -> None:
        self.worker_id = worker_id
        self.session_id = session_id
        self.log = log if log is not None else logging.getLogger("snakepool_worker.handler")
        self.request_id = request_id
        self.command = command
        self._session: Optional[Dict[str, Any]] = None
        self._sessions = sessions
        self._runtime = runtime
        self._journal: Optional[Dict[str, Any]] = None

    @property
    def session(self) -> Dict[str, Any]:
        """The session's state dict (see the class docstring)."""
        state = self._session
        if state is None:
            sessions = self._sessions
            session_id = self.session_id
            if session_id is None or sessions is None:
                state = {}
            else:
                state = sessions.get(session_id)
                if state is None:
                    state = sessions[session_id] = {}
            self._session = state
        return state

    def journal_as(self, command: str, args: Dict[str, Any]) -> None:
        """Have the host journal ``command(args)`` for this call instead of the request.

        Use it when the request is expensive or not deterministic but leaves state that a
        cheaper call reproduces exactly (an optimizer run is journaled as loading the
        state it produced). If the handler then succeeds, the success reply carries
        ``"journal": {"command": command, "args": args}`` and the host records that call
        in the session journal, so rebuilding the session on a new worker replays it.
        ``args`` must be JSON-serialisable; a ``session_id`` in it is dropped (the host
        adds the session id on replay). A later call replaces an earlier one. Raises
        ``ValueError`` for an empty or unregistered command, ``TypeError`` for non-dict args.
        """
        if not isinstance(command, str) or not command:
            raise ValueError(f"journal_as: command must be a non-empty string, got {command!r}")
        if not isinstance(args, dict):
            raise TypeError(f"journal_as: args must be a dict, got {type(args).__name__}")
        registry = getattr(self._runtime, "registry", None)
        if registry is not None and command not in registry:
            raise ValueError(
                f"journal_as: command {command!r} is not registered on this worker, "
                "so the host could not replay it"
            )
        journal_args = dict(args)
        journal_args.pop("session_id", None)
        self._journal = {"command": command, "args": journal_args}

    @property
    def journal(self) -> Optional[Dict[str, Any]]:
        """The substitute journal entry set by ``journal_as``, or ``None``."""
        return self._journal

    def __repr__(self) -> str:
        return (
            f"Context(worker_id={self.worker_id!r}, session_id={self.session_id!r}, "
            f"request_id={self.request_id!r}, command={self.command!r})"
        )


class CommandSpec:
    """A registered command: its handler and the flags published in the manifest.

    ``mutates_session`` tells the host to journal the command's calls; ``internal`` tells
    it that only the host itself may send the command (the host refuses client calls to
    it, and the worker serves it as usual). ``kind`` is the handler's kind (``SYNC``,
    ``ASYNC``, ``STREAM``, ``ASYNC_STREAM``); ``concurrent`` and ``streams`` follow from it.
    ``args_schema`` is the JSON Schema of the command's ``args`` object (checked by
    ``checked_args_schema``), or ``None``: documentation for callers, never applied to
    a call's arguments. ``inline`` is the handler tried before a task is started (see
    the module docstring), or ``None``.
    """

    __slots__ = (
        "name",
        "func",
        "mutates_session",
        "internal",
        "args_schema",
        "doc",
        "log",
        "kind",
        "inline",
    )

    def __init__(
        self,
        name: str,
        func: Handler,
        mutates_session: bool,
        internal: bool = False,
        args_schema: Optional[Dict[str, Any]] = None,
        inline: Optional[Handler] = None,
    ) -> None:
        self.name = name
        self.func = func
        self.mutates_session = mutates_session
        self.internal = internal
        self.args_schema = args_schema
        self.doc = first_doc_line(func)
        self.log = logging.getLogger(getattr(func, "__module__", None) or "snakepool_worker")
        self.kind = handler_kind(func)
        self.inline = inline

    @property
    def concurrent(self) -> bool:
        """Whether calls may overlap with other calls (``async def`` handlers)."""
        return self.kind is ASYNC or self.kind is ASYNC_STREAM

    @property
    def streams(self) -> bool:
        """Whether calls send chunks before their result (generator handlers)."""
        return self.kind is STREAM or self.kind is ASYNC_STREAM

    def describe(self) -> Dict[str, Any]:
        """The manifest entry for this command.

        ``{"mutates_session": bool, "doc": str}``, plus ``"internal": true`` for an
        internal command, ``"concurrent": true`` for an ``async def`` handler (or async
        generator), ``"streams": true`` for a generator handler and ``"args_schema"``
        when the command has one. An absent flag means false, so a sync command's entry
        is what it always was.
        """
        entry: Dict[str, Any] = {"mutates_session": self.mutates_session, "doc": self.doc}
        if self.internal:
            entry["internal"] = True
        if self.concurrent:
            entry["concurrent"] = True
        if self.streams:
            entry["streams"] = True
        if self.args_schema is not None:
            entry["args_schema"] = self.args_schema
        return entry


def checked_args_schema(command: str, schema: Any) -> Dict[str, Any]:
    """A JSON copy of ``schema``, the JSON Schema of ``command``'s ``args``, once usable.

    It must be JSON data (dicts with string keys, lists or tuples, strings, finite
    numbers, booleans, ``None``) and an object with ``"type": "object"``; ``properties``,
    when present, an object of property schemas (objects, or the booleans JSON Schema
    allows), and ``required``, when present, a list of distinct property names. Anything
    else raises ``TypeError`` (not a dict) or ``ValueError``, naming the command and what
    is wrong. Nothing more is checked: the schema documents the arguments for callers and
    is never applied to a call.
    """
    where = f"command {command!r}: args_schema"
    if not isinstance(schema, dict):
        raise TypeError(
            f"{where} must be a dict (a JSON Schema object), got {type(schema).__name__}"
        )
    copied: Dict[str, Any] = _json_copy(schema, where)
    if copied.get("type") != "object":
        raise ValueError(
            f'{where} must describe the args object: "type" must be "object", got '
            f"{copied.get('type')!r}"
        )
    properties = copied.get("properties", {})
    if not isinstance(properties, dict):
        raise ValueError(f'{where}: "properties" must be an object of property schemas')
    for key, value in properties.items():
        if not isinstance(value, (dict, bool)):
            raise ValueError(
                f"{where}: properties[{key!r}] must be a schema (an object or a boolean), "
                f"got {type(value).__name__}"
            )
    required = copied.get("required", [])
    if (
        not isinstance(required, list)
        or not all(isinstance(name, str) for name in required)
        or len(set(required)) != len(required)
    ):
        raise ValueError(f'{where}: "required" must be a list of distinct property names')
    return copied


def _json_copy(value: Any, where: str) -> Any:
    """``value`` as plain JSON data (tuples become lists); ``ValueError`` naming the
    place of anything JSON cannot hold as it is."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} holds {value!r}, which JSON cannot carry")
        return value
    if isinstance(value, dict):
        copied = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has the key {key!r}: JSON object keys are strings")
            copied[key] = _json_copy(item, f"{where}.{key}")
        return copied
    if isinstance(value, (list, tuple)):
        return [_json_copy(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ValueError(f"{where} holds a {type(value).__name__}, which is not JSON data")


def _check_inline(name: str, func: Handler, inline: Any) -> None:
    """Refuse an inline handler that is not a plain function, or one for a command whose
    own handler is a plain function (its calls never have a task to save)."""
    if not callable(inline) or handler_kind(inline) is not SYNC:
        raise TypeError(
            f"command {name!r}: the inline handler {inline!r} must be a plain function"
        )
    if handler_kind(func) is SYNC:
        raise ValueError(
            f"command {name!r}: only a handler that runs as a task (async def, a generator) "
            "may have an inline handler"
        )


def first_doc_line(func: Callable[..., Any]) -> str:
    """First non-empty line of ``func``'s docstring, or ``""``."""
    doc = getattr(func, "__doc__", None)
    if not isinstance(doc, str):
        return ""
    for line in doc.splitlines():
        line = line.strip()
        if line:
            return line
    return ""


def _qualified_name(func: Callable[..., Any]) -> str:
    module = getattr(func, "__module__", None) or "?"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return f"{module}.{name}"


class Registry:
    """Commands and session cleanup hooks known to a worker.

    ``version`` increases on every change to the command set, so callers can cache
    anything derived from it (such as the manifest).
    """

    def __init__(self) -> None:
        self._commands: Dict[str, CommandSpec] = {}
        self._cleanup_hooks: List[CleanupHook] = []
        self.snapshots = SessionSnapshots()
        self.version = 0

    def register(
        self,
        name: str,
        func: Handler,
        *,
        mutates_session: bool = False,
        internal: bool = False,
        args_schema: Optional[Dict[str, Any]] = None,
        inline: Optional[Handler] = None,
    ) -> CommandSpec:
        """Register ``func`` under ``name``; raise ``ValueError`` if the name is taken.

        ``internal=True`` marks a command only the host may send (see ``CommandSpec``);
        ``args_schema`` is the JSON Schema of its ``args`` (see ``checked_args_schema``);
        ``inline`` is a plain function tried before each call's task (see the module
        docstring), for a handler that is not a plain function itself.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"command name must be a non-empty string, got {name!r}")
        if not callable(func):
            raise TypeError(f"command {name!r}: handler {func!r} is not callable")
        if inline is not None:
            _check_inline(name, func, inline)
        if args_schema is not None:
            args_schema = checked_args_schema(name, args_schema)
        existing = self._commands.get(name)
        if existing is not None:
            raise ValueError(
                f"command {name!r} is already registered by {_qualified_name(existing.func)}; "
                f"cannot register it again for {_qualified_name(func)}"
            )
        spec = CommandSpec(name, func, bool(mutates_session), bool(internal), args_schema, inline)
        self._commands[name] = spec
        self.version += 1
        return spec

    @overload
    def command(
        self,
        name: F,
        *,
        mutates_session: bool = False,
        internal: bool = False,
        args_schema: Optional[Dict[str, Any]] = None,
    ) -> F: ...

    @overload
    def command(
        self,
        name: Optional[str] = None,
        *,
        mutates_session: bool = False,
        internal: bool = False,
        args_schema: Optional[Dict[str, Any]] = None,
    ) -> Callable[[F], F]: ...

    def command(
        self,
        name: Any = None,
        *,
        mutates_session: bool = False,
        internal: bool = False,
        args_schema: Optional[Dict[str, Any]] = None,
    ) -> Any:
        """Decorator registering a handler; see the module-level ``command``."""
        flags: Dict[str, Any] = {
            "mutates_session": mutates_session,
            "internal": internal,
            "args_schema": args_schema,
        }
        if callable(name):
            func = name
            self.register(func.__name__, func, **flags)
            return func

        def decorator(func: F) -> F:
            self.register(name or func.__name__, func, **flags)
            return func

        return decorator

    def on_session_cleanup(self, func: CleanupHook) -> CleanupHook:
        """Register ``func(session_id, session)`` to run when a session is cleaned up."""
        if not callable(func):
            raise TypeError(f"session cleanup hook {func!r} is not callable")
        self._cleanup_hooks.append(func)
        return func

    def session_snapshot(self, func: Any = None, *, part: Optional[str] = None) -> Any:
        """Decorator registering ``func(session) -> JSON``; see ``snapshots``."""

        def decorator(func: F) -> F:
            self.snapshots.add_snapshot(func, part)
            self.version += 1
            return func

        return decorator(func) if callable(func) else decorator

    def session_restore(self, func: Any = None, *, part: Optional[str] = None) -> Any:
        """Decorator registering ``func(session, snapshot)``; see ``snapshots``."""

        def decorator(func: F) -> F:
            self.snapshots.add_restore(func, part)
            self.version += 1
            return func

        return decorator(func) if callable(func) else decorator

    def snapshot_covers(self, spec: CommandSpec) -> bool:
        """Whether a session part with both hooks covers ``spec``'s module."""
        module = getattr(spec.func, "__module__", None)
        return isinstance(module, str) and self.snapshots.covers(module)

    def get(self, name: str) -> Optional[CommandSpec]:
        """The command registered under ``name``, or ``None``."""
        return self._commands.get(name)

    def names(self) -> List[str]:
        """Registered command names, sorted."""
        return sorted(self._commands)

    @property
    def commands(self) -> Mapping[str, CommandSpec]:
        """Read-only view of the registered commands by name."""
        return dict(self._commands)

    def run_cleanup_hooks(self, session_id: str, session: Dict[str, Any]) -> int:
        """Run every cleanup hook; log (and count) hook failures instead of raising."""
        failures = 0
        for hook in list(self._cleanup_hooks):
            try:
                hook(session_id, session)
            except Exception:
                failures += 1
                _log.exception(
                    "session cleanup hook %s failed for session %r",
                    _qualified_name(hook),
                    session_id,
                )
        return failures

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def __len__(self) -> int:
        return len(self._commands)


default_registry = Registry()
"""The registry served by ``python -m snakepool_worker``."""


@overload
def command(
    name: F,
    *,
    mutates_session: bool = False,
    internal: bool = False,
    args_schema: Optional[Dict[str, Any]] = None,
) -> F: ...


@overload
def command(
    name: Optional[str] = None,
    *,
    mutates_session: bool = False,
    internal: bool = False,
    args_schema: Optional[Dict[str, Any]] = None,
) -> Callable[[F], F]: ...


def command(
    name: Any = None,
    *,
    mutates_session: bool = False,
    internal: bool = False,
    args_schema: Optional[Dict[str, Any]] = None,
) -> Any:
    """Register a command handler with the default registry.

    Usable as ``@command("add")``, ``@command()`` or bare ``@command``; the name defaults
    to the function's name. The handler is called as ``fn(args, ctx)`` and must return
    a JSON-serialisable value. What the handler is decides how it runs:

    - ``def``: sync, run inline on the worker's loop thread, alone (the host sends
      nothing else while it runs; a blocking call is fine here).
    - ``async def``: concurrent, run as an asyncio task; up to ``max_concurrency`` calls
      overlap. It must not block (no ``time.sleep``, no blocking I/O; use ``await`` or
      ``asyncio.to_thread``): a blocked loop cannot even answer the host's heartbeat
      ping. A cancel from the host raises ``asyncio.CancelledError`` at its current
      ``await``; it may catch it to clean up, and the call is answered ``Cancelled``.
    - a generator: streaming; each ``yield``ed value is sent as a chunk (at most
      ``stream_window`` ahead of the host's credit; the generator is not advanced while
      out of credit), and its ``return`` value is the result. Not concurrent.
    - an async generator: concurrent and streaming; its result is ``null``, or the value
      of a ``Final`` it yields last (``yield Final(result)`` ends the stream).

    ``ctx`` is per call; with concurrent calls each task also runs in its own copy of
    the ``contextvars`` context. ``mutates_session=True`` tells the host that the command
    changes session state (the host journals such calls to rebuild a session on another
    worker). ``internal=True`` marks a command that only the host may send: the manifest
    flags it and the host refuses clients' calls to it. Registering a name twice raises
    ``ValueError``.

    ``args_schema`` describes the ``args`` object as a JSON Schema, for callers (the
    manifest carries it, and the host lists it at ``GET /v1/commands``)::

        @command("add", args_schema={
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        })

    It must be JSON data with ``"type": "object"`` (``checked_args_schema`` says what
    else is checked; a bad one raises at registration). Neither the worker nor the host
    checks calls against it: the handler still checks its arguments itself.
    """
    return default_registry.command(
        name, mutates_session=mutates_session, internal=internal, args_schema=args_schema
    )


def session_snapshot(func: Any = None, *, part: Optional[str] = None) -> Any:
    """Register ``fn(session) -> JSON``: this module's part of a session, as JSON.

    Usable bare or as ``@session_snapshot(part="my_package")``; the part defaults to the
    function's module. See ``snakepool_worker.snapshots``.
    """
    return default_registry.session_snapshot(func, part=part)


def session_restore(func: Any = None, *, part: Optional[str] = None) -> Any:
    """Register ``fn(session, snapshot)``: rebuild this module's part of a fresh session."""
    return default_registry.session_restore(func, part=part)


def on_session_cleanup(func: CleanupHook) -> CleanupHook:
    """Register a hook ``fn(session_id, session)`` run by ``cleanup_session``.

    Hooks run in registration order; an exception in a hook is logged and does not stop
    the cleanup.
    """
    return default_registry.on_session_cleanup(func)
