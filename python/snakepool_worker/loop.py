"""The frame loop: an asyncio event loop serving the protocol pipes of one worker.

``FrameServer(runtime, in_fd, out_fd).run()`` owns the two protocol fds (made
non-blocking) until end of input, a broken output pipe or ``shutdown``, and returns the
exit code. What it promises (the full model is in ``runtime.py``):

- Input is read with ``loop.add_reader`` (up to 64 KiB per read) and cut into frames by
  a ``FrameDecoder``: frame lengths are checked before anything is allocated, oversized
  frames are skipped, and end of input (also in the middle of a frame) ends the worker.
  A read that brings exactly one whole frame, with nothing pending, is cut here after
  the same size check: that is every request of a host sending one at a time. Every
  complete frame is handed to ``Runtime.handle_frame`` at once, in order: sync handlers
  run right there, on the loop thread, always in the same ``contextvars`` context; other
  calls become tasks (``calls.py``) launched by ``_launch``, each in a copy of it.
- Output never blocks the loop: ``FrameOutput`` writes what the pipe takes and buffers
  the rest behind ``add_writer``. While replies wait there, no input is read and no
  frame read already is served; while more than ``HIGH_WATER`` bytes wait, streams are
  not advanced either. So a host that stops reading cannot grow the worker's memory
  without bound, and a request is only served once the replies to the requests before
  it are wholly in the pipe: a host that has not read a reply knows no later sync call
  has started (what lets it send sync calls ahead, see ``runtime.py``).
- Each task call ends with exactly one final reply, written by the task's done callback
  (even for a task cancelled before it ever ran).
- Stopping (end of input, broken pipe, ``shutdown``): no more input is read, calls in
  flight are cancelled and get up to ``STOP_GRACE`` seconds to end, and the output gets
  up to ``FLUSH_GRACE`` seconds to drain; then other tasks, async generators and the
  default executor get ``CLOSE_GRACE`` seconds each to wind down.

Speed. Serial sync calls are the common case (the heartbeat ``ping`` among them), and
asyncio's own bookkeeping per wake-up costs as much as the whole call. So when the loop
is idle (it asks its selector to wait with no timeout: nothing ready, no timer) and the
input fd is the only thing that became ready, ``IdleSelector`` runs the same input
callback itself and goes back to waiting, for as long as the callback schedules nothing
on the loop (``WorkerLoop`` counts ``call_soon``/``call_at``) and leaves no output
buffered. Anything else, and the loop takes over exactly as it would have. Same code,
same order, one less trip through the loop's machinery per frame.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import logging
import math
import os
import select
import selectors
from collections.abc import Mapping
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Deque,
    Dict,
    Iterator,
    List,
    Optional,
    Tuple,
    Union,
)

from .calls import Call
from .protocol import HEADER, FrameDecoder, FrameTooLarge

_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from

READ_BYTES = 64 * 1024
"""Most bytes read from the protocol input at once."""

if TYPE_CHECKING:
    from .runtime import Runtime

# The frame loop's messages keep the logger name they had before it moved here.
_log = logging.getLogger("snakepool_worker.runtime")

EXIT_OK = 0

STOP_GRACE = 2.0
"""Seconds calls in flight get to end after being cancelled when the worker stops."""

FLUSH_GRACE = 2.0
"""Seconds the output gets to drain when the worker stops."""

CLOSE_GRACE = 0.5
"""Seconds each of the loop's last clean-ups may take (other tasks, async generators,
the default executor's threads)."""

try:
    _IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))
except (AttributeError, OSError, ValueError):
    _IOV_MAX = 16


class WorkerLoop(asyncio.SelectorEventLoop):
    """A selector event loop that counts the callbacks and timers scheduled on it.

    ``scheduled`` grows with every ``call_soon`` and ``call_at`` (``call_later``, task
    steps and future callbacks all go through them), which tells ``IdleSelector``
    whether serving a frame gave the loop something to do.
    """

    def __init__(self, selector: Optional[selectors.BaseSelector] = None) -> None:
        super().__init__(selector)
        self.scheduled = 0

    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: Optional[contextvars.Context] = None,
    ) -> asyncio.Handle:
        self.scheduled += 1
        return super().call_soon(callback, *args, context=context)

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: Optional[contextvars.Context] = None,
    ) -> asyncio.TimerHandle:
        self.scheduled += 1
        return super().call_at(when, callback, *args, context=context)


