"""The v1 additions end to end: real workers over real pipes, many calls per worker.

Overlap is proven by rendezvous (a call that returns met the others while in flight),
order by gates opened from the test; every wait has a deadline, no test sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any, Callable, Dict, Iterable, List, Set

import pytest
from conftest import DEFAULT_TIMEOUT, SpawnWorker, WorkerProcess, encode, raw_frame

import conftest
from snakepool_worker.builtins import BUILTIN_ARGS_SCHEMAS

MODULES = ("handlers_for_tests", "async_handlers_for_tests")
WINDOW = 16


@pytest.fixture
def spawn(spawn_worker: SpawnWorker) -> SpawnWorker:
    """``spawn_worker`` whose ``call`` ids (from 10,000) never meet the tests' own ids."""

    def start(*args: Any, **kwargs: Any) -> WorkerProcess:
        kwargs.setdefault("modules", MODULES)
        process = spawn_worker(*args, **kwargs)
        process._next_id = 10_000
        return process

    return start


@pytest.fixture
def aworker(spawn: SpawnWorker) -> WorkerProcess:
    """A worker with the sync and the async test handlers, after its handshake."""
    process = spawn()
    process.handshake()
    return process


def request(worker: WorkerProcess, request_id: int, command: str, **args: Any) -> None:
    worker.send({"id": request_id, "command": command, "args": args})


def is_final(frame: Dict[str, Any]) -> bool:
    return "success" in frame


def collect(worker: WorkerProcess, ids: Iterable[int]) -> Dict[int, List[Dict[str, Any]]]:
    """Read frames until each of ``ids`` got its final reply; frames by id, in order.

    Fails on a frame for an id not asked about, or a second final reply for one.
    """
    waiting: Set[int] = set(ids)
    frames: Dict[int, List[Dict[str, Any]]] = {i: [] for i in waiting}
    while waiting:
        frame = worker.recv()
        request_id = frame["id"]
        assert request_id in frames, f"unexpected frame {frame}"
        assert request_id in waiting, f"frame after the final reply: {frame}"
        frames[request_id].append(frame)
        if is_final(frame):
            waiting.discard(request_id)
    return frames


