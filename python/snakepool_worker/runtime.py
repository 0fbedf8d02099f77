"""The worker process: start-up, request dispatch and the concurrency model.

``python -m snakepool_worker [--module M]... [--preload M]... [--no-default-modules]
[--worker-id ID] [--max-frame-bytes N] [--max-concurrency N]``

Start-up order: the protocol channel is moved off stdout, the ``--preload`` modules are
imported (to warm them; they register nothing by contract), then the command modules:
the default modules first, then ``SNAKEPOOL_MODULES``, then each ``--module``. Only then
is the handshake answered.

Default modules are command modules imported when what they bridge is installed:
``snakepool_worker.dspy`` when ``dspy`` can be found (found, not imported: DSPy itself is
imported on the first DSPy command, or at start-up with ``--preload dspy``).

Concurrency model
-----------------
One asyncio event loop, on the main thread, runs the frame loop (``loop.py``): it reads
request frames as they arrive and writes replies without ever blocking on the pipe.
What a call may overlap with depends on its handler (see ``registry.py``):

- A **sync** handler (``def``) runs inline on the loop thread, alone: while it runs
  nothing else happens in the worker, not even reading the next frame. This is exactly
  the one-call-at-a-time worker of protocol v1; a host that sends one request at a time
  sees no difference at all. A host may also send sync calls ahead (pipelining): they
  wait in the pipe and run one after another, in order, each only once the replies
  before it are wholly written to the pipe. So the first request without a reply is
  the only one that can have started, and if the worker dies, every request after it
  is known not to have run. The built-in ``ping`` is such a handler: served on the loop
  thread without a task, it answers at once while async calls are in flight, and not
  at all while the loop is blocked (by a sync call, or by an ``async def`` handler that
  blocks instead of awaiting), which is what the host's heartbeat is for.
- A **concurrent** handler (``async def``) runs as an asyncio task, in its own copy of
  the ``contextvars`` context with its own ``ctx``. Tasks overlap each other (and the
  sync calls served between their awaits) up to ``max_concurrency`` calls in
  flight; a request beyond that fails at once with ``Overloaded``. Sync calls do not
  count: they never stay in flight while another frame is read.
- A **streaming** handler (a generator function, sync or async) runs as a task that
  sends each yielded value as a chunk before the final reply (``calls.py``). A sync
  generator is advanced one step at a time on the loop thread and is not concurrent; an
  async generator is concurrent. Both count against ``max_concurrency``.
- A concurrent or streaming command may also have an **inline** handler (see
  ``registry.py``), a plain function tried first on the loop thread: a call it answers
  is served at once like a sync call (no task; nothing else runs meanwhile, so a cancel
  frame finds nothing in flight), and a call it hands back (``RUN_AS_TASK``) runs as a
  task as above. At ``max_concurrency`` calls in flight it is not tried: the call is
  refused with ``Overloaded``, as it would be without one.
- A **cancel** frame cancels the call's task: the handler gets ``CancelledError`` at its
  current ``await`` (or ``yield``, for a stream waiting for credit), may catch it to
  clean up, and the call is answered with a ``Cancelled`` failure. Cancelling an id that
  is unknown or already answered does nothing, and sends nothing: a sync call cannot be
  cancelled (its cancel frame is only read once it has finished).

Frames (each a 4-byte big-endian length and a UTF-8 JSON object; ids are u64):

- host → worker: request ``{"id", "command", "args"}``; cancel ``{"id", "cancel": true}``;
  credit ``{"id", "credit": n}`` (n a positive integer: n more chunks may be sent). A
  frame with a ``command`` is a request, whatever else it holds; cancel and credit
  frames have none, are never answered, and one with a bad value is logged and dropped.
- worker → host: success ``{"id", "success": true, "result"}`` (plus ``"journal":
  {"command", "args"}`` when the handler called ``ctx.journal_as``); failure ``{"id",
  "success": false, "error": {"type", "message", "traceback"}}``; chunk ``{"id",
  "chunk"}``. Every request gets exactly one final reply (success or failure); a
  stream's chunks all come before it. Replies and chunks of different calls interleave
  in any order.
- Flow control: a streaming call may have at most ``stream_window`` (16) chunks not yet
  covered by credit; out of credit, its generator is not advanced until a credit frame
  arrives. A sync generator's result is its ``return`` value (null by default); an async
  generator's result is null.
- Error types added by the v1 additions: ``Overloaded`` (too many calls in flight),
  ``Cancelled``, and ``BadRequest`` for a request whose id is still in flight.

The manifest (the handshake ``ping``'s reply) announces all of it: per command
``"concurrent": true`` and ``"streams": true`` where they apply, and at the top level
``"concurrency": {"max_concurrency": N, "stream_window": W, "pipelining": true}``
(``pipelining``: sync calls sent ahead run in order, each once the replies before it
are in the pipe, as described above).

Environment:
    SNAKEPOOL_MODULES          comma-separated modules to import (before any ``--module``)
    SNAKEPOOL_PRELOAD          comma-separated modules to preload (before any ``--preload``)
    SNAKEPOOL_DEFAULT_MODULES  ``0`` (or false/no/off) disables the default modules
    SNAKEPOOL_WORKER_ID        worker id when ``--worker-id`` is not given
    SNAKEPOOL_MAX_FRAME_BYTES  maximum frame size when ``--max-frame-bytes`` is not given
    SNAKEPOOL_MAX_CONCURRENCY  calls in flight when ``--max-concurrency`` is not given
    SNAKEPOOL_LOG_LEVEL        logging level for stderr (default INFO)
    SNAKEPOOL_JSON             ``json`` forces the standard library JSON codec

Exit codes: 0 on end of input, broken pipe or ``shutdown``; 2 for bad arguments; 3 when a
command module or a preload module fails to import.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextvars
import gc
import importlib
import importlib.util
import io
import json
import logging
import os
import sys
import threading
import time
import traceback
import types
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple, Union

from . import __version__
from .builtins import register_builtins
from .calls import UNLIMITED_CREDIT, Call, CollectedOutput, safe_str as _safe_str
from .protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    JSON_BACKEND,
    LIMIT_MAX_FRAME_BYTES,
    MIN_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    FrameReader,
    FrameWriter,
    SerializationError,
    encode_failure,
    encode_success,
    encode_success_journaled,
    is_valid_id,
    loads,
)
from . import watchdog
from .registry import (
    RUN_AS_TASK,
    SYNC,
    CommandSpec,
    Context,
    Handler,
    Registry,
    default_registry,
)

COLLECT_DELAY = 1.0
"""Seconds between dropping a session and collecting what it left in cycles."""


_malloc_trim: object = None


def release_freed_memory() -> None:
    """Hand the heap that dropped sessions freed back to the system: glibc's allocator
    keeps freed memory in its arenas, so a worker that once held many sessions would
    otherwise keep their size. Does nothing where ``malloc_trim`` is missing."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


