"""End-to-end tests against real ``python -m snakepool_worker`` processes over real pipes."""

from __future__ import annotations

import re
import struct
import sys

import pytest
from conftest import HANDLERS_MODULE, SpawnWorker, WorkerProcess, encode, raw_frame


def test_handshake_returns_manifest(spawn_worker: SpawnWorker) -> None:
    process = spawn_worker()
    result = process.handshake(worker_id="w1")
    assert result["status"] == "ok"
    assert result["worker_id"] == "w1"
    assert result["pid"] == process.pid
    manifest = result["manifest"]
    assert manifest["runtime"] == "snakepool_worker"
    assert manifest["runtime_version"] == "0.1.0"
    assert manifest["protocol_version"] == 1
    assert manifest["pid"] == process.pid
    assert manifest["python_version"] == "%d.%d.%d" % sys.version_info[:3]
    assert manifest["python_executable"]
    assert manifest["worker_id"] == "w1"
    assert manifest["max_frame_bytes"] == 64 * 1024 * 1024
    assert manifest["modules"] == [HANDLERS_MODULE]
    commands = manifest["commands"]
    for builtin in ("ping", "get_stats", "cleanup_session", "shutdown"):
        assert commands[builtin]["mutates_session"] is False
    assert commands["shutdown"]["internal"] is True
    assert commands["cleanup_session"]["internal"] is True
    assert "internal" not in commands["ping"] and "internal" not in commands["get_stats"]
    assert commands["set_value"] == {
        "mutates_session": True,
        "doc": "Store args.value under args.key in the session.",
        "module": HANDLERS_MODULE,
    }
    assert commands["echo"] == {
        "mutates_session": False,
        "doc": "Return the arguments unchanged.",
        "module": HANDLERS_MODULE,
    }
    assert commands["fail"] == {"mutates_session": False, "doc": "", "module": HANDLERS_MODULE}
    # A plain ping is small: no manifest unless asked for.
    plain = process.result("ping")
    assert plain == {"status": "ok", "worker_id": "w1", "pid": process.pid}
    assert "manifest" in process.result("ping", {"manifest": True})


def test_a_ping_after_the_handshake_does_not_rename_the_worker(worker: WorkerProcess) -> None:
    reply = worker.result("ping", {"worker_id": "evil", "initialization": True})
    assert reply["worker_id"] == "t1" and reply["manifest"]["worker_id"] == "t1"
    assert worker.result("get_stats")["worker_id"] == "t1"
    assert worker.result("context")["worker_id"] == "t1"
    worker.result("log_message", {"text": "after-the-ping"})
    text = worker.stderr.wait_for("handler says after-the-ping")
    line = next(line for line in text.splitlines() if "after-the-ping" in line)
    assert "WARNING [t1] handlers_for_tests: handler says after-the-ping" in line


def test_worker_id_reaches_handlers_and_log_lines(worker: WorkerProcess) -> None:
    info = worker.result("context")
    assert info["worker_id"] == "t1"
    assert info["command"] == "context"
    assert info["logger"] == HANDLERS_MODULE
    assert info["session_id"] is None
    worker.result("log_message", {"text": "hello-log"})
    text = worker.stderr.wait_for("handler says hello-log")
    line = next(line for line in text.splitlines() if "hello-log" in line)
    assert "WARNING [t1] handlers_for_tests: handler says hello-log" in line


def test_echo_round_trip(worker: WorkerProcess) -> None:
    args = {"text": "héllo \u2603", "n": [1, 2.5, None, True], "nested": {"a": {}}}
    reply = worker.call("echo", args)
    assert reply == {"id": reply["id"], "success": True, "result": args}
    assert worker.result("add", {"a": 2, "b": 40}) == 42


def test_thousand_sequential_requests_in_order(worker: WorkerProcess) -> None:
    for i in range(1000):
        worker.send({"id": 1000 + i, "command": "add", "args": {"a": i, "b": 1}})
        reply = worker.recv()
        assert reply == {"id": 1000 + i, "success": True, "result": i + 1}


