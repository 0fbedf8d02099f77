"""In-process pieces of the v1 additions: handler kinds, the frame decoder, the
non-blocking output, calls run without a frame loop, and the loop's idle fast path."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import struct
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from conftest import DEFAULT_TIMEOUT

from snakepool_worker import Context
from snakepool_worker.builtins import register_builtins
from snakepool_worker.loop import FrameOutput, WorkerLoop
from snakepool_worker.protocol import FrameDecoder, FrameReader, FrameTooLarge, encode_frame
from snakepool_worker.registry import (
    ASYNC,
    ASYNC_STREAM,
    STREAM,
    SYNC,
    Registry,
    handler_kind,
)
from snakepool_worker.runtime import Runtime

# -- handler kinds ------------------------------------------------------------------------------


def plain(args: Dict[str, Any], ctx: Context) -> int:
    return 1


async def coroutine(args: Dict[str, Any], ctx: Context) -> int:
    return 1


def generator(args: Dict[str, Any], ctx: Context) -> Iterator[int]:
    yield 1


async def async_generator(args: Dict[str, Any], ctx: Context) -> Any:
    yield 1


def test_handler_kinds() -> None:
    assert handler_kind(plain) is SYNC
    assert handler_kind(coroutine) is ASYNC
    assert handler_kind(generator) is STREAM
    assert handler_kind(async_generator) is ASYNC_STREAM
    assert handler_kind(functools.partial(coroutine)) is ASYNC

    @functools.wraps(coroutine)
    def wrapper(args: Dict[str, Any], ctx: Context) -> Any:
        return asyncio.run(coroutine(args, ctx))

    # A plain wrapper stays a plain function, whatever it wraps.
    assert handler_kind(wrapper) is SYNC


def test_manifest_entries_by_kind() -> None:
    registry = Registry()
    for name, func in (
        ("plain", plain),
        ("coroutine", coroutine),
        ("generator", generator),
        ("async_generator", async_generator),
    ):
        registry.register(name, func)
    entries = {name: spec.describe() for name, spec in registry.commands.items()}
    assert entries["plain"] == {"mutates_session": False, "doc": ""}
    assert entries["coroutine"] == {"mutates_session": False, "doc": "", "concurrent": True}
    assert entries["generator"] == {"mutates_session": False, "doc": "", "streams": True}
    assert entries["async_generator"] == {
        "mutates_session": False,
        "doc": "",
        "concurrent": True,
        "streams": True,
    }
    spec = registry.get("async_generator")
    assert spec is not None and spec.concurrent and spec.streams


# -- the frame decoder --------------------------------------------------------------------------


def frames_of(*payloads: bytes) -> bytes:
    return b"".join(encode_frame(p) for p in payloads)


def feed_all(decoder: FrameDecoder, data: bytes, piece: int) -> List[Any]:
    out: List[Any] = []
    for start in range(0, len(data), piece):
        decoder.feed(data[start : start + piece])
        out.extend(decoder.frames())
    return out


@pytest.mark.parametrize("piece", [1, 3, 4, 5, 1000, 100_000])
def test_decoder_reassembles_frames_fed_in_any_pieces(piece: int) -> None:
    payloads = [b"", b"a", b"x" * 5000, b"hello", b"z" * 70_000, b"tail"]
    decoder = FrameDecoder(buffer_size=1024)
    assert [bytes(p) for p in feed_all(decoder, frames_of(*payloads), piece)] == payloads
    assert decoder.empty and decoder.truncation() is None


@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
def test_decoder_refuses_oversized_frames_in_place(piece: int) -> None:
    data = frames_of(b"before") + struct.pack(">I", 3000) + b"\xff" * 3000 + frames_of(b"after")
    decoder = FrameDecoder(max_frame_bytes=1024)
    got = feed_all(decoder, data, piece)
    assert got[0] == b"before" and got[2] == b"after" and len(got) == 3
    assert isinstance(got[1], FrameTooLarge) and got[1].size == 3000
    assert decoder.empty


def test_decoder_never_allocates_for_a_refused_header() -> None:
    decoder = FrameDecoder(max_frame_bytes=1024)
    decoder.feed(b"\xff\xff\xff\xff" + b"\x00" * 10)
    (refused,) = decoder.frames()
    assert isinstance(refused, FrameTooLarge) and refused.size == 0xFFFFFFFF
    assert decoder.skipping
    assert "bytes to discard" in (decoder.truncation() or "")


def test_decoder_collects_a_large_incomplete_frame_in_its_own_buffer() -> None:
    decoder = FrameDecoder()
    payload = bytes(range(256)) * 40  # 10 kB
    data = encode_frame(payload) + encode_frame(b"next")
    decoder.feed(data[:100])
    assert decoder.frames() == []
    assert "of 10240 payload bytes" in (decoder.truncation() or "")
    decoder.feed(data[100:])
    assert decoder.frames() == [payload, b"next"]


def test_decoder_truncation_messages() -> None:
    decoder = FrameDecoder()
    assert decoder.truncation() is None
    decoder.feed(b"\x00\x00")
    assert decoder.truncation() == "truncated frame: end of input after 2 header bytes"
    decoder.feed(b"\x00\x09abc")
    assert decoder.frames() == []
    assert decoder.truncation() == "truncated frame: end of input after 3 of 9 payload bytes"


def test_frame_reader_raises_a_refused_frame_in_its_place() -> None:
    data = frames_of(b"one") + struct.pack(">I", 5000) + b"." * 5000 + frames_of(b"two")
    position = 0

    def readinto(view: memoryview) -> int:
        nonlocal position
        count = min(len(view), len(data) - position, 333)
        view[:count] = data[position : position + count]
        position += count
        return count

    reader = FrameReader(0, 1024, readinto=readinto)
    assert reader.read_frame() == b"one"
    with pytest.raises(FrameTooLarge):
        reader.read_frame()
    assert reader.read_frame() == b"two"
    assert reader.read_frame() is None


# -- the non-blocking output --------------------------------------------------------------------


def drain(fd: int, total: int, into: bytearray) -> threading.Thread:
    def run() -> None:
        while len(into) < total:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            into.extend(chunk)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_output_queues_what_a_full_pipe_refuses_and_sends_it_in_order() -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    loop = WorkerLoop()
    drained: List[int] = []
    output = FrameOutput(loop, write_fd, lambda: None, lambda: drained.append(1))
    payloads = [bytes([i % 251]) * 50_000 for i in range(40)]  # 2 MB, far over a pipe
    try:
        for payload in payloads:
            output.write(payload)  # returns at once: nothing ever blocks
        assert output.buffered > output.HIGH_WATER and output.congested
        expected = b"".join(encode_frame(p) for p in payloads)
        received = bytearray()
        reader = drain(read_fd, len(expected), received)
        assert loop.run_until_complete(output.flush(DEFAULT_TIMEOUT)) is True
        reader.join(DEFAULT_TIMEOUT)
        assert bytes(received) == expected
        assert output.buffered == 0 and not output.congested and drained
    finally:
        loop.close()
        os.close(read_fd)
        os.close(write_fd)


def test_output_reports_a_broken_pipe_once_and_drops_later_writes() -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    os.close(read_fd)
    loop = WorkerLoop()
    broken: List[int] = []
    output = FrameOutput(loop, write_fd, lambda: broken.append(1), lambda: None)
    try:
        output.write(b"{}")
        output.write(b"{}")
        output.write(b"x" * 100_000)
        assert broken == [1] and output.broken and output.buffered == 0
        assert loop.run_until_complete(output.flush(1.0)) is True
    finally:
        loop.close()
        os.close(write_fd)


# -- calls without a frame loop ---------------------------------------------------------------


@pytest.fixture
def runtime() -> Runtime:
    registry = Registry()
    register_builtins(registry)

    @registry.command("add")
    async def add(args: Dict[str, Any], ctx: Context) -> int:
        await asyncio.sleep(0)
        return args["a"] + args["b"]

    @registry.command("count")
    def count(args: Dict[str, Any], ctx: Context) -> Iterator[int]:
        yield from range(args["n"])
        return args["n"]

    @registry.command("async_count")
    async def async_count(args: Dict[str, Any], ctx: Context) -> Any:
        for i in range(args["n"]):
            yield i

    @registry.command("fails")
    async def fails(args: Dict[str, Any], ctx: Context) -> Any:
        raise KeyError("missing")

    return Runtime(registry, worker_id="unit")


def handle(runtime: Runtime, message: Dict[str, Any], chunks: Optional[List[Any]] = None) -> Any:
    on_chunk = None if chunks is None else (lambda p: chunks.append(json.loads(p)))
    reply = runtime.handle_frame(json.dumps(message).encode(), on_chunk)
    return None if reply is None else json.loads(reply)


def test_in_process_async_and_stream_calls_run_to_completion(runtime: Runtime) -> None:
    assert handle(runtime, {"id": 1, "command": "add", "args": {"a": 1, "b": 2}}) == {
        "id": 1,
        "success": True,
        "result": 3,
    }
    chunks: List[Any] = []
    reply = handle(runtime, {"id": 2, "command": "count", "args": {"n": 40}}, chunks)
    assert reply == {"id": 2, "success": True, "result": 40}
    assert chunks == [{"id": 2, "chunk": i} for i in range(40)]  # no credit needed here
    chunks.clear()
    reply = handle(runtime, {"id": 3, "command": "async_count", "args": {"n": 3}}, chunks)
    assert reply["result"] is None and [c["chunk"] for c in chunks] == [0, 1, 2]
    error = handle(runtime, {"id": 4, "command": "fails"})["error"]
    assert error["type"] == "KeyError" and "in fails" in error["traceback"]
    assert runtime.calls == {}
    # Control frames are never answered.
    assert handle(runtime, {"id": 1, "cancel": True}) is None
    assert handle(runtime, {"id": 1, "credit": 3}) is None


def test_runtime_refuses_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        Runtime(Registry(), worker_id="w", max_concurrency=0)
    with pytest.raises(ValueError, match="stream_window"):
        Runtime(Registry(), worker_id="w", stream_window=0)


# -- the idle fast path never starves the loop -------------------------------------------------


class PipeWorker:
    """``Runtime.serve_fds`` on a thread, over two pipes."""

    def __init__(self, runtime: Runtime) -> None:
        self.in_read, self.in_write = os.pipe()
        self.out_read, self.out_write = os.pipe()
        self.status: List[int] = []
        self.thread = threading.Thread(
            target=lambda: self.status.append(runtime.serve_fds(self.in_read, self.out_write)),
            daemon=True,
        )
        self.thread.start()
        self.reader = FrameReader(self.out_read)

    def call(self, request_id: int, command: str, **args: Any) -> Dict[str, Any]:
        os.write(
            self.in_write,
            encode_frame(json.dumps({"id": request_id, "command": command, "args": args}).encode()),
        )
        reply: Dict[str, Any] = json.loads(self.reader.read_frame() or b"null")
        return reply

    def close(self) -> Tuple[int, ...]:
        os.close(self.in_write)
        self.thread.join(DEFAULT_TIMEOUT)
        assert not self.thread.is_alive(), "the frame loop did not stop at end of input"
        for fd in (self.in_read, self.out_read, self.out_write):
            os.close(fd)
        return tuple(self.status)


def test_work_a_sync_handler_schedules_runs_while_no_frame_arrives() -> None:
    registry = Registry()
    register_builtins(registry)
    done = {name: threading.Event() for name in ("task", "timer", "threadsafe")}

    async def background() -> None:
        await asyncio.sleep(0.01)
        done["task"].set()

    @registry.command("schedule")
    def schedule(args: Dict[str, Any], ctx: Context) -> str:
        loop = asyncio.get_running_loop()
        loop.create_task(background())
        loop.call_later(0.01, done["timer"].set)

        def later() -> None:
            # Once the task and the timer are done, the loop is idle, waiting in its
            # selector's fast path: this must still wake it.
            done["task"].wait(DEFAULT_TIMEOUT)
            done["timer"].wait(DEFAULT_TIMEOUT)
            loop.call_soon_threadsafe(done["threadsafe"].set)

        threading.Thread(target=later, daemon=True).start()
        return "scheduled"

    worker = PipeWorker(Runtime(registry, worker_id="unit"))
    try:
        assert worker.call(1, "schedule")["result"] == "scheduled"
        # No further frame is sent: the loop must run the work on its own.
        for name, event in done.items():
            assert event.wait(DEFAULT_TIMEOUT), f"{name} never ran"
        assert worker.call(2, "ping")["result"]["status"] == "ok"
    finally:
        assert worker.close() == (0,)


def test_sync_handlers_share_one_context_across_calls() -> None:
    import contextvars

    var: contextvars.ContextVar[int] = contextvars.ContextVar("var", default=0)
    registry = Registry()

    @registry.command("bump")
    def bump(args: Dict[str, Any], ctx: Context) -> int:
        var.set(var.get() + 1)
        return var.get()

    @registry.command("async_read")
    async def async_read(args: Dict[str, Any], ctx: Context) -> int:
        var.set(-1)  # in the task's own copy only
        return var.get()

    worker = PipeWorker(Runtime(registry, worker_id="unit"))
    try:
        assert [worker.call(i, "bump")["result"] for i in range(1, 4)] == [1, 2, 3]
        assert worker.call(4, "async_read")["result"] == -1
        assert worker.call(5, "bump")["result"] == 4
    finally:
        worker.close()