EXIT_OK = 0
EXIT_USAGE = 2
EXIT_IMPORT_FAILED = 3

LOG_FORMAT = "%(asctime)s %(levelname)s [%(worker_id)s] %(name)s: %(message)s"
EXCERPT_BYTES = 80
PYTHON_VERSION = sys.version.split()[0]

DEFAULT_MAX_CONCURRENCY = 32
"""Calls in flight (tasks) allowed by default; ``--max-concurrency`` changes it."""

LIMIT_MAX_CONCURRENCY = 65536
"""Largest accepted ``--max-concurrency``."""

STREAM_WINDOW = 16
"""Chunks a streaming call may send ahead of the host's credit."""

_COROUTINE = types.CoroutineType

Launcher = Callable[[Call], None]
"""Starts a call's task; set by the frame loop while it serves (``Runtime.attach``)."""

DEFAULT_MODULES: Tuple[Tuple[str, str], ...] = (("dspy", "snakepool_worker.dspy"),)
"""``(requirement, command module)``: the module is imported when the requirement is found."""

_FALSE_WORDS = frozenset({"0", "false", "no", "off"})

register_builtins(default_registry)

_log = logging.getLogger("snakepool_worker.runtime")


class WorkerIdFilter(logging.Filter):
    """Adds ``record.worker_id`` so every stderr line names the worker."""

    def __init__(self, worker_id: str = "-") -> None:
        super().__init__()
        self.worker_id = worker_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker_id = self.worker_id
        return True


