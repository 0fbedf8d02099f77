"""Request dispatch, exercised in-process on ``Runtime.handle_frame`` and ``Runtime.serve``."""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Dict, Optional

import pytest

from snakepool_worker import Context
from snakepool_worker.builtins import register_builtins
from snakepool_worker.protocol import FrameReader, FrameWriter, encode_frame
from snakepool_worker.registry import Registry
from snakepool_worker.runtime import Runtime


@pytest.fixture
def runtime() -> Runtime:
    registry = Registry()
    register_builtins(registry)

    @registry.command("echo")
    def echo(args: Dict[str, Any], ctx: Context) -> Any:
        return args

    @registry.command("remember", mutates_session=True)
    def remember(args: Dict[str, Any], ctx: Context) -> int:
        ctx.session["n"] = ctx.session.get("n", 0) + 1
        return ctx.session["n"]

    @registry.command("explode")
    def explode(args: Dict[str, Any], ctx: Context) -> Any:
        def inner() -> None:
            raise KeyError("missing-key")

        inner()

    return Runtime(registry, worker_id="unit", max_frame_bytes=4096)


def handle(runtime: Runtime, message: Any) -> Optional[Dict[str, Any]]:
    payload = message if isinstance(message, bytes) else json.dumps(message).encode()
    reply = runtime.handle_frame(payload)
    return None if reply is None else json.loads(reply)


def test_success_reply_shape(runtime: Runtime) -> None:
    reply = handle(runtime, {"id": 3, "command": "echo", "args": {"x": 1}, "extra": "ignored"})
    assert reply == {"id": 3, "success": True, "result": {"x": 1}}


def test_absent_or_null_args_mean_empty_object(runtime: Runtime) -> None:
    assert handle(runtime, {"id": 1, "command": "echo"})["result"] == {}
    assert handle(runtime, {"id": 2, "command": "echo", "args": None})["result"] == {}


@pytest.mark.parametrize(
    "message, fragment",
    [
        ({"id": 1}, "'command' must be a string"),
        ({"id": 1, "command": 5}, "'command' must be a string"),
        ({"id": 1, "command": "echo", "args": [1]}, "'args' must be an object"),
        ({"id": 1, "command": "echo", "args": "x"}, "'args' must be an object"),
        ({"id": 1, "command": "echo", "args": {"session_id": 7}}, "session_id must be a string"),
        ({"id": 1, "command": "cleanup_session", "args": {}}, "session_id"),
        ({"id": 1, "command": "ping", "args": {"worker_id": 3}}, "worker_id"),
    ],
)
def test_bad_requests(runtime: Runtime, message: Dict[str, Any], fragment: str) -> None:
    reply = handle(runtime, message)
    assert reply is not None and reply["success"] is False
    assert reply["error"]["type"] == "BadRequest"
    assert fragment in reply["error"]["message"]


def test_unknown_command_lists_known_commands(runtime: Runtime) -> None:
    reply = handle(runtime, {"id": 9, "command": "nope"})
    assert reply["error"] == {
        "type": "UnknownCommand",
        "message": "unknown command 'nope' (known: echo, explode, get_stats, ping, remember)",
        "traceback": "",
    }