def test_pipelined_requests_are_answered_in_order(worker: WorkerProcess) -> None:
    worker.send_raw(
        b"".join(encode({"id": i, "command": "echo", "args": {"i": i}}) for i in range(300))
    )
    for i in range(300):
        assert worker.recv() == {"id": i, "success": True, "result": {"i": i}}


def test_handler_exception_becomes_failure_and_worker_keeps_serving(
    worker: WorkerProcess,
) -> None:
    reply = worker.call("fail", {"message": "bad input"})
    assert reply["success"] is False
    error = reply["error"]
    assert error["type"] == "ValueError"
    assert error["message"] == "bad input"
    assert "Traceback (most recent call last)" in error["traceback"]
    assert "handlers_for_tests.py" in error["traceback"]
    assert "ValueError: bad input" in error["traceback"]
    assert worker.result("add", {"a": 1, "b": 1}) == 2
    # A missing key inside a handler is reported the same way.
    assert worker.call("add", {"a": 1})["error"]["type"] == "KeyError"


def test_unknown_command(worker: WorkerProcess) -> None:
    error = worker.call("does_not_exist")["error"]
    assert error["type"] == "UnknownCommand"
    assert error["message"].startswith("unknown command 'does_not_exist' (known: add, ")
    assert "echo" in error["message"] and "ping" in error["message"]


def test_bad_requests(worker: WorkerProcess) -> None:
    worker.send({"id": 5, "args": {}})
    reply = worker.recv()
    assert reply["id"] == 5 and reply["error"]["type"] == "BadRequest"
    worker.send({"id": 6, "command": "echo", "args": [1, 2]})
    reply = worker.recv()
    assert reply["id"] == 6 and reply["error"]["type"] == "BadRequest"
    assert worker.result("echo", {"ok": True}) == {"ok": True}


def test_malformed_json_without_id_is_logged_and_skipped(worker: WorkerProcess) -> None:
    worker.send_raw(raw_frame(b'{"command": "echo", this is not json'))
    worker.send({"id": 77, "command": "echo", "args": {"after": 1}})
    # The next frame on stdout is the reply to the valid request: nothing was sent for
    # the malformed frame.
    assert worker.recv() == {"id": 77, "success": True, "result": {"after": 1}}
    text = worker.stderr.wait_for("dropping frame")
    assert "ERROR [t1]" in text
    assert "this is not json" in text


def test_frame_without_id_is_logged(worker: WorkerProcess) -> None:
    worker.send({"command": "echo", "args": {}})
    worker.send({"id": 78, "command": "echo"})
    assert worker.recv()["id"] == 78
    assert "request has no 'id'" in worker.stderr.wait_for("dropping frame")


def test_malformed_frame_with_recoverable_id_gets_protocol_error(worker: WorkerProcess) -> None:
    worker.send_raw(raw_frame(b'{"id": 91, "command": "echo", "args": {"s": "\xc3\x28"}}'))
    reply = worker.recv()
    assert reply["id"] == 91 and reply["success"] is False
    assert reply["error"]["type"] == "ProtocolError"
    assert worker.result("echo", {}) == {}


def test_oversized_frame_is_discarded_and_next_request_answered(
    spawn_worker: SpawnWorker,
) -> None:
    process = spawn_worker("--max-frame-bytes", "16384")
    process.handshake()
    size = 200_000
    process.send_raw(
        struct.pack(">I", size) + b"\x00" * size + encode({"id": 5, "command": "echo", "args": {}})
    )
    assert process.recv() == {"id": 5, "success": True, "result": {}}
    text = process.stderr.wait_for("exceeds the maximum frame size")
    assert f"incoming frame of {size} bytes exceeds the maximum frame size of 16384 bytes" in text
    assert process.result("get_stats")["dropped_frames"] == 1


def test_huge_frame_header_does_not_allocate(worker: WorkerProcess) -> None:
    # 4 GiB - 1 announced: the worker must not try to allocate it; it discards what
    # arrives and exits cleanly when input ends mid-frame.
    worker.send_raw(b"\xff\xff\xff\xff" + b"\x00" * 1000)
    worker.close_stdin()
    assert worker.wait() == 0
    text = worker.stderr.wait_eof()
    assert "exceeds the maximum frame size" in text and "truncated frame" in text
    assert "MemoryError" not in text