LOG_FILTER = WorkerIdFilter()
"""The filter installed on the stderr log handler; follows the runtime's worker id."""


def _excerpt(payload: Union[bytes, bytearray]) -> str:
    head = bytes(payload[:EXCERPT_BYTES])
    return repr(head) + ("..." if len(payload) > EXCERPT_BYTES else "")


def _format_exception(exc: BaseException) -> str:
    tb = exc.__traceback__
    # The first frame is the dispatcher's own; the handler's frames follow it.
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    parts = line.split()
                    return int(parts[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Runtime:
    """State of one worker: registry, sessions, counters, calls in flight, and dispatch.

    ``in_handshake`` is true only while the first request with a usable id is served:
    the host's handshake ping, the one request that may name the worker. ``calls`` holds
    the calls that run as tasks, by request id, until their final reply is written.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        worker_id: str,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        modules: Sequence[str] = (),
        preloaded: Sequence[str] = (),
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        stream_window: int = STREAM_WINDOW,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if stream_window < 1:
            raise ValueError(f"stream_window must be at least 1, got {stream_window}")
        self.registry = registry
        self._worker_id = worker_id
        LOG_FILTER.worker_id = worker_id
        self.max_frame_bytes = max_frame_bytes
        self.max_concurrency = max_concurrency
        self.stream_window = stream_window
        self.modules: List[str] = list(modules)
        self.preloaded: List[str] = list(preloaded)
        self.sessions: Dict[str, Dict[str, Any]] = {}
        self.calls: Dict[int, Call] = {}
        self.pid = os.getpid()
        self.requests = 0
        self.errors = 0
        self.cancelled = 0
        self.dropped_frames = 0
        self.command_counts: Dict[str, int] = {}
        self.started = time.monotonic()
        self.stopping = False
        self.in_handshake = False
        self._handshake_done = False
        self._collection_due = False
        self._launcher: Optional[Launcher] = None
        self._manifest_key: Optional[Tuple[Any, ...]] = None
        self._manifest: Dict[str, Any] = {}

    # -- state used by the built-in commands ------------------------------------------------

    @property
    def worker_id(self) -> str:
        """This worker's id (set at start-up, or by the host's handshake ping)."""
        return self._worker_id

    @worker_id.setter
    def worker_id(self, value: str) -> None:
        self._worker_id = value
        LOG_FILTER.worker_id = value

    def manifest(self) -> Dict[str, Any]:
        """What this worker offers; rebuilt only when the registry or identity changed."""
        pid = os.getpid()
        key = (
            self.registry.version,
            self._worker_id,
            pid,
            self.max_frame_bytes,
            self.max_concurrency,
            self.stream_window,
            len(self.modules),
            len(self.preloaded),
        )
        if key != self._manifest_key:
            self._manifest = {
                "runtime": "snakepool_worker",
                "runtime_version": __version__,
                "protocol_version": PROTOCOL_VERSION,
                "pid": pid,
                "python_version": PYTHON_VERSION,
                "python_executable": sys.executable,
                "worker_id": self._worker_id,
                "max_frame_bytes": self.max_frame_bytes,
                "json_backend": JSON_BACKEND,
                "modules": list(self.modules),
                "preloaded": list(self.preloaded),
                "concurrency": {
                    "max_concurrency": self.max_concurrency,
                    "stream_window": self.stream_window,
                    "pipelining": True,
                },
                "commands": {
                    name: self._describe(spec) for name, spec in sorted(self.registry.commands.items())
                },
            }
            self._manifest_key = key
        return self._manifest

    def _describe(self, spec: CommandSpec) -> Dict[str, Any]:
        """A command's manifest entry with the module defining it; a mutating command
        also says whether a session snapshot covers it (so the host may compact its
        journal)."""
        entry = spec.describe()
        module = getattr(spec.func, "__module__", None)
        if isinstance(module, str):
            entry["module"] = module
        if spec.mutates_session and self.registry.snapshot_covers(spec):
            entry["snapshot"] = True
        return entry

    def stats(self) -> Dict[str, Any]:
        """Counters reported by ``get_stats``."""
        return {
            "worker_id": self._worker_id,
            "pid": os.getpid(),
            "requests": self.requests,
            "errors": self.errors,
            "cancelled": self.cancelled,
            "in_flight": len(self.calls),
            "dropped_frames": self.dropped_frames,
            "uptime_s": time.monotonic() - self.started,
            "sessions": len(self.sessions),
            "rss_bytes": _rss_bytes(),
            "commands": dict(self.command_counts),
        }

    def drop_session(self, session_id: str) -> bool:
        """Run the cleanup hooks for ``session_id`` and forget its state.

        The hooks run even when this worker holds no state for the session (they then
        receive an empty dict), so resources keyed by session id elsewhere are released.
        Returns whether a session dict existed.
        """
        session = self.sessions.pop(session_id, None)
        existed = session is not None
        self.registry.run_cleanup_hooks(session_id, session if session is not None else {})
        if existed:
            self._collect_soon()
        return existed

    def _collect_soon(self) -> None:
        """Free what dropped sessions leave in reference cycles (DSPy's programs and LMs
        keep some), with one full collection a second at most while sessions are being
        dropped, instead of whenever the cyclic collector would next run. Only while a
        frame loop serves (a full collection takes tens of milliseconds with DSPy)."""
        if self._collection_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._collection_due = True

        def collect() -> None:
            self._collection_due = False
            gc.collect()
            release_freed_memory()

        loop.call_later(COLLECT_DELAY, collect)

    def request_stop(self) -> None:
        """Stop the loop after the current reply has been written (calls in flight are
        then cancelled)."""
        self.stopping = True

    # -- replies ----------------------------------------------------------------------------

    def failure(self, request_id: int, error_type: str, message: str, tb: str = "") -> bytes:
        """A failure reply payload (counted in ``errors``)."""
        self.errors += 1
        return encode_failure(request_id, error_type, message, tb, self.max_frame_bytes)

    def encode_result(self, request_id: int, name: str, result: Any, ctx: Context) -> bytes:
        """The success reply for ``result`` (with the journal hint, if any), or the
        failure that replaces it when it cannot be encoded or is too large."""
        try:
            journal = ctx._journal
            if journal is None:
                reply = encode_success(request_id, result)
            else:
                reply = encode_success_journaled(request_id, result, journal)
        except SerializationError as exc:
            return self.failure(
                request_id,
                "SerializationError",
                f"result of command {name!r} is not JSON-serialisable: {exc}",
            )
        if len(reply) > self.max_frame_bytes:
            return self.failure(
                request_id,
                "ResultTooLarge",
                f"reply to command {name!r} is {len(reply)} bytes, larger than the maximum "
                f"frame size of {self.max_frame_bytes} bytes",
            )
        return reply

    # -- dispatch ---------------------------------------------------------------------------

    def _drop(self, payload: Union[bytes, bytearray], reason: str) -> None:
        self.dropped_frames += 1
        _log.error(
            "dropping frame of %d bytes with no usable request id: %s; frame starts with %s",
            len(payload),
            reason,
            _excerpt(payload),
        )

    def _undecodable(self, payload: Union[bytes, bytearray], exc: Exception) -> Optional[bytes]:
        """Handle a frame that is not valid UTF-8 JSON; reply if an id can be recovered."""
        reason = f"frame is not valid UTF-8 JSON ({type(exc).__name__}: {_safe_str(exc)})"
        request_id = _recover_id(payload)
        if request_id is None:
            self._drop(payload, reason)
            return None
        self.requests += 1
        self.in_handshake = False
        self._handshake_done = True
        _log.warning("request %d: %s", request_id, reason)
        return self.failure(request_id, "ProtocolError", reason)

    def _control(self, request_id: int, message: Dict[str, Any]) -> None:
        """A cancel or credit frame: act on the call in flight, never reply."""
        call = self.calls.get(request_id)
        if "cancel" in message:
            if message["cancel"] is not True:
                _log.error("dropping cancel frame for %d: 'cancel' must be true", request_id)
                self.dropped_frames += 1
            elif call is not None:
                call.cancel("cancelled by the host")
            return
        credit = message["credit"]
        if type(credit) is not int or credit < 1:
            _log.error(
                "dropping credit frame for %d: 'credit' must be a positive integer, got %.40r",
                request_id,
                credit,
            )
            self.dropped_frames += 1
        elif call is not None:
            call.grant(credit)

    def handle_frame(
        self,
        payload: Union[bytes, bytearray],
        on_chunk: Optional[Callable[[bytes], None]] = None,
    ) -> Optional[bytes]:
        """Serve one frame; return the reply payload, or ``None`` for no reply (yet).

        Sync handlers run here and now, and so do inline handlers (``registry.py``) for
        the calls they answer. A call that runs as a task is launched and answered later
        when the frame loop is serving (``None`` is returned); without a frame loop
        (in-process use, tests) it runs to completion on a private event loop and its
        final reply is returned, its chunk payloads passed to ``on_chunk`` if given.
        Cancel and credit frames are never answered.
        """
        try:
            message = loads(payload)
        except ValueError as exc:  # JSON errors and UnicodeDecodeError are ValueErrors
            return self._undecodable(payload, exc)
        if type(message) is not dict:
            self._drop(payload, f"frame is a JSON {type(message).__name__}, not an object")
            return None
        if "id" not in message:
            self._drop(payload, "request has no 'id'")
            return None
        request_id = message["id"]
        if not is_valid_id(request_id):
            reason = f"request 'id' must be an integer in 0..2**64-1, got {request_id!r:.40}"
            self._drop(payload, reason)
            return None
        name = message.get("command")
        if type(name) is not str and ("cancel" in message or "credit" in message):
            self._control(request_id, message)
            return None
        self.requests += 1
        self.in_handshake = not self._handshake_done
        self._handshake_done = True

        if type(name) is not str:
            return self.failure(request_id, "BadRequest", "request 'command' must be a string")
        args = message.get("args")
        if args is None:
            args = {}
        elif type(args) is not dict:
            return self.failure(
                request_id,
                "BadRequest",
                f"request 'args' must be an object, got {type(args).__name__}",
            )
        spec = self.registry.get(name)
        if spec is None:
            # The pool's own commands are no business of a caller's.
            commands = self.registry.commands
            known = ", ".join(n for n in self.registry.names() if not commands[n].internal)
            return self.failure(
                request_id, "UnknownCommand", f"unknown command {name!r} (known: {known})"
            )
        counts = self.command_counts
        counts[name] = counts.get(name, 0) + 1
        session_id = args.get("session_id")
        if session_id is not None and type(session_id) is not str:
            return self.failure(request_id, "BadRequest", "args.session_id must be a string")
        calls = self.calls
        if calls and request_id in calls:
            return self.failure(
                request_id, "BadRequest", f"request id {request_id} is already in flight"
            )

        ctx = Context(self._worker_id, session_id, spec.log, request_id, name, self.sessions, self)
        if spec.kind is not SYNC:
            inline = spec.inline
            if inline is not None and len(calls) < self.max_concurrency:
                reply = self._serve_inline(inline, request_id, name, args, ctx)
                if reply is not None:
                    return reply
            return self._start(Call(self, request_id, name, spec, args, ctx, 0), on_chunk)
        try:
            result = spec.func(args, ctx)
        except Exception as exc:
            return self.failure(
                request_id, type(exc).__name__, _safe_str(exc), _format_exception(exc)
            )
        if type(result) is _COROUTINE:
            result.close()
            return self.failure(
                request_id,
                "TypeError",
                f"the handler of command {name!r} returned a coroutine: declare it with "
                "'async def' so the worker runs it as a task",
            )
        return self._success(request_id, name, result, ctx)

    def _serve_inline(
        self, inline: Handler, request_id: int, name: str, args: Dict[str, Any], ctx: Context
    ) -> Optional[bytes]:
        """The reply of a concurrent command's inline handler, run in a copy of the current
        context as the call's task would be; ``None`` when it returns ``RUN_AS_TASK``."""
        try:
            result = contextvars.copy_context().run(inline, args, ctx)
        except Exception as exc:
            return self.failure(
                request_id, type(exc).__name__, _safe_str(exc), _format_exception(exc)
            )
        if result is RUN_AS_TASK:
            return None
        return self._success(request_id, name, result, ctx)

    def _success(self, request_id: int, name: str, result: Any, ctx: Context) -> bytes:
        """The reply to a call that returned ``result``: ``encode_result``, with a quicker
        way for the common reply (no journal, encodable, small enough)."""
        if ctx._journal is None:
            try:
                reply = encode_success(request_id, result)
            except SerializationError:
                reply = None
            if reply is not None and len(reply) <= self.max_frame_bytes:
                return reply
        return self.encode_result(request_id, name, result, ctx)

    def _start(
        self, call: Call, on_chunk: Optional[Callable[[bytes], None]]
    ) -> Optional[bytes]:
        in_flight = len(self.calls)
        if in_flight >= self.max_concurrency:
            return self.failure(
                call.request_id,
                "Overloaded",
                f"{in_flight} calls in flight, the most this worker takes "
                f"(max_concurrency {self.max_concurrency}); command {call.command!r} refused",
            )
        launcher = self._launcher
        if launcher is None:
            return self._run_in_process(call, on_chunk)
        call.credit = self.stream_window
        self.calls[call.request_id] = call
        launcher(call)
        return None

    def _run_in_process(
        self, call: Call, on_chunk: Optional[Callable[[bytes], None]]
    ) -> bytes:
        """Run a task call to completion on a private event loop (no frame loop)."""
        call.credit = UNLIMITED_CREDIT
        call.output = CollectedOutput(on_chunk)
        loop = asyncio.new_event_loop()
        try:
            task = loop.create_task(call.run())
            call.task = task
            self.calls[call.request_id] = call
            try:
                return loop.run_until_complete(task)
            except asyncio.CancelledError:
                return call.cancelled_reply()
            finally:
                self.calls.pop(call.request_id, None)
                loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def attach(self, launcher: Optional[Launcher]) -> None:
        """Set (or with ``None`` clear) what starts the tasks of calls; the frame loop's."""
        self._launcher = launcher

    # -- the loop ---------------------------------------------------------------------------

    def serve_fds(self, in_fd: int, out_fd: int, max_frame_bytes: Optional[int] = None) -> int:
        """Serve requests from ``in_fd``, replying on ``out_fd``, until end of input, a
        broken pipe or ``shutdown``; return the exit code. See ``loop.FrameServer``."""
        from .loop import FrameServer

        return FrameServer(self, in_fd, out_fd, max_frame_bytes=max_frame_bytes).run()

    def serve(self, reader: FrameReader, writer: FrameWriter) -> int:
        """``serve_fds`` on the fds of ``reader`` and ``writer`` (with the reader's frame
        limit); they must not have read or buffered anything yet."""
        return self.serve_fds(reader.fd, writer.fd, reader.max_frame_bytes)


def _recover_id(payload: Union[bytes, bytearray]) -> Optional[int]:
    """Best-effort id from a frame that failed to decode (bad UTF-8, trailing garbage)."""
    text = bytes(payload).decode("utf-8", "replace").lstrip()
    try:
        message, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or not is_valid_id(message.get("id")):
        return None
    request_id: int = message["id"]
    return request_id


# --------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------


def claim_stdio() -> Tuple[int, int]:
    """Move the protocol channel off fds 0 and 1; return ``(input_fd, output_fd)``.

    The protocol output becomes a private duplicate of fd 1, and fd 1 itself (with
    ``sys.stdout``) is pointed at stderr, so ``print()``, C-level writes and child
    processes cannot corrupt frames. Likewise the protocol input becomes a private
    duplicate of fd 0 and fd 0 is pointed at /dev/null, so nothing else can consume
    request bytes. The duplicates are not inherited by child processes.
    """
    try:
        sys.stdout.flush()
    except (AttributeError, OSError, ValueError):
        pass
    out_fd = os.dup(1)
    in_fd = os.dup(0)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(devnull, 0)
    finally:
        os.close(devnull)
    sys.stdout = io.open(
        1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
    )
    # The frame loop makes both non-blocking while it serves.
    os.set_blocking(in_fd, True)
    os.set_blocking(out_fd, True)
    return in_fd, out_fd


def _log_level(value: str) -> Tuple[int, bool]:
    text = value.strip()
    if text.isdigit():
        return int(text), True
    level = logging.getLevelName(text.upper())
    if isinstance(level, int):
        return level, True
    return logging.INFO, False


def configure_logging() -> None:
    """Send log records to stderr with the worker id, at ``SNAKEPOOL_LOG_LEVEL``."""
    raw_level = os.environ.get("SNAKEPOOL_LOG_LEVEL", "INFO")
    level, valid = _log_level(raw_level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(LOG_FILTER)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    if not valid:
        _log.warning("unknown SNAKEPOOL_LOG_LEVEL %r; using INFO", raw_level)


def _frame_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not MIN_MAX_FRAME_BYTES <= value <= LIMIT_MAX_FRAME_BYTES:
        raise argparse.ArgumentTypeError(
            f"must be between {MIN_MAX_FRAME_BYTES} and {LIMIT_MAX_FRAME_BYTES}, got {value}"
        )
    return value


def _concurrency_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= LIMIT_MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(
            f"must be between 1 and {LIMIT_MAX_CONCURRENCY}, got {value}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m snakepool_worker``."""
    parser = argparse.ArgumentParser(
        prog="snakepool_worker",
        description="Serve registered Python commands over the snakepool pipe protocol "
        "(requests on stdin, replies on stdout, logs on stderr).",
    )
    parser.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="M",
        help="import module M, which registers commands (repeatable; "
        "also SNAKEPOOL_MODULES, comma-separated)",
    )
    parser.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="M",
        help="import module M at start-up only to warm it, e.g. dspy (repeatable; "
        "also SNAKEPOOL_PRELOAD, comma-separated)",
    )
    parser.add_argument(
        "--no-default-modules",
        action="store_true",
        help="do not import the default command modules (snakepool_worker.dspy when DSPy "
        "is installed); also SNAKEPOOL_DEFAULT_MODULES=0",
    )
    parser.add_argument(
        "--worker-id", metavar="ID", help="worker id (default: SNAKEPOOL_WORKER_ID or worker-PID)"
    )
    parser.add_argument(
        "--max-frame-bytes",
        type=_frame_limit,
        metavar="N",
        help=f"largest frame accepted or sent (default: SNAKEPOOL_MAX_FRAME_BYTES or "
        f"{DEFAULT_MAX_FRAME_BYTES})",
    )
    parser.add_argument(
        "--max-concurrency",
        type=_concurrency_limit,
        metavar="N",
        help=f"most calls of async and streaming commands in flight at once; more are "
        f"refused with Overloaded (default: SNAKEPOOL_MAX_CONCURRENCY or "
        f"{DEFAULT_MAX_CONCURRENCY})",
    )
    parser.add_argument("--version", action="version", version=f"snakepool_worker {__version__}")
    return parser


class _Options:
    __slots__ = ("modules", "preload", "worker_id", "max_frame_bytes", "max_concurrency")

    def __init__(
        self,
        modules: List[str],
        preload: List[str],
        worker_id: str,
        max_frame_bytes: int,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        self.modules = modules
        self.preload = preload
        self.worker_id = worker_id
        self.max_frame_bytes = max_frame_bytes
        self.max_concurrency = max_concurrency


def _name_list(*sources: Sequence[str]) -> List[str]:
    names: List[str] = []
    for source in sources:
        for name in source:
            name = name.strip()
            if name and name not in names:
                names.append(name)
    return names


def find_default_modules() -> List[str]:
    """The default command modules whose requirement is installed (found, not imported)."""
    found: List[str] = []
    for requirement, module in DEFAULT_MODULES:
        try:
            spec = importlib.util.find_spec(requirement)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            found.append(module)
    return found


def default_modules_enabled(no_default_modules: bool = False) -> bool:
    """False with ``--no-default-modules`` or ``SNAKEPOOL_DEFAULT_MODULES=0``."""
    if no_default_modules:
        return False
    value = os.environ.get("SNAKEPOOL_DEFAULT_MODULES", "").strip().lower()
    return value not in _FALSE_WORDS


def _flag_or_env(
    parser: argparse.ArgumentParser,
    flag: Optional[int],
    env: str,
    parse: Callable[[str], int],
    default: int,
) -> int:
    """The flag's value, else the environment variable's (checked by ``parse``), else
    ``default``; a bad variable is a usage error naming it."""
    if flag is not None:
        return flag
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        return parse(text)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"{env}: {exc}")


def parse_options(argv: Optional[Sequence[str]]) -> _Options:
    """Combine command-line flags and environment; raises ``SystemExit`` on bad input."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    defaults = find_default_modules() if default_modules_enabled(ns.no_default_modules) else []
    modules = _name_list(
        defaults, os.environ.get("SNAKEPOOL_MODULES", "").split(","), list(ns.module)
    )
    preload = _name_list(os.environ.get("SNAKEPOOL_PRELOAD", "").split(","), list(ns.preload))
    max_frame_bytes = _flag_or_env(
        parser, ns.max_frame_bytes, "SNAKEPOOL_MAX_FRAME_BYTES", _frame_limit, DEFAULT_MAX_FRAME_BYTES
    )
    max_concurrency = _flag_or_env(
        parser,
        ns.max_concurrency,
        "SNAKEPOOL_MAX_CONCURRENCY",
        _concurrency_limit,
        DEFAULT_MAX_CONCURRENCY,
    )
    worker_id = ns.worker_id or os.environ.get("SNAKEPOOL_WORKER_ID") or f"worker-{os.getpid()}"
    return _Options(modules, preload, worker_id, max_frame_bytes, max_concurrency)


def _import_or_report(name: str, what: str) -> bool:
    """Import ``name``; on failure print the traceback and a summary line, return False."""
    try:
        importlib.import_module(name)
    except (Exception, SystemExit) as exc:
        traceback.print_exc(file=sys.stderr)
        sys.stderr.write(
            f"snakepool_worker: failed to {what} {name!r}: "
            f"{type(exc).__name__}: {_safe_str(exc)}\n"
        )
        sys.stderr.flush()
        return False
    return True


def preload_modules(runtime: Runtime, modules: Sequence[str]) -> int:
    """Import the preload modules; on failure report on stderr and return exit code 3."""
    for name in modules:
        if not _import_or_report(name, "preload module"):
            return EXIT_IMPORT_FAILED
        runtime.preloaded.append(name)
    return EXIT_OK


def import_modules(runtime: Runtime, modules: Sequence[str]) -> int:
    """Import the command modules; on failure report on stderr and return exit code 3."""
    for name in modules:
        if not _import_or_report(name, "import module"):
            return EXIT_IMPORT_FAILED
        runtime.modules.append(name)
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a worker; return the process exit code."""
    try:
        options = parse_options(argv)
    except SystemExit as exc:
        if exc.code is None:
            return EXIT_OK
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        in_fd, out_fd = claim_stdio()
    except OSError as exc:
        sys.stderr.write(f"snakepool_worker: cannot set up the protocol channel: {exc}\n")
        return EXIT_USAGE
    configure_logging()
    watchdog.install_termination_handler()
    watchdog.start_host_watchdog()
    runtime = Runtime(
        default_registry,
        worker_id=options.worker_id,
        max_frame_bytes=options.max_frame_bytes,
        max_concurrency=options.max_concurrency,
    )
    status = preload_modules(runtime, options.preload)
    if status == EXIT_OK:
        status = import_modules(runtime, options.modules)
    if status != EXIT_OK:
        return status
    _log.debug(
        "ready: pid %d, python %s, modules %s, preloaded %s, json %s",
        os.getpid(),
        PYTHON_VERSION,
        runtime.modules,
        runtime.preloaded,
        JSON_BACKEND,
    )
    try:
        return runtime.serve_fds(in_fd, out_fd)
    except KeyboardInterrupt:
        return 130
    finally:
        # Processes a handler left behind in the worker's group end with the worker.
        watchdog.kill_group_members()


def exit_process(code: int) -> NoReturn:
    """Exit with ``code``, even when handler code left non-daemon threads running.

    The interpreter would otherwise wait for those threads forever, and a worker that
    outlives its host's pipe is an orphan. In that case the ``atexit`` handlers are run
    and the standard streams flushed before the process ends with ``os._exit``.
    """
    main_thread = threading.main_thread()
    stragglers = [
        thread.name
        for thread in threading.enumerate()
        if thread is not main_thread and not thread.daemon and thread.is_alive()
    ]
    if not stragglers:
        sys.exit(code)
    _log.warning(
        "exiting with %d non-daemon thread(s) still running: %s",
        len(stragglers),
        ", ".join(stragglers),
    )
    try:
        atexit._run_exitfuncs()
    except BaseException:  # nothing may stop the exit now
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(code)


def console_main() -> NoReturn:
    """Entry point of the ``snakepool-worker`` console script."""
    exit_process(main())