def test_handler_exception_reports_type_message_and_handler_traceback(runtime: Runtime) -> None:
    error = handle(runtime, {"id": 4, "command": "explode"})["error"]
    assert error["type"] == "KeyError"
    assert error["message"] == "'missing-key'"
    assert error["traceback"].startswith("Traceback (most recent call last):")
    assert "in explode" in error["traceback"] and "in inner" in error["traceback"]
    assert "handle_frame" not in error["traceback"]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"text"',
        b'{"command": "echo"}',
        b'{"id": -1, "command": "echo"}',
        b'{"id": "7", "command": "echo"}',
        b'{"id": true, "command": "echo"}',
        b'{"id": 1.5, "command": "echo"}',
        b'{"id": 18446744073709551616, "command": "echo"}',
    ],
)
def test_frames_without_usable_id_get_no_reply_and_are_logged(
    runtime: Runtime, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    assert runtime.handle_frame(payload) is None
    assert "dropping frame" in caplog.text
    assert runtime.dropped_frames == 1 and runtime.requests == 0


@pytest.mark.parametrize(
    "payload",
    [b'{"id": 12, "command": "echo", "args": {"s": "\xff"}}', b'{"id": 12, "command": "echo"} xx'],
)
def test_undecodable_frame_with_recoverable_id_gets_protocol_error(
    runtime: Runtime, payload: bytes
) -> None:
    reply = handle(runtime, payload)
    assert reply["id"] == 12 and reply["success"] is False
    assert reply["error"]["type"] == "ProtocolError"
    assert "not valid UTF-8 JSON" in reply["error"]["message"]


def test_serialisation_error_and_result_too_large(runtime: Runtime) -> None:
    reply = handle(runtime, {"id": 1, "command": "echo", "args": {"x": "y" * 5000}})
    assert reply["error"]["type"] == "ResultTooLarge"
    assert "larger than the maximum frame size of 4096 bytes" in reply["error"]["message"]


def test_sessions_and_cleanup(runtime: Runtime) -> None:
    for expected in (1, 2, 3):
        reply = handle(runtime, {"id": 1, "command": "remember", "args": {"session_id": "a"}})
        assert reply["result"] == expected
    assert (
        handle(runtime, {"id": 2, "command": "remember", "args": {"session_id": "b"}})["result"]
        == 1
    )
    # A call without a session id gets scratch state that is not kept.
    assert handle(runtime, {"id": 3, "command": "remember"})["result"] == 1
    assert handle(runtime, {"id": 4, "command": "remember"})["result"] == 1
    # Commands that never touch ctx.session do not create sessions.
    handle(runtime, {"id": 5, "command": "echo", "args": {"session_id": "c"}})
    assert sorted(runtime.sessions) == ["a", "b"]
    cleanup = {"id": 6, "command": "cleanup_session", "args": {"session_id": "a"}}
    assert handle(runtime, cleanup)["result"] == {"session_id": "a", "existed": True}
    assert handle(runtime, cleanup)["result"] == {"session_id": "a", "existed": False}
    assert sorted(runtime.sessions) == ["b"]


def test_stats_count_requests_errors_and_commands(runtime: Runtime) -> None:
    handle(runtime, {"id": 1, "command": "echo"})
    handle(runtime, {"id": 2, "command": "explode"})
    handle(runtime, {"id": 3, "command": "nope"})
    handle(runtime, b"garbage")
    stats = handle(runtime, {"id": 4, "command": "get_stats"})["result"]
    assert stats["requests"] == 4 and stats["errors"] == 2 and stats["dropped_frames"] == 1
    assert stats["commands"] == {"echo": 1, "explode": 1, "get_stats": 1}
    assert stats["worker_id"] == "unit" and stats["pid"] == os.getpid()


def test_manifest_is_cached_until_the_registry_changes(runtime: Runtime) -> None:
    first = runtime.manifest()
    assert runtime.manifest() is first
    runtime.registry.register("late", lambda args, ctx: None)
    second = runtime.manifest()
    assert second is not first and "late" in second["commands"]
    runtime.worker_id = "renamed"
    assert runtime.manifest()["worker_id"] == "renamed"


def test_manifest_marks_shutdown_and_cleanup_session_internal(runtime: Runtime) -> None:
    commands = runtime.manifest()["commands"]
    assert commands["shutdown"]["internal"] is True
    assert commands["cleanup_session"]["internal"] is True
    for public in ("ping", "get_stats", "echo", "remember"):
        assert "internal" not in commands[public], public
    # The worker itself still serves them: only the host sends them.
    reply = handle(runtime, {"id": 1, "command": "cleanup_session", "args": {"session_id": "s"}})
    assert reply["result"] == {"session_id": "s", "existed": False}


def test_ping_names_the_worker_only_in_the_handshake(runtime: Runtime) -> None:
    hello = {"initialization": True, "worker_id": "w3"}
    reply = handle(runtime, {"id": 0, "command": "ping", "args": hello})
    assert reply["result"]["worker_id"] == "w3"
    assert reply["result"]["manifest"]["worker_id"] == "w3"
    assert runtime.worker_id == "w3"
    for request_id, worker_id in enumerate(["evil", 7, ""], start=1):
        args = {"worker_id": worker_id, "initialization": True}
        reply = handle(runtime, {"id": request_id, "command": "ping", "args": args})
        # Ignored after the handshake: not applied, not even checked.
        assert reply["success"] is True, reply
        assert reply["result"]["worker_id"] == "w3"
        assert reply["result"]["manifest"]["worker_id"] == "w3"
    assert runtime.worker_id == "w3"
    assert handle(runtime, {"id": 9, "command": "get_stats"})["result"]["worker_id"] == "w3"


def test_a_first_request_that_is_not_a_ping_ends_the_handshake(runtime: Runtime) -> None:
    assert handle(runtime, {"id": 1, "command": "echo"})["success"] is True
    reply = handle(runtime, {"id": 2, "command": "ping", "args": {"worker_id": "late"}})
    assert reply["result"]["worker_id"] == "unit" and runtime.worker_id == "unit"


def test_serve_loop_over_pipes_until_end_of_input(runtime: Runtime) -> None:
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    requests = [{"id": i, "command": "echo", "args": {"i": i}} for i in range(50)]
    data = b"".join(encode_frame(json.dumps(r).encode()) for r in requests)
    data += b"\x00\x00\x10\x00" + b"z" * 4096 + encode_frame(b'{"id": 50, "command": "echo"}')

    def feed() -> None:
        os.write(in_write, data)
        os.close(in_write)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        status = runtime.serve(FrameReader(in_read, 4000), FrameWriter(out_write))
    finally:
        feeder.join()
        os.close(in_read)
        os.close(out_write)
    assert status == 0
    replies = []
    reader = FrameReader(out_read)
    while True:
        frame = reader.read_frame()
        if frame is None:
            break
        replies.append(json.loads(frame))
    os.close(out_read)
    assert [r["id"] for r in replies] == list(range(51))
    assert runtime.dropped_frames == 1


def test_shutdown_stops_the_loop_after_replying(runtime: Runtime) -> None:
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    os.write(in_write, encode_frame(b'{"id": 1, "command": "shutdown"}'))
    os.write(in_write, encode_frame(b'{"id": 2, "command": "echo"}'))
    try:
        assert runtime.serve(FrameReader(in_read), FrameWriter(out_write)) == 0
        os.close(out_write)
        reader = FrameReader(out_read)
        reply = json.loads(reader.read_frame())
        assert reader.read_frame() is None
    finally:
        for fd in (in_read, in_write, out_read):
            os.close(fd)
    assert reply["result"] == {"status": "shutting_down", "worker_id": "unit"}


# -- journal substitution ---------------------------------------------------------------------


@pytest.fixture
def journal_runtime() -> Runtime:
    registry = Registry()
    register_builtins(registry)

    @registry.command("store", mutates_session=True)
    def store(args: Dict[str, Any], ctx: Context) -> int:
        ctx.session["value"] = args["value"]
        return len(ctx.session)

    @registry.command("expensive", mutates_session=True)
    def expensive(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
        ctx.session["value"] = args["seed"] * 2
        ctx.journal_as("store", {"value": args["seed"] * 2, "session_id": "stripped"})
        return {"computed": args["seed"] * 2}

    @registry.command("journal_then_fail", mutates_session=True)
    def journal_then_fail(args: Dict[str, Any], ctx: Context) -> Any:
        ctx.journal_as("store", {"value": 1})
        raise ValueError("failed after journal_as")

    @registry.command("journal_twice", mutates_session=True)
    def journal_twice(args: Dict[str, Any], ctx: Context) -> Any:
        ctx.journal_as("store", {"value": 1})
        ctx.journal_as("store", {"value": 2})
        return None

    @registry.command("journal_bad", mutates_session=True)
    def journal_bad(args: Dict[str, Any], ctx: Context) -> Any:
        if args["case"] == "unknown":
            ctx.journal_as("no_such_command", {})
        elif args["case"] == "args":
            ctx.journal_as("store", [1])  # type: ignore[arg-type]
        elif args["case"] == "empty":
            ctx.journal_as("", {})
        else:
            ctx.journal_as("store", {"value": object()})
        return None

    return Runtime(registry, worker_id="unit", max_frame_bytes=4096)


def test_journal_as_adds_the_journal_field_to_the_success_reply(
    journal_runtime: Runtime,
) -> None:
    reply = handle(
        journal_runtime, {"id": 7, "command": "expensive", "args": {"seed": 21, "session_id": "s"}}
    )
    assert reply == {
        "id": 7,
        "success": True,
        "result": {"computed": 42},
        "journal": {"command": "store", "args": {"value": 42}},
    }
    # The field order on the wire is id, success, result, journal.
    raw = journal_runtime.handle_frame(
        json.dumps({"id": 8, "command": "expensive", "args": {"seed": 1}}).encode()
    )
    assert raw is not None and list(json.loads(raw)) == ["id", "success", "result", "journal"]


def test_replies_without_journal_as_have_no_journal_field(journal_runtime: Runtime) -> None:
    reply = handle(journal_runtime, {"id": 1, "command": "store", "args": {"value": 3}})
    assert reply == {"id": 1, "success": True, "result": 1}


def test_failed_handler_gets_no_journal_field(journal_runtime: Runtime) -> None:
    reply = handle(journal_runtime, {"id": 2, "command": "journal_then_fail"})
    assert reply["success"] is False and "journal" not in reply
    assert reply["error"]["type"] == "ValueError"


def test_last_journal_as_wins(journal_runtime: Runtime) -> None:
    reply = handle(journal_runtime, {"id": 3, "command": "journal_twice"})
    assert reply["journal"] == {"command": "store", "args": {"value": 2}}


@pytest.mark.parametrize(
    "case, error_type, fragment",
    [
        ("unknown", "ValueError", "'no_such_command' is not registered on this worker"),
        ("args", "TypeError", "args must be a dict"),
        ("empty", "ValueError", "command must be a non-empty string"),
        ("unserialisable", "SerializationError", "not JSON-serialisable"),
    ],
)
def test_bad_journal_as_fails_the_call(
    journal_runtime: Runtime, case: str, error_type: str, fragment: str
) -> None:
    reply = handle(journal_runtime, {"id": 4, "command": "journal_bad", "args": {"case": case}})
    assert reply["success"] is False and "journal" not in reply
    assert reply["error"]["type"] == error_type
    assert fragment in reply["error"]["message"]


def test_journal_as_on_a_bare_context() -> None:
    ctx = Context("w")
    assert ctx.journal is None
    ctx.journal_as("anything", {"a": 1})  # no runtime: the command cannot be checked
    assert ctx.journal == {"command": "anything", "args": {"a": 1}}