def test_print_in_handler_goes_to_stderr_not_the_protocol(worker: WorkerProcess) -> None:
    assert worker.result("print_stdout", {"text": "stray-output"}) == "printed"
    assert worker.result("echo", {"still": "framed"}) == {"still": "framed"}
    text = worker.stderr.wait_for("stray-output via child")
    assert "stray-output\n" in text
    assert "stray-output via fd 1" in text


def test_large_stderr_output_does_not_deadlock(worker: WorkerProcess) -> None:
    assert worker.result("spam_stderr", {"size": 300_000}) == 300_000
    worker.stderr.wait_for("END-OF-SPAM")
    assert len(worker.stderr) >= 300_000
    assert worker.result("add", {"a": 1, "b": 2}) == 3


def test_non_serialisable_result(worker: WorkerProcess) -> None:
    error = worker.call("non_serialisable")["error"]
    assert error["type"] == "SerializationError"
    assert "'non_serialisable'" in error["message"]
    assert worker.result("echo", {}) == {}


def test_result_too_large(spawn_worker: SpawnWorker) -> None:
    process = spawn_worker("--max-frame-bytes", "65536")
    assert process.handshake()["manifest"]["max_frame_bytes"] == 65536
    error = process.call("huge", {"size": 100_000})["error"]
    assert error["type"] == "ResultTooLarge"
    assert re.search(
        r"is 1000\d\d bytes, larger than the maximum frame size of 65536", error["message"]
    )
    assert len(process.result("huge", {"size": 60_000})) == 60_000


def test_max_frame_bytes_from_environment(spawn_worker: SpawnWorker) -> None:
    process = spawn_worker(env={"SNAKEPOOL_MAX_FRAME_BYTES": "100000"})
    assert process.handshake()["manifest"]["max_frame_bytes"] == 100000


def test_modules_from_environment_and_json_override(spawn_worker: SpawnWorker) -> None:
    process = spawn_worker(
        modules=(), env={"SNAKEPOOL_MODULES": f" {HANDLERS_MODULE} ,", "SNAKEPOOL_JSON": "json"}
    )
    manifest = process.handshake()["manifest"]
    assert manifest["modules"] == [HANDLERS_MODULE]
    assert manifest["json_backend"] == "json"
    assert process.result("echo", {"x": "é"}) == {"x": "é"}


def test_sessions_are_isolated_and_cleaned_up(worker: WorkerProcess) -> None:
    def call(command: str, session_id: str, **args: object) -> object:
        return worker.result(command, {"session_id": session_id, **args})

    call("set_value", "s1", key="k", value="one")
    call("set_value", "s2", key="k", value="two")
    call("set_value", "s1", key="other", value=1)
    assert call("get_value", "s1", key="k") == "one"
    assert call("get_value", "s2", key="k") == "two"
    assert worker.result("get_value", {"key": "k"}) is None
    assert call("context", "s1")["session"] == {"k": "one", "other": 1}
    assert worker.result("get_stats")["sessions"] == 2

    assert worker.result("cleanup_session", {"session_id": "s1"}) == {
        "session_id": "s1",
        "existed": True,
    }
    assert call("get_value", "s1", key="k") is None
    assert call("get_value", "s2", key="k") == "two"
    assert worker.result("cleanups") == [{"session_id": "s1", "keys": ["k", "other"]}]
    # The failing hook was logged, and did not stop the cleanup.
    assert "cleanup hook failure for s1" in worker.stderr.wait_for("failing_cleanup")

    # get_value on s1 above created a fresh, empty session; clean it and s2 up.
    assert worker.result("cleanup_session", {"session_id": "s1"})["existed"] is True
    assert worker.result("cleanup_session", {"session_id": "s2"})["existed"] is True
    assert worker.result("cleanup_session", {"session_id": "s2"})["existed"] is False
    assert worker.result("get_stats")["sessions"] == 0
    error = worker.call("cleanup_session", {})["error"]
    assert error["type"] == "BadRequest"