class _KeyMap(Mapping):  # type: ignore[type-arg]
    """``IdleSelector.get_map()``: registered keys by file object (or fd)."""

    def __init__(self, selector: "IdleSelector") -> None:
        self._selector = selector

    def __len__(self) -> int:
        return len(self._selector._keys)

    def __getitem__(self, fileobj: Any) -> selectors.SelectorKey:
        fd = self._selector._lookup(fileobj)
        return self._selector._keys[fd]

    def __iter__(self) -> Iterator[int]:
        return iter(self._selector._keys)


class IdleSelector(selectors.BaseSelector):
    """The loop's epoll selector; serves the input fd itself while the loop is idle.

    An ordinary selector for the event loop, plus the fast path of the module docstring:
    asked to wait with no timeout, it waits on all registered fds, and while the input
    fd alone becomes ready it calls ``serve()`` and waits again, as long as that
    scheduled nothing on the loop and ``serve()`` returned true (the server is quiet:
    still reading, no output queued). ``serve()`` must do exactly what the input fd's
    reader callback does. Linux only (epoll); elsewhere the loop gets the default
    selector and no fast path.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._keys: Dict[int, selectors.SelectorKey] = {}
        self._map: Optional[_KeyMap] = _KeyMap(self)
        self._max_events = 1
        self._loop: Optional[WorkerLoop] = None
        self._fd = -1
        self._serve: Optional[Callable[[], bool]] = None
        self._context: Optional[contextvars.Context] = None

    def serve_idle(
        self,
        loop: WorkerLoop,
        fd: int,
        serve: Optional[Callable[[], bool]],
        context: Optional[contextvars.Context] = None,
    ) -> None:
        """Serve ``fd`` with ``serve`` (run in ``context``) while ``loop`` is idle
        (``serve=None``: never)."""
        self._loop = loop
        self._fd = fd
        self._serve = serve
        self._context = context if context is not None else contextvars.copy_context()

    # -- the selector interface -------------------------------------------------------------

    def _lookup(self, fileobj: Any) -> int:
        try:
            return _fileno(fileobj)
        except ValueError:
            for key in self._keys.values():
                if key.fileobj is fileobj:
                    return key.fd
            raise

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
            raise ValueError(f"invalid events: {events!r}")
        fd = self._lookup(fileobj)
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._epoll.register(fd, _epoll_mask(events))
        self._keys[fd] = key
        self._max_events = len(self._keys)
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = self._lookup(fileobj)
        try:
            key = self._keys.pop(fd)
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # closed before it was unregistered
        self._max_events = max(len(self._keys), 1)
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
            raise ValueError(f"invalid events: {events!r}")
        fd = self._lookup(fileobj)
        try:
            key = self._keys[fd]
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        if events != key.events:
            self._epoll.modify(fd, _epoll_mask(events))
        key = key._replace(events=events, data=data)
        self._keys[fd] = key
        return key

    def select(self, timeout: Optional[float] = None) -> List[Tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            if self._serve is not None:
                return self._select_idle()
            wait = -1.0
        elif timeout <= 0:
            wait = 0.0
        else:
            wait = math.ceil(timeout * 1e3) * 1e-3
        try:
            events = self._epoll.poll(wait, self._max_events)
        except InterruptedError:
            return []
        return self._ready(events)

    def close(self) -> None:
        self._epoll.close()
        self._keys.clear()
        self._map = None
        self._serve = None

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map  # type: ignore[return-value]

    # -- internals --------------------------------------------------------------------------

    def _ready(self, events: List[Tuple[int, int]]) -> List[Tuple[selectors.SelectorKey, int]]:
        ready = []
        keys = self._keys
        for fd, event in events:
            key = keys.get(fd)
            if key is not None:
                mask = (selectors.EVENT_WRITE if event & ~select.EPOLLIN else 0) | (
                    selectors.EVENT_READ if event & ~select.EPOLLOUT else 0
                )
                ready.append((key, mask & key.events))
        return ready

    def _select_idle(self) -> List[Tuple[selectors.SelectorKey, int]]:
        loop = self._loop
        serve = self._serve
        context = self._context
        assert loop is not None and serve is not None and context is not None
        run = context.run
        fd = self._fd
        poll = self._epoll.poll
        while True:
            try:
                events = poll(-1.0, self._max_events)
            except InterruptedError:
                return []
            if len(events) != 1 or events[0][0] != fd:
                return self._ready(events)
            scheduled = loop.scheduled
            try:
                quiet = run(serve)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                loop.call_exception_handler(
                    {"message": "error while serving the protocol input", "exception": exc}
                )
                return []
            if not quiet or loop.scheduled != scheduled:
                return []


def _fileno(fileobj: Any) -> int:
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"invalid file object: {fileobj!r}") from None
    if fd < 0:
        raise ValueError(f"invalid file descriptor: {fd}")
    return fd


def _epoll_mask(events: int) -> int:
    return (select.EPOLLIN if events & selectors.EVENT_READ else 0) | (
        select.EPOLLOUT if events & selectors.EVENT_WRITE else 0
    )


Chunk = Union[bytes, memoryview]

_SMALL_FRAME = 64 * 1024
"""Frames up to this size are written with one ``write`` of header and payload."""


class FrameOutput:
    """Writes frames to the non-blocking protocol output without ever blocking the loop.

    A frame goes out with one ``write`` (header and payload together; ``writev`` for a
    large one) when nothing is queued; whatever the pipe does not take is queued, and
    ``add_writer`` sends the rest in order when the pipe has room. ``congested`` is true
    while more than ``HIGH_WATER`` bytes are queued, until they drop to ``LOW_WATER``.
    A broken pipe calls ``on_broken`` once; later writes are dropped.
    """

    HIGH_WATER = 1 << 20
    LOW_WATER = 256 << 10

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        on_broken: Callable[[], None],
        on_drained: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._on_broken = on_broken
        self._on_drained = on_drained
        self._queue: Deque[Chunk] = collections.deque()
        self.buffered = 0
        self.broken = False
        self._direct = True  # nothing queued, not broken: write at once
        self._waiters: List[Tuple[int, "asyncio.Future[None]"]] = []

    @property
    def congested(self) -> bool:
        return self.buffered > self.HIGH_WATER

    def write(self, payload: bytes) -> None:
        """Write one frame with ``payload``; queue what the pipe does not take now."""
        if not self._direct or len(payload) > _SMALL_FRAME:
            self._write_slow(payload)
            return
        data = _pack_header(len(payload)) + payload
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self._break(exc)
            return
        if written != len(data):
            self._enqueue([memoryview(data)[written:]])

    def _write_slow(self, payload: bytes) -> None:
        """``write`` for a large frame, or behind queued output, or after a break."""
        if self.broken:
            return
        header = _pack_header(len(payload))
        if self.buffered:
            self._queue.append(header)
            self._queue.append(payload)
            self.buffered += 4 + len(payload)
            return
        try:
            written = os.writev(self._fd, [header, payload])
        except BlockingIOError:
            written = 0
        except OSError as exc:
            self._break(exc)
            return
        if written < 4:
            self._enqueue([header[written:], payload])
        elif written < 4 + len(payload):
            self._enqueue([memoryview(payload)[written - 4 :]])

    def _enqueue(self, pending: List[Chunk]) -> None:
        self._queue.extend(pending)
        self.buffered = sum(len(chunk) for chunk in pending)
        self._direct = False
        self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        queue = self._queue
        while queue:
            batch = list(itertools.islice(queue, _IOV_MAX))
            try:
                written = os.writev(self._fd, batch)
            except BlockingIOError:
                return
            except OSError as exc:
                self._break(exc)
                return
            self.buffered -= written
            full = written == sum(len(chunk) for chunk in batch)
            while written:
                head = queue[0]
                if written >= len(head):
                    queue.popleft()
                    written -= len(head)
                else:
                    queue[0] = memoryview(head)[written:]
                    written = 0
            if not full:
                break
        if not queue:
            self._loop.remove_writer(self._fd)
            self._direct = True
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        if self.buffered > self.LOW_WATER:
            return
        if self._waiters:
            still: List[Tuple[int, "asyncio.Future[None]"]] = []
            for threshold, waiter in self._waiters:
                if self.buffered <= threshold:
                    if not waiter.done():
                        waiter.set_result(None)
                else:
                    still.append((threshold, waiter))
            self._waiters = still
        self._on_drained()

    def _break(self, exc: OSError) -> None:
        if not isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            _log.warning("cannot write to the protocol output: %s", exc)
        self.broken = True
        self._direct = False
        self._queue.clear()
        self.buffered = 0
        try:
            self._loop.remove_writer(self._fd)
        except (OSError, ValueError):
            pass
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters = []
        self._on_broken()

    async def _wait_until(self, threshold: int) -> None:
        if self.broken or self.buffered <= threshold:
            return
        waiter: "asyncio.Future[None]" = self._loop.create_future()
        self._waiters.append((threshold, waiter))
        await waiter

    async def drained(self) -> None:
        """Return once at most ``LOW_WATER`` bytes are queued (or the pipe broke)."""
        await self._wait_until(self.LOW_WATER)

    async def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the queue to empty; return whether it did."""
        try:
            await asyncio.wait_for(self._wait_until(0), timeout)
        except asyncio.TimeoutError:
            return False
        return not self.buffered