def wait_until(check: Callable[[], Any], what: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Call ``check`` (each call a round trip to the worker) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen in time")


def started(worker: WorkerProcess, request_id: int) -> bool:
    return any(
        e["event"] == "started" and e["id"] == request_id for e in worker.result("events")
    )


def cancelled_error(frame: Dict[str, Any], request_id: int) -> Dict[str, Any]:
    assert frame["id"] == request_id and frame["success"] is False, frame
    assert frame["error"]["type"] == "Cancelled", frame
    error: Dict[str, Any] = frame["error"]
    return error


# -- manifest and options ---------------------------------------------------------------------


def test_manifest_announces_concurrency_and_per_command_flags(
    spawn: SpawnWorker,
) -> None:
    manifest = spawn(modules=MODULES).handshake()["manifest"]
    assert manifest["concurrency"] == {
        "max_concurrency": 32,
        "stream_window": WINDOW,
        "pipelining": True,
    }
    commands = manifest["commands"]
    assert commands["meet"] == {
        "mutates_session": False,
        "doc": "Wait until args.expect calls of rendezvous args.name are in flight at once.",
        "concurrent": True,
        "module": "async_handlers_for_tests",
    }
    assert commands["count"]["streams"] is True and "concurrent" not in commands["count"]
    assert commands["async_count"]["streams"] is True
    assert commands["async_count"]["concurrent"] is True
    assert commands["async_journaled"]["mutates_session"] is True
    # Sync commands have no concurrency flags.
    assert commands["echo"] == {
        "mutates_session": False,
        "doc": "Return the arguments unchanged.",
        "module": "handlers_for_tests",
    }
    assert commands["ping"] == {
        "mutates_session": False,
        "doc": "Liveness check; with initialization/manifest set, also returns the manifest.",
        "module": "snakepool_worker.builtins",
        "args_schema": BUILTIN_ARGS_SCHEMAS["ping"],
    }
    assert commands["shutdown"]["internal"] is True and "concurrent" not in commands["shutdown"]


@pytest.mark.parametrize(
    "extra, env, expected",
    [
        (("--max-concurrency", "1"), {}, 1),
        ((), {"SNAKEPOOL_MAX_CONCURRENCY": "7"}, 7),
        (("--max-concurrency", "3"), {"SNAKEPOOL_MAX_CONCURRENCY": "7"}, 3),
    ],
)
def test_max_concurrency_from_flag_and_environment(
    spawn: SpawnWorker, extra: tuple, env: Dict[str, str], expected: int
) -> None:
    manifest = spawn(*extra, modules=MODULES, env=env).handshake()["manifest"]
    assert manifest["concurrency"]["max_concurrency"] == expected


@pytest.mark.parametrize(
    "extra, env, fragment",
    [
        (("--max-concurrency", "0"), {}, "--max-concurrency"),
        (("--max-concurrency", "many"), {}, "--max-concurrency"),
        ((), {"SNAKEPOOL_MAX_CONCURRENCY": "-2"}, "SNAKEPOOL_MAX_CONCURRENCY"),
    ],
)
def test_bad_max_concurrency_is_a_usage_error(
    spawn: SpawnWorker, extra: tuple, env: Dict[str, str], fragment: str
) -> None:
    process = spawn(*extra, env=env)
    assert process.wait() == 2
    assert fragment in process.stderr.wait_eof()


# -- overlap, limits, isolation -----------------------------------------------------------------


def test_async_calls_overlap(aworker: WorkerProcess) -> None:
    # Each call returns only once both are in flight together: a worker running them one
    # after the other would time the first one out.
    request(aworker, 1, "meet", name="two", expect=2, timeout=5)
    request(aworker, 2, "meet", name="two", expect=2, timeout=5)
    frames = collect(aworker, [1, 2])
    results = sorted(frames[i][0]["result"]["arrived_as"] for i in (1, 2))
    assert results == [1, 2]
    assert all(frames[i][0]["success"] for i in (1, 2))


def test_thirty_two_calls_in_flight_at_once(aworker: WorkerProcess) -> None:
    for i in range(1, 33):
        request(aworker, i, "meet", name="all", expect=32)
    frames = collect(aworker, range(1, 33))
    assert sorted(f[0]["result"]["arrived_as"] for f in frames.values()) == list(range(1, 33))


def test_a_call_past_max_concurrency_is_overloaded_at_once(spawn: SpawnWorker) -> None:
    worker = spawn("--max-concurrency", "2", modules=MODULES)
    worker.handshake()
    request(worker, 1, "gate", name="limit")
    request(worker, 2, "gate", name="limit")
    request(worker, 3, "async_add", a=1, b=2)
    reply = worker.recv()
    assert reply["id"] == 3 and reply["error"]["type"] == "Overloaded", reply
    assert "2 calls in flight" in reply["error"]["message"]
    assert "max_concurrency 2" in reply["error"]["message"]
    # Sync calls do not count: they never stay in flight.
    assert worker.result("echo", {"still": "served"}) == {"still": "served"}
    assert worker.result("get_stats")["in_flight"] == 2
    assert worker.result("open_gate", {"name": "limit"}) == "limit"
    frames = collect(worker, [1, 2])
    assert all(frames[i][0]["success"] for i in (1, 2))
    assert worker.result("async_add", {"a": 2, "b": 3}) == 5


def test_max_concurrency_one(spawn: SpawnWorker) -> None:
    worker = spawn("--max-concurrency", "1", modules=MODULES)
    assert worker.handshake()["manifest"]["concurrency"]["max_concurrency"] == 1
    request(worker, 1, "gate", name="one")
    request(worker, 2, "count", n=1)
    reply = worker.recv()
    assert reply["id"] == 2 and reply["error"]["type"] == "Overloaded"
    assert worker.result("ping")["status"] == "ok"
    worker.result("open_gate", {"name": "one"})
    assert collect(worker, [1])[1][0]["success"] is True
    assert worker.result("async_add", {"a": 1, "b": 1}) == 2


def test_concurrent_calls_have_their_own_context_and_session(aworker: WorkerProcess) -> None:
    for request_id, tag in ((1, "a"), (2, "b"), (3, "c")):
        request(
            aworker,
            request_id,
            "isolated",
            tag=tag,
            meeting="iso",
            expect=3,
            session_id=f"s-{tag}",
        )
    frames = collect(aworker, [1, 2, 3])
    for request_id, tag in ((1, "a"), (2, "b"), (3, "c")):
        assert frames[request_id][0]["result"] == {
            "var": tag,
            "session": {"tag": tag},
            "session_id": f"s-{tag}",
        }
    # The tasks' context variables never leak into the sync handlers' context.
    assert aworker.result("read_var") == "unset"


def test_replies_interleave_by_id(aworker: WorkerProcess) -> None:
    request(aworker, 1, "gate", name="first")
    request(aworker, 2, "gate", name="second")
    wait_until(lambda: started(aworker, 2), "call 2 starting")
    request(aworker, 3, "open_gate", name="second")
    # Call 2 ends before call 1, and the sync call's reply may come before or after it.
    got = collect(aworker, [2, 3])
    assert got[2][0]["result"] == {"gate": "second", "id": 2}
    request(aworker, 4, "open_gate", name="first")
    got = collect(aworker, [1, 4])
    assert got[1][0]["result"] == {"gate": "first", "id": 1}


def test_streams_of_different_calls_interleave(aworker: WorkerProcess) -> None:
    request(aworker, 1, "async_count", n=5, gate="streams")
    request(aworker, 2, "async_count", n=5, gate="streams")
    request(aworker, 3, "open_gate", name="streams")
    order: List[Dict[str, Any]] = []
    waiting = {1, 2, 3}
    frames: Dict[int, List[Dict[str, Any]]] = {1: [], 2: [], 3: []}
    while waiting:
        frame = aworker.recv()
        order.append(frame)
        frames[frame["id"]].append(frame)
        if is_final(frame):
            waiting.discard(frame["id"])
    for request_id in (1, 2):
        assert [f["chunk"]["i"] for f in frames[request_id][:-1]] == [0, 1, 2, 3, 4]
        assert frames[request_id][-1] == {"id": request_id, "success": True, "result": None}
    # Both streams were under way before either ended.
    first_final = next(n for n, f in enumerate(order) if f["id"] in (1, 2) and is_final(f))
    assert {f["id"] for f in order[:first_final] if "chunk" in f} == {1, 2}, order


def test_a_request_whose_id_is_in_flight_is_refused(aworker: WorkerProcess) -> None:
    request(aworker, 1, "gate", name="dup")
    request(aworker, 1, "async_add", a=1, b=1)
    reply = aworker.recv()
    assert reply["id"] == 1 and reply["error"]["type"] == "BadRequest"
    assert "already in flight" in reply["error"]["message"]
    aworker.result("open_gate", {"name": "dup"})
    assert collect(aworker, [1])[1][0]["result"]["gate"] == "dup"


# -- results and failures of async calls --------------------------------------------------------


def test_async_results_failures_and_journal(aworker: WorkerProcess) -> None:
    assert aworker.call("async_add", {"a": 2, "b": 40}) == {
        "id": aworker._next_id - 1,
        "success": True,
        "result": 42,
    }
    error = aworker.call("async_fail", {"message": "bad"})["error"]
    assert error["type"] == "ValueError" and error["message"] == "bad"
    assert "async_handlers_for_tests.py" in error["traceback"]
    assert "calls.py" not in error["traceback"]
    reply = aworker.call("async_journaled", {"value": 3, "session_id": "j"})
    assert reply["result"] == 1
    assert reply["journal"] == {"command": "async_add", "args": {"a": 3, "b": 0}}


def test_a_sync_handler_returning_a_coroutine_is_a_type_error(aworker: WorkerProcess) -> None:
    error = aworker.call("returns_coroutine")["error"]
    assert error["type"] == "TypeError"
    assert "async def" in error["message"]
    assert "was never awaited" not in aworker.stderr.text


# -- cancel -------------------------------------------------------------------------------------


def test_cancel_ends_the_call_with_cancelled_and_the_handler_sees_it(
    aworker: WorkerProcess,
) -> None:
    request(aworker, 7, "gate", name="never")
    wait_until(lambda: started(aworker, 7), "call 7 starting")
    aworker.send({"id": 7, "cancel": True})
    error = cancelled_error(aworker.recv(), 7)
    assert error["message"] == "call 7 ('gate') was cancelled: cancelled by the host"
    assert {"event": "cancelled", "id": 7} in aworker.result("events")
    stats = aworker.result("get_stats")
    assert stats["cancelled"] == 1 and stats["in_flight"] == 0


def test_a_handler_that_swallows_the_cancel_is_still_answered_cancelled(
    aworker: WorkerProcess,
) -> None:
    request(aworker, 8, "gate", name="never", swallow=True)
    wait_until(lambda: started(aworker, 8), "call 8 starting")
    aworker.send({"id": 8, "cancel": True})
    cancelled_error(aworker.recv(), 8)


def test_cancel_before_the_task_ran_is_answered_cancelled(aworker: WorkerProcess) -> None:
    # Both frames arrive in one read: the task is cancelled before its first step.
    aworker.send_raw(
        encode({"id": 9, "command": "gate", "args": {"name": "never"}})
        + encode({"id": 9, "cancel": True})
    )
    cancelled_error(aworker.recv(), 9)
    assert aworker.result("get_stats")["in_flight"] == 0


def test_cancel_of_an_unknown_or_finished_call_is_ignored(aworker: WorkerProcess) -> None:
    aworker.send({"id": 1234, "cancel": True})
    assert aworker.result("async_add", {"a": 1, "b": 1}) == 2
    finished = aworker._next_id - 1
    aworker.send({"id": finished, "cancel": True})
    # A sync call cannot be cancelled: its cancel is read after it finished.
    aworker.send({"id": 50, "command": "echo", "args": {"x": 1}})
    aworker.send({"id": 50, "cancel": True})
    assert aworker.recv() == {"id": 50, "success": True, "result": {"x": 1}}
    # Nothing was sent for any of the cancels: the next frame is the next reply.
    reply = aworker.call("ping")
    assert reply["result"]["status"] == "ok"
    stats = aworker.result("get_stats")
    assert stats["cancelled"] == 0 and stats["requests"] == 5  # ping, add, echo, ping, stats


def test_bad_control_frames_are_logged_and_dropped(aworker: WorkerProcess) -> None:
    request(aworker, 1, "gate", name="control")
    aworker.send({"id": 1, "cancel": False})
    aworker.send({"id": 1, "credit": 0})
    aworker.send({"id": 1, "credit": "5"})
    aworker.send({"id": 1, "credit": True})
    assert aworker.result("get_stats")["dropped_frames"] == 4
    text = aworker.stderr.wait_for("'credit' must be a positive integer, got True")
    assert "dropping cancel frame for 1: 'cancel' must be true" in text
    aworker.result("open_gate", {"name": "control"})
    assert collect(aworker, [1])[1][0]["success"] is True
    # A frame with neither command nor control field is still a bad request.
    aworker.send({"id": 2, "args": {}})
    assert aworker.recv()["error"]["type"] == "BadRequest"


# -- streams ------------------------------------------------------------------------------------


def test_sync_generator_streams_chunks_then_its_return_value(aworker: WorkerProcess) -> None:
    request(aworker, 1, "count", n=5)
    frames = collect(aworker, [1])[1]
    assert frames == [{"id": 1, "chunk": i} for i in range(5)] + [
        {"id": 1, "success": True, "result": {"total": 5}}
    ]
    request(aworker, 2, "count_plain", n=2)
    assert collect(aworker, [2])[2][-1] == {"id": 2, "success": True, "result": None}


def test_async_generator_streams_chunks_then_null(aworker: WorkerProcess) -> None:
    request(aworker, 1, "async_count", n=3)
    frames = collect(aworker, [1])[1]
    assert [f.get("chunk") for f in frames[:-1]] == [{"i": i, "id": 1} for i in range(3)]
    assert frames[-1] == {"id": 1, "success": True, "result": None}


def test_an_async_generator_ends_with_the_final_it_yields(aworker: WorkerProcess) -> None:
    request(aworker, 1, "async_count", n=2, final=True)
    frames = collect(aworker, [1])[1]
    assert [f.get("chunk") for f in frames[:-1]] == [{"i": i, "id": 1} for i in range(2)]
    assert frames[-1] == {"id": 1, "success": True, "result": {"total": 2}}


@pytest.mark.parametrize("command", ["produce", "async_produce"])
def test_a_stream_stops_after_the_window_until_credit_arrives(
    aworker: WorkerProcess, command: str
) -> None:
    request(aworker, 1, command, name="big", n=10_000)
    chunks = [aworker.recv() for _ in range(WINDOW)]
    assert chunks == [{"id": 1, "chunk": i} for i in range(WINDOW)]
    # Not advanced without credit: the next frame is the reply to this sync call, and
    # the generator has produced exactly the window.
    assert aworker.result("produced") == {"big": WINDOW}
    rss_before = aworker.result("get_stats")["rss_bytes"]
    aworker.send({"id": 1, "credit": 5})
    more = [aworker.recv() for _ in range(5)]
    assert more == [{"id": 1, "chunk": WINDOW + i} for i in range(5)]
    assert aworker.result("produced") == {"big": WINDOW + 5}
    rss_after = aworker.result("get_stats")["rss_bytes"]
    if rss_before and rss_after:
        assert rss_after - rss_before < 4 * 1024 * 1024
    aworker.send({"id": 1, "cancel": True})
    cancelled_error(aworker.recv(), 1)
    events = aworker.result("events")
    assert {"event": "stream cancelled", "name": "big", "at": WINDOW + 5} in events
    assert {"event": "stream closed", "name": "big"} in events


def test_credit_lets_a_long_stream_finish(aworker: WorkerProcess) -> None:
    total = 100
    request(aworker, 1, "produce", name="long", n=total)
    received: List[int] = []
    while True:
        frame = aworker.recv()
        if is_final(frame):
            break
        received.append(frame["chunk"])
        aworker.send({"id": 1, "credit": 1})
    assert received == list(range(total))
    assert frame == {"id": 1, "success": True, "result": total}
    # Credit for a call that has ended is ignored.
    aworker.send({"id": 1, "credit": 3})
    assert aworker.result("ping")["status"] == "ok"


def test_stream_failures(spawn: SpawnWorker) -> None:
    worker = spawn("--max-frame-bytes", "16384", modules=MODULES)
    worker.handshake()
    request(worker, 1, "stream_fails")
    frames = collect(worker, [1])[1]
    assert frames[0] == {"id": 1, "chunk": 1}
    assert frames[1]["error"]["type"] == "ValueError"
    assert "stream broke" in frames[1]["error"]["traceback"]
    request(worker, 2, "stream_bad_chunk")
    frames = collect(worker, [2])[2]
    assert frames[0] == {"id": 2, "chunk": 1}
    assert frames[1]["error"]["type"] == "SerializationError"
    assert "chunk 1 of command 'stream_bad_chunk'" in frames[1]["error"]["message"]
    request(worker, 3, "stream_big_chunk", size=20_000)
    error = collect(worker, [3])[3][0]["error"]
    assert error["type"] == "ResultTooLarge" and "maximum frame size of 16384" in error["message"]
    assert {"event": "advanced after a bad chunk"} not in worker.result("events")


# -- heartbeat ----------------------------------------------------------------------------------


def test_ping_is_answered_at_once_while_32_async_calls_wait(aworker: WorkerProcess) -> None:
    for i in range(1, 33):
        request(aworker, i, "gate", name="heartbeat")
    request(aworker, 100, "ping")
    # No call can finish before the gate opens: the next frame must be the ping's reply.
    reply = aworker.recv()
    assert reply["id"] == 100 and reply["result"]["status"] == "ok"
    assert aworker.result("get_stats")["in_flight"] == 32
    aworker.result("open_gate", {"name": "heartbeat"})
    frames = collect(aworker, range(1, 33))
    assert all(f[0]["success"] for f in frames.values())


def test_a_blocked_loop_cannot_answer_ping(aworker: WorkerProcess) -> None:
    request(aworker, 1, "block_loop", seconds=0.5)
    aworker.stderr.wait_for("blocking the loop")
    request(aworker, 2, "ping")
    # The misbehaving handler holds the loop: the ping is answered only after it.
    first, second = aworker.recv(), aworker.recv()
    assert (first["id"], second["id"]) == (1, 2)
    assert first["result"] == "unblocked" and second["result"]["status"] == "ok"


# -- one request at a time, as an old host sends them ------------------------------------------


def test_one_request_at_a_time_sees_plain_replies(aworker: WorkerProcess) -> None:
    for i in range(200):
        command = "async_add" if i % 2 else "add"
        aworker.send({"id": 1000 + i, "command": command, "args": {"a": i, "b": 1}})
        assert aworker.recv() == {"id": 1000 + i, "success": True, "result": i + 1}


def test_pipelined_sync_calls_are_answered_in_order_while_a_call_waits(
    aworker: WorkerProcess,
) -> None:
    request(aworker, 1, "gate", name="pipeline")
    aworker.send_raw(
        b"".join(encode({"id": 10 + i, "command": "echo", "args": {"i": i}}) for i in range(100))
    )
    for i in range(100):
        assert aworker.recv() == {"id": 10 + i, "success": True, "result": {"i": i}}
    aworker.result("open_gate", {"name": "pipeline"})
    assert collect(aworker, [1])[1][0]["success"] is True


def test_a_host_that_stops_reading_does_not_grow_the_worker(aworker: WorkerProcess) -> None:
    # 150 replies of 200 kB (30 MB) asked for at once, none read for a while: the worker
    # stops reading requests once about 1 MiB of replies wait, so its memory stays flat.
    rss_before = aworker.result("get_stats")["rss_bytes"]
    count = 150
    aworker.send_raw(
        b"".join(
            encode({"id": 100 + i, "command": "huge", "args": {"size": 200_000}})
            for i in range(count)
        )
    )

    def rss() -> int:
        with open(f"/proc/{aworker.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def output_pipe_full() -> bool:
        import fcntl
        import struct
        import termios

        pending = fcntl.ioctl(aworker.stdout_fd, termios.FIONREAD, b"\0\0\0\0")
        return struct.unpack("i", pending)[0] >= 60_000

    deadline = time.monotonic() + DEFAULT_TIMEOUT
    while not output_pipe_full():
        assert time.monotonic() < deadline, "the worker never filled its output pipe"
    with open(f"/proc/{aworker.pid}/stat") as stat:
        state = stat.read().rsplit(")", 1)[1].split()[0]
    grown = rss() - (rss_before or rss())
    assert grown < 12 * 1024 * 1024, f"worker grew by {grown} bytes (state {state})"
    for i in range(count):
        reply = aworker.recv()
        assert reply["id"] == 100 + i and len(reply["result"]) == 200_000
    assert aworker.result("echo", {"after": True}) == {"after": True}


def test_a_request_is_served_only_once_earlier_replies_are_in_the_pipe(
    aworker: WorkerProcess,
) -> None:
    # Three sync calls sent at once (pipelined): a reply far larger than the pipe, a
    # small one, then a crash. The crash may only run once both replies are wholly in
    # the pipe, so both arrive intact before end of input, however slowly the host
    # reads: a host that never saw a reply knows nothing after it ran.
    aworker.send_raw(
        encode({"id": 1, "command": "huge", "args": {"size": 300_000}})
        + encode({"id": 2, "command": "echo", "args": {"n": 2}})
        + encode({"id": 3, "command": "exit_now", "args": {"code": 70}})
    )
    first = aworker.recv()
    assert first["id"] == 1 and len(first["result"]) == 300_000
    assert aworker.recv() == {"id": 2, "success": True, "result": {"n": 2}}
    aworker.read_eof()
    assert aworker.wait() == 70


# -- stopping -----------------------------------------------------------------------------------


def test_end_of_input_cancels_calls_in_flight_and_exits_promptly(
    aworker: WorkerProcess,
) -> None:
    for i in (1, 2, 3):
        request(aworker, i, "gate", name="forever")
    wait_until(lambda: all(started(aworker, i) for i in (1, 2, 3)), "all three starting")
    began = time.monotonic()
    aworker.close_stdin()
    frames = collect(aworker, [1, 2, 3])
    for i in (1, 2, 3):
        assert "the worker is stopping" in cancelled_error(frames[i][0], i)["message"]
    aworker.read_eof()
    assert aworker.wait() == 0
    assert time.monotonic() - began < 2.0
    assert "Traceback" not in aworker.stderr.wait_eof()


def test_executor_threads_do_not_outlive_the_worker(aworker: WorkerProcess) -> None:
    assert aworker.result("in_thread", {"values": [1, 2, 3]}) == 6
    aworker.close_stdin()
    assert aworker.wait() == 0
    assert "non-daemon thread" not in aworker.stderr.wait_eof()


def test_shutdown_replies_then_cancels_calls_in_flight(aworker: WorkerProcess) -> None:
    request(aworker, 1, "gate", name="forever")
    wait_until(lambda: started(aworker, 1), "call 1 starting")
    request(aworker, 2, "shutdown")
    request(aworker, 3, "echo")  # read after shutdown: never served
    frames = collect(aworker, [1, 2])
    assert frames[2][0]["result"]["status"] == "shutting_down"
    cancelled_error(frames[1][0], 1)
    aworker.read_eof()
    assert aworker.wait() == 0


def test_broken_output_with_calls_in_flight_exits_quietly(aworker: WorkerProcess) -> None:
    request(aworker, 1, "gate", name="forever")
    wait_until(lambda: started(aworker, 1), "call 1 starting")
    assert aworker.proc.stdout is not None
    aworker.proc.stdout.close()
    aworker.send({"id": 2, "command": "echo", "args": {}})
    assert aworker.wait() == 0
    text = aworker.stderr.wait_eof()
    assert "Traceback" not in text and "BrokenPipeError" not in text


def test_sigterm_with_calls_in_flight_ends_the_worker(
    spawn: SpawnWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the host starts it: in a process group of its own, with the host's pid.
    real_popen = subprocess.Popen
    monkeypatch.setattr(
        conftest.subprocess,
        "Popen",
        lambda *args, **kwargs: real_popen(*args, start_new_session=True, **kwargs),
    )
    worker = spawn(modules=MODULES, env={"SNAKEPOOL_HOST_PID": str(os.getpid())})
    monkeypatch.setattr(conftest.subprocess, "Popen", real_popen)
    worker.handshake()
    for i in (1, 2):
        request(worker, i, "gate", name="forever")
    wait_until(lambda: started(worker, 1) and started(worker, 2), "both calls starting")
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait() == 128 + signal.SIGTERM


def test_frames_without_usable_ids_are_still_dropped(aworker: WorkerProcess) -> None:
    request(aworker, 1, "gate", name="drops")
    aworker.send_raw(raw_frame(b"not json") + raw_frame(b'{"cancel": true}'))
    assert aworker.result("get_stats")["dropped_frames"] == 2
    aworker.result("open_gate", {"name": "drops"})
    assert collect(aworker, [1])[1][0]["success"] is True