def test_get_stats_counts(spawn_worker: SpawnWorker) -> None:
    process = spawn_worker()
    process.handshake()
    process.result("echo", {})
    process.result("echo", {})
    process.call("fail")
    process.call("nope")
    process.send_raw(raw_frame(b"garbage"))
    stats = process.result("get_stats")
    assert stats["worker_id"] == "t1"
    assert stats["pid"] == process.pid
    assert stats["requests"] == 6  # ping, 2 x echo, fail, nope, get_stats
    assert stats["errors"] == 2
    assert stats["dropped_frames"] == 1
    assert stats["commands"] == {"ping": 1, "echo": 2, "fail": 1, "get_stats": 1}
    assert stats["sessions"] == 0
    assert isinstance(stats["uptime_s"], float) and stats["uptime_s"] > 0
    assert stats["rss_bytes"] is None or stats["rss_bytes"] > 1_000_000


def test_shutdown_replies_then_exits_zero(worker: WorkerProcess) -> None:
    assert worker.result("shutdown") == {"status": "shutting_down", "worker_id": "t1"}
    worker.read_eof()
    assert worker.wait() == 0


def test_exits_zero_on_end_of_input(worker: WorkerProcess) -> None:
    worker.close_stdin()
    worker.read_eof()
    assert worker.wait() == 0
    assert "Traceback" not in worker.stderr.wait_eof()


def test_exits_on_end_of_input_despite_non_daemon_threads(worker: WorkerProcess) -> None:
    assert worker.result("start_blocking_thread") == "never-ending"
    worker.close_stdin()
    assert worker.wait() == 0
    assert "non-daemon thread(s) still running: never-ending" in worker.stderr.wait_eof()


def test_exits_zero_on_end_of_input_mid_frame(worker: WorkerProcess) -> None:
    worker.send_raw(b"\x00\x00\x01\x00" + b"{" * 10)
    worker.close_stdin()
    assert worker.wait() == 0
    text = worker.stderr.wait_eof()
    assert "truncated frame" in text and "Traceback" not in text


def test_broken_stdout_pipe_exits_quietly(worker: WorkerProcess) -> None:
    assert worker.proc.stdout is not None
    worker.proc.stdout.close()
    worker.send({"id": 3, "command": "echo", "args": {}})
    assert worker.wait() == 0
    text = worker.stderr.wait_eof()
    assert "Traceback" not in text
    assert "BrokenPipeError" not in text


@pytest.mark.parametrize(
    "module, fragment",
    [
        ("broken_module_for_tests", "RuntimeError: intentional import failure"),
        ("no_such_module_for_tests", "ModuleNotFoundError"),
        ("duplicate_module_for_tests", "already registered"),
    ],
)
def test_module_import_failure_exits_3(
    spawn_worker: SpawnWorker, module: str, fragment: str
) -> None:
    process = spawn_worker(modules=(HANDLERS_MODULE, module))
    assert process.wait() == 3
    text = process.stderr.wait_eof()
    summary = text.rstrip().splitlines()[-1]
    assert summary.startswith(f"snakepool_worker: failed to import module '{module}': ")
    assert fragment in summary
    assert "Traceback (most recent call last)" in text


def test_invalid_max_frame_bytes_is_a_usage_error(spawn_worker: SpawnWorker) -> None:
    process = spawn_worker("--max-frame-bytes", "10")
    assert process.wait() == 2
    assert "--max-frame-bytes" in process.stderr.wait_eof()


def test_log_level_from_environment(spawn_worker: SpawnWorker) -> None:
    process = spawn_worker(env={"SNAKEPOOL_LOG_LEVEL": "debug"})
    process.handshake()
    assert "DEBUG [t1] snakepool_worker.runtime: ready: pid" in process.stderr.wait_for("ready:")
    quiet = spawn_worker(env={"SNAKEPOOL_LOG_LEVEL": "loud"})
    quiet.handshake()
    quiet.close_stdin()
    assert quiet.wait() == 0
    text = quiet.stderr.wait_eof()
    assert "unknown SNAKEPOOL_LOG_LEVEL 'loud'; using INFO" in text and "ready:" not in text
