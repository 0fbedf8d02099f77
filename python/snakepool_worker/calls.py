"""Calls that run as asyncio tasks: async handlers and streams, with credit and cancel.

The runtime makes a ``Call`` for each request whose handler is an ``async def``
function, a generator function or an async generator function (plain functions run
inline and never get one). ``Call.run()`` is the body of the call's task: it runs the
handler and returns the payload of the call's one final reply, whatever happens (result,
handler exception, refused chunk, cancellation). Who launches the task and writes that
reply is the frame loop's business (``loop.py``), or ``Runtime.handle_frame`` when a
call is served in-process.

Streams. Each value a generator yields is written at once as a chunk frame ``{"id",
"chunk"}``, and costs one unit of the call's credit (``stream_window`` to start with; the
host grants more with credit frames, see ``grant``). Out of credit, or while the protocol
output is congested, the generator is not advanced: the task waits. Between chunks the
task yields to the event loop, so a stream never keeps other calls, credit and cancel
frames or the heartbeat waiting. A sync generator is advanced one step at a time from
its task, so its body runs on the loop thread between two awaits.

Cancel. ``cancel`` cancels the task: the handler gets ``asyncio.CancelledError`` at its
current ``await`` (a generator suspended at its ``yield`` while waiting for credit gets it
thrown in there), may catch it to clean up, and the call is answered ``Cancelled``, even
if the handler swallowed the error and returned. A stream is not advanced after a
cancel. A handler that never finishes its clean-up keeps its call in flight; the host's
grace period covers that case by killing the worker.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncGenerator,
    Callable,
    Dict,
    Generator,
    Optional,
    Protocol,
)

from .protocol import SerializationError, encode_chunk
from .registry import ASYNC, STREAM, CommandSpec, Context, Final

if TYPE_CHECKING:
    from .runtime import Runtime


class CallOutput(Protocol):
    """Where a call's chunk frames go: the loop's ``FrameOutput``, or a collector."""

    @property
    def congested(self) -> bool:
        """True while the output holds more than it should; streams then wait."""
        ...

    def write(self, payload: bytes) -> None:
        """Write one frame's payload; never blocks."""
        ...

    async def drained(self) -> None:
        """Return once the output is no longer congested."""
        ...


class CollectedOutput:
    """The output of a call served in-process: chunk payloads go to ``on_chunk``."""

    congested = False

    def __init__(self, on_chunk: Optional[Callable[[bytes], None]] = None) -> None:
        self._on_chunk = on_chunk

    def write(self, payload: bytes) -> None:
        if self._on_chunk is not None:
            self._on_chunk(payload)

    async def drained(self) -> None:
        return None


_log = logging.getLogger("snakepool_worker.calls")

UNLIMITED_CREDIT = 1 << 62
"""Credit of a call served in-process, where no host grants any."""

_THIS_FILE = __file__


class _ChunkRefused(Exception):
    """A chunk that cannot be sent; ends the call with ``error_type``."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def handler_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` from the handler's frames on (this module's skipped)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == _THIS_FILE:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when that raises."""
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__} object>"