class FrameServer:
    """Serves one ``Runtime`` over a protocol input fd and output fd (see the module)."""

    def __init__(
        self,
        runtime: "Runtime",
        in_fd: int,
        out_fd: int,
        *,
        max_frame_bytes: Optional[int] = None,
        inline_when_idle: bool = True,
    ) -> None:
        self.runtime = runtime
        self.in_fd = in_fd
        self.out_fd = out_fd
        limit = max_frame_bytes if max_frame_bytes is not None else runtime.max_frame_bytes
        self._decoder = FrameDecoder(limit)
        self._inline_when_idle = inline_when_idle
        # Sync handlers always run in this one context, whichever path served the frame;
        # each task starts from a copy of it.
        self._context = contextvars.copy_context()
        self._loop: Optional[WorkerLoop] = None
        self._output: Optional[FrameOutput] = None
        self._finished: Optional["asyncio.Future[int]"] = None
        self._reading = False
        self._paused = False
        self._stopping = False
        self._held: List[Union[bytes, bytearray, FrameTooLarge]] = []

    # -- running ----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until end of input, a broken pipe or ``shutdown``; return the exit code."""
        blocking = (os.get_blocking(self.in_fd), os.get_blocking(self.out_fd))
        os.set_blocking(self.in_fd, False)
        os.set_blocking(self.out_fd, False)
        selector: Optional[IdleSelector] = None
        if self._inline_when_idle and hasattr(select, "epoll"):
            selector = IdleSelector()
        loop = WorkerLoop(selector)
        self._loop = loop
        self._output = FrameOutput(loop, self.out_fd, self._output_broken, self._output_drained)
        self._finished = loop.create_future()
        if selector is not None:
            selector.serve_idle(loop, self.in_fd, self._serve, self._context)
        asyncio.set_event_loop(loop)
        self.runtime.attach(self._launch)
        try:
            self._start_reading()
            return loop.run_until_complete(self._main())
        finally:
            self.runtime.attach(None)
            if selector is not None:
                selector.serve_idle(loop, -1, None)
            try:
                self._close_loop(loop)
            finally:
                asyncio.set_event_loop(None)
                for fd, was_blocking in zip((self.in_fd, self.out_fd), blocking):
                    try:
                        os.set_blocking(fd, was_blocking)
                    except OSError:
                        pass

    async def _main(self) -> int:
        assert self._finished is not None and self._output is not None
        code = await self._finished
        calls = list(self.runtime.calls.values())
        for call in calls:
            call.cancel("the worker is stopping")
        tasks = [call.task for call in calls if call.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE)
            if pending:
                _log.warning(
                    "%d call(s) still running %.1f s after being cancelled; exiting anyway",
                    len(pending),
                    STOP_GRACE,
                )
        if not await self._output.flush(FLUSH_GRACE):
            _log.warning(
                "%d bytes of replies not taken by the host within %.1f s; exiting anyway",
                self._output.buffered,
                FLUSH_GRACE,
            )
        return code

    def _close_loop(self, loop: WorkerLoop) -> None:
        """Cancel what is left, close async generators and the default executor, each
        within ``CLOSE_GRACE``; then close the loop. Whatever does not end in time is left
        behind (``runtime.exit_process`` ends the process regardless)."""
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        steps = [
            lambda: asyncio.wait(pending, timeout=CLOSE_GRACE) if pending else None,
            lambda: asyncio.wait_for(loop.shutdown_asyncgens(), CLOSE_GRACE),
            lambda: asyncio.wait_for(loop.shutdown_default_executor(), CLOSE_GRACE),
        ]
        try:
            for step in steps:
                awaitable = step()
                if awaitable is None:
                    continue
                try:
                    loop.run_until_complete(awaitable)
                except (asyncio.TimeoutError, RuntimeError) as exc:
                    _log.debug("loop clean-up step cut short: %r", exc)
        finally:
            loop.close()

    def _finish(self, code: int) -> None:
        """Stop reading and let ``_main`` wind down; the first reason wins."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_reading()
        assert self._finished is not None
        if not self._finished.done():
            self._finished.set_result(code)

    # -- input ------------------------------------------------------------------------------

    def _start_reading(self) -> None:
        if not self._reading and not self._stopping:
            assert self._loop is not None
            self._loop.add_reader(self.in_fd, self._context.run, self._serve)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            assert self._loop is not None
            self._loop.remove_reader(self.in_fd)
            self._reading = False

    def _serve(self, read: bool = True) -> bool:
        """Read once (unless ``read`` is false), then serve every complete frame, in
        order, unless stopping or paused; return whether the server is quiet afterwards
        (reading, no output queued). The input's reader callback, and ``IdleSelector``'s.
        """
        decoder = self._decoder
        payloads: List[Union[bytes, bytearray, FrameTooLarge]]
        if read:
            try:
                data = os.read(self.in_fd, READ_BYTES)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as exc:
                _log.warning("cannot read the protocol input (%s); exiting", exc)
                self._finish(EXIT_OK)
                return False
            if data is None:
                payloads = decoder.frames()
            elif not data:
                problem = decoder.truncation()
                if problem is None:
                    _log.debug("end of input; exiting")
                else:
                    _log.warning("%s; exiting", problem)
                self._finish(EXIT_OK)
                return False
            elif (
                decoder.empty
                and len(data) > 4
                and _unpack_header(data)[0] == len(data) - 4 <= decoder.max_frame_bytes
            ):
                # The common case, serial calls: the read brought one whole frame.
                payloads = [data[4:]]
            else:
                decoder.feed(data)
                payloads = decoder.frames()
        elif self._held:
            payloads = self._held
            self._held = []
        else:
            payloads = decoder.frames()
        runtime = self.runtime
        handle_frame = runtime.handle_frame
        output = self._output
        assert output is not None
        frames = iter(payloads)
        for payload in frames:
            if isinstance(payload, FrameTooLarge):
                runtime.dropped_frames += 1
                _log.error("%s; discarding it", payload)
                continue
            reply = handle_frame(payload)
            if reply is not None:
                output.write(reply)
            if runtime.stopping:
                _log.debug("shutdown requested; exiting")
                self._finish(EXIT_OK)
                return False
            if self._stopping:
                return False
            if output.buffered:
                # The pipe is full: stop reading until the host has taken every reply;
                # the frames read already wait, in order. So no request is served
                # before the replies to those served earlier are wholly in the pipe.
                self._held = list(frames)
                self._stop_reading()
                self._paused = True
                return False
        return self._reading and not output.buffered

    # -- output -----------------------------------------------------------------------------

    def _output_broken(self) -> None:
        _log.debug("protocol output closed by the host; exiting")
        self._finish(EXIT_OK)

    def _output_drained(self) -> None:
        assert self._output is not None
        if self._paused and not self._stopping and not self._output.buffered:
            self._paused = False
            self._start_reading()
            assert self._loop is not None
            self._loop.call_soon(self._context.run, self._serve, False)

    # -- calls ------------------------------------------------------------------------------

    def _launch(self, call: Call) -> None:
        """Start ``call``'s task (in a copy of the current context)."""
        assert self._loop is not None
        call.output = self._output
        task = self._loop.create_task(call.run())
        call.task = task
        task.add_done_callback(lambda done: self._call_done(call, done))

    def _call_done(self, call: Call, task: "asyncio.Task[bytes]") -> None:
        self.runtime.calls.pop(call.request_id, None)
        if task.cancelled():
            reply = call.cancelled_reply()
        else:
            exc = task.exception()
            if exc is None:
                reply = task.result()
            else:
                _log.error(
                    "call %d (%r) ended without a reply", call.request_id, call.command,
                    exc_info=exc,
                )
                reply = self.runtime.failure(
                    call.request_id, "InternalError", f"call ended without a reply: {exc!r}"
                )
        assert self._output is not None
        self._output.write(reply)
