"""The pieces that need no server: event parsing, error mapping, request shapes."""

from __future__ import annotations

import pytest

import snakepool_client as sp
from snakepool_client.errors import error_from_body
from snakepool_client.sse import NOTHING, CallEvents, EventParser, ServerEvent
from snakepool_client.wire import call_request, check_session_id


def feed_all(parser: EventParser, text: str) -> list:
    events = [parser.feed(line) for line in text.split("\n")]
    return [event for event in events if event is not None]


def test_event_parser_follows_the_event_stream_format() -> None:
    text = (
        ": keep-alive\n\n"
        "event: chunk\ndata: {\"n\": 0}\n\n"
        "event:result\ndata:{\"result\":\ndata: 1}\n\n"
        "data: plain\n\n"
        "event: ignored-without-data\n\n"
    )
    assert feed_all(EventParser(), text) == [
        ServerEvent("chunk", '{"n": 0}'),
        ServerEvent("result", '{"result":\n1}'),
        ServerEvent("message", "plain"),
    ]


def test_call_events_give_chunks_then_the_result() -> None:
    events = CallEvents("rid")
    lines = ["event: chunk", "data: null", "", "event: chunk", "data: [1]", ""]
    chunks = [chunk for chunk in map(events.feed, lines) if chunk is not NOTHING]
    assert chunks == [None, [1]]
    with pytest.raises(RuntimeError):
        events.result()
    for line in ["event: result", 'data: {"result": {"total": 2}}', ""]:
        events.feed(line)
    assert events.finished and events.result() == {"total": 2}


def test_an_error_event_ends_the_call_with_a_typed_error() -> None:
    events = CallEvents("rid-1")
    data = '{"error": {"kind": "worker_error", "message": "m", "python_type": "KeyError"}}'
    for line in ["event: error", f"data: {data}", ""]:
        events.feed(line)
    with pytest.raises(sp.WorkerError) as raised:
        events.result()
    error = raised.value
    assert (error.python_type, error.request_id, error.status) == ("KeyError", "rid-1", None)


def test_a_stream_that_ends_early_is_a_connection_error() -> None:
    events = CallEvents("rid")
    events.feed("event: chunk")
    events.end()
    with pytest.raises(sp.ConnectionError) as raised:
        events.result()
    assert raised.value.kind == "connect"


def test_every_kind_maps_to_its_class_and_unknown_kinds_to_the_base() -> None:
    for kind, cls in sp.ERROR_CLASSES.items():
        error = error_from_body({"kind": kind, "message": "m"}, status=500)
        assert type(error) is cls and error.kind == kind and isinstance(error, sp.SnakepoolError)
    unknown = error_from_body({"kind": "brand_new_kind", "message": "m", "x": 1}, status=418)
    assert type(unknown) is sp.SnakepoolError
    assert (unknown.kind, unknown.status, unknown.body["x"]) == ("brand_new_kind", 418, 1)
    assert type(error_from_body({}, status=502)).__name__ == "SnakepoolError"
    assert error_from_body({}, status=502).kind == "http_502"


def test_a_rebuild_failure_names_its_cause() -> None:
    body = {
        "kind": "session_rebuild_failed",
        "message": "m",
        "entry": 2,
        "cause": {"kind": "worker_crashed", "message": "died", "status": "exit status 7"},
    }
    cause = error_from_body(body, status=502).cause
    assert isinstance(cause, sp.WorkerCrashedError) and cause.exit_status == "exit status 7"


def test_session_calls_carry_their_id_in_the_body_and_the_header() -> None:
    request = call_request(
        "echo", {"a": 1}, session_id="s-é", timeout=1.5, request_id="r" * 16, stream=True
    )
    assert request["json"] == {
        "command": "echo",
        "args": {"a": 1},
        "session_id": "s-é",
        "timeout_ms": 1500,
    }
    assert request["headers"] == {
        "x-session-id": "s-é".encode(),
        "x-request-id": "r" * 16,
        "accept": "text/event-stream",
    }
    assert call_request("ping", None, session_id=None, timeout=None, request_id=None, stream=False)[
        "json"
    ] == {"command": "ping", "args": {}}


@pytest.mark.parametrize("bad", ["", "a\nb", " padded", "tab\t"])
def test_session_ids_a_header_cannot_carry_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        check_session_id(bad)


def test_request_ids_are_what_the_server_accepts() -> None:
    rid = sp.new_request_id()
    assert 16 <= len(rid) <= 128 and rid.isalnum()
    assert rid != sp.new_request_id()