class Call:
    """One request served by a task: what the loop needs to run, pace and cancel it."""

    __slots__ = (
        "runtime",
        "request_id",
        "command",
        "spec",
        "args",
        "ctx",
        "credit",
        "chunks",
        "output",
        "task",
        "cancel_reason",
        "_credit_waiter",
    )

    def __init__(
        self,
        runtime: "Runtime",
        request_id: int,
        command: str,
        spec: CommandSpec,
        args: Dict[str, Any],
        ctx: Context,
        credit: int,
    ) -> None:
        self.runtime = runtime
        self.request_id = request_id
        self.command = command
        self.spec = spec
        self.args = args
        self.ctx = ctx
        self.credit = credit
        self.chunks = 0
        self.output: Optional["CallOutput"] = None
        self.task: Optional["asyncio.Task[bytes]"] = None
        self.cancel_reason: Optional[str] = None
        self._credit_waiter: Optional["asyncio.Future[None]"] = None

    # -- control from the loop --------------------------------------------------------------

    def grant(self, credit: int) -> None:
        """Allow ``credit`` more chunks (a credit frame from the host)."""
        self.credit += credit
        waiter = self._credit_waiter
        if waiter is not None and self.credit > 0 and not waiter.done():
            waiter.set_result(None)

    def cancel(self, reason: str) -> bool:
        """Cancel the call's task, once; return whether this did it."""
        task = self.task
        if self.cancel_reason is not None or task is None or task.done():
            return False
        self.cancel_reason = reason
        task.cancel()
        return True

    def cancelled_reply(self, exc: Optional[BaseException] = None) -> bytes:
        """The ``Cancelled`` failure for this call (``exc``: raised during clean-up)."""
        reason = self.cancel_reason or "its task was cancelled"
        self.runtime.cancelled += 1
        return self.runtime.failure(
            self.request_id,
            "Cancelled",
            f"call {self.request_id} ({self.command!r}) was cancelled: {reason}",
            handler_traceback(exc) if exc is not None else "",
        )

    # -- the task ---------------------------------------------------------------------------

    async def run(self) -> bytes:
        """Run the handler; return the payload of the call's final reply. Never raises
        (except ``SystemExit`` and ``KeyboardInterrupt``, which end the worker)."""
        runtime = self.runtime
        kind = self.spec.kind
        try:
            if kind is ASYNC:
                result = await self.spec.func(self.args, self.ctx)
            elif kind is STREAM:
                result = await self._run_generator()
            else:
                result = await self._run_async_generator()
        except asyncio.CancelledError:
            return self.cancelled_reply()
        except _ChunkRefused as refused:
            return runtime.failure(self.request_id, refused.error_type, str(refused))
        except Exception as exc:
            if self.cancel_reason is not None:
                return self.cancelled_reply(exc)
            return runtime.failure(
                self.request_id, type(exc).__name__, safe_str(exc), handler_traceback(exc)
            )
        if self.cancel_reason is not None:
            return self.cancelled_reply()
        return runtime.encode_result(self.request_id, self.command, result, self.ctx)

    def _send_chunk(self, value: Any) -> None:
        try:
            payload = encode_chunk(self.request_id, value)
        except SerializationError as exc:
            raise _ChunkRefused(
                "SerializationError",
                f"chunk {self.chunks} of command {self.command!r} is not JSON-serialisable: {exc}",
            ) from None
        limit = self.runtime.max_frame_bytes
        if len(payload) > limit:
            raise _ChunkRefused(
                "ResultTooLarge",
                f"chunk {self.chunks} of command {self.command!r} is {len(payload)} bytes, "
                f"larger than the maximum frame size of {limit} bytes",
            )
        output = self.output
        assert output is not None, "a call's output is set before its task starts"
        output.write(payload)
        self.chunks += 1
        self.credit -= 1

    async def _pace(self) -> None:
        """Between two chunks: wait for a drained output and for credit; else just let
        the loop run once."""
        output = self.output
        waited = False
        if output is not None and output.congested:
            await output.drained()
            waited = True
        if self.credit > 0:
            if not waited:
                await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        while self.credit <= 0:
            waiter: "asyncio.Future[None]" = loop.create_future()
            self._credit_waiter = waiter
            try:
                await waiter
            finally:
                self._credit_waiter = None

    async def _run_generator(self) -> Any:
        gen: Generator[Any, None, Any] = self.spec.func(self.args, self.ctx)
        try:
            while True:
                try:
                    value = gen.send(None)
                except StopIteration as stop:
                    return stop.value
                if self.cancel_reason is not None:
                    return None
                if type(value) is Final:
                    return value.value
                self._send_chunk(value)
                await self._pace()
        except asyncio.CancelledError:
            self._throw_into(gen)
            raise
        finally:
            self._close(gen)

    async def _run_async_generator(self) -> Any:
        agen: AsyncGenerator[Any, None] = self.spec.func(self.args, self.ctx)
        inside = False
        try:
            while True:
                inside = True
                try:
                    value = await agen.__anext__()
                except StopAsyncIteration:
                    return None
                inside = False
                if self.cancel_reason is not None:
                    return None
                if type(value) is Final:
                    return value.value
                self._send_chunk(value)
                await self._pace()
        except asyncio.CancelledError:
            if not inside:
                # Cancelled while waiting between chunks: let the handler see it at its
                # yield, as it would at any await.
                try:
                    await agen.athrow(asyncio.CancelledError())
                except (StopAsyncIteration, asyncio.CancelledError):
                    pass
                except Exception:
                    self._log_cleanup_failure()
            raise
        finally:
            try:
                await agen.aclose()
            except Exception:
                self._log_cleanup_failure()

    def _throw_into(self, gen: Generator[Any, None, Any]) -> None:
        """Raise ``CancelledError`` at the yield where ``gen`` waits, so it can clean up."""
        try:
            gen.throw(asyncio.CancelledError())
        except (StopIteration, asyncio.CancelledError):
            pass
        except Exception:
            self._log_cleanup_failure()

    def _close(self, gen: Generator[Any, None, Any]) -> None:
        try:
            gen.close()
        except Exception:
            self._log_cleanup_failure()

    def _log_cleanup_failure(self) -> None:
        self.spec.log.warning(
            "command %r (call %d) failed while closing its stream",
            self.command,
            self.request_id,
            exc_info=True,
        )
