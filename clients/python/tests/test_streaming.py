"""Streamed calls over Server-Sent Events, and cancelling calls by request id."""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Union

import pytest
from conftest import WAIT, unique, wait_until

import snakepool_client as sp


def test_a_stream_gives_its_chunks_then_its_result(client: sp.Client) -> None:
    with client.stream("count", {"n": 5}) as stream:
        assert len(stream.request_id) == 32
        with pytest.raises(RuntimeError):
            stream.result
        assert list(stream) == [{"n": n} for n in range(5)]
        assert stream.finished
    assert stream.result["total"] == 5
    sync_stream = client.stream("count_sync", {"n": 4})
    assert list(sync_stream) == [0, 1, 2, 3] and sync_stream.result == 6


def test_a_session_stream_reports_its_session_state(client: sp.Client) -> None:
    with client.session(unique("tally")) as session:
        first = session.stream("tally", {"add": 4})
        assert session.state == first.session_state == "created"
        assert list(first) == [0] and first.result == 4
        second = session.stream("tally", {"add": 1})
        assert list(second) == [4] and second.result == 5
        assert session.state == "resumed"


def test_an_error_ends_a_stream(client: sp.Client) -> None:
    stream = client.stream("count", {"n": 5, "fail_at": 2})
    chunks = []
    with pytest.raises(sp.WorkerError) as raised:
        for chunk in stream:
            chunks.append(chunk)
    assert chunks == [{"n": 0}, {"n": 1}]
    error = raised.value
    assert (error.python_type, error.status) == ("ValueError", None)
    assert error.request_id == stream.request_id
    with pytest.raises(sp.WorkerError):
        stream.result
    assert list(stream) == []


def test_a_refused_stream_raises_at_once(client: sp.Client) -> None:
    with pytest.raises(sp.ForbiddenError) as raised:
        client.stream("shutdown")
    assert raised.value.status == 403
    # Only a worker knows its commands: an unknown one ends its stream.
    stream = client.stream("no_such_stream")
    with pytest.raises(sp.UnknownCommandError) as unknown:
        list(stream)
    assert unknown.value.status is None


def test_cancelling_a_stream(client: sp.Client) -> None:
    stream = client.stream("count", {"n": 10000, "delay": 0.01, "tag": unique("cancel")})
    assert next(stream) == {"n": 0}
    stream.cancel()
    with pytest.raises(sp.CallCancelledError) as raised:
        for _ in stream:
            pass
    assert raised.value.request_id == stream.request_id
    with pytest.raises(sp.CallNotFoundError) as gone:
        client.cancel(stream.request_id)
    assert gone.value.status == 404


def test_closing_a_stream_early_hangs_up(client: sp.Client) -> None:
    with client.stream("count", {"n": 10000, "delay": 0.01}) as stream:
        assert next(stream) == {"n": 0}
    with pytest.raises(sp.CallCancelledError):
        stream.result
    assert list(stream) == []


def in_background(call: Callable[[], Any]) -> "concurrent.futures.Future[Any]":
    """``call`` on a thread of its own."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def cancel_when_running(target: Union[sp.Client, sp.Session], request_id: str) -> None:
    """Cancel the call under ``request_id`` (of ``target``, a client or a session) once the
    server has it."""

    def cancelled() -> bool:
        try:
            target.cancel(request_id)
        except sp.CallNotFoundError:
            return False
        return True

    wait_until(f"call {request_id} to be in flight", cancelled)


def test_cancelling_a_plain_call_named_by_its_client(client: sp.Client) -> None:
    rid = sp.new_request_id()
    call = in_background(lambda: client.call("nap", {"seconds": 60}, request_id=rid))
    cancel_when_running(client, rid)
    with pytest.raises(sp.CallCancelledError) as raised:
        call.result(timeout=WAIT)
    assert (raised.value.status, raised.value.request_id) == (499, rid)


def test_a_sync_call_is_not_cancellable(client: sp.Client) -> None:
    rid = sp.new_request_id()
    call = in_background(lambda: client.call("sleep_sync", {"seconds": 1.5}, request_id=rid))
    with pytest.raises(sp.NotCancellableError) as raised:
        cancel_when_running(client, rid)
    assert raised.value.status == 409
    assert call.result(timeout=WAIT)["slept"] == 1.5


def test_two_calls_cannot_share_a_request_id(client: sp.Client) -> None:
    rid = sp.new_request_id()
    with client.stream("count", {"n": 10000, "delay": 0.01}, request_id=rid) as stream:
        assert stream.request_id == rid and next(stream) == {"n": 0}
        with pytest.raises(sp.DuplicateRequestIdError) as raised:
            client.call("nap", {"seconds": 0}, request_id=rid)
        assert raised.value.status == 409
        stream.cancel()
        with pytest.raises(sp.CallCancelledError):
            list(stream)


def test_cancelling_a_session_call(client: sp.Client) -> None:
    with client.session(unique("cancel")) as session:
        rid = sp.new_request_id()
        call = in_background(lambda: session.call("nap", {"seconds": 60}, request_id=rid))
        cancel_when_running(session, rid)
        with pytest.raises(sp.CallCancelledError):
            call.result(timeout=WAIT)
        stream = session.stream("count", {"n": 10000, "delay": 0.01})
        assert next(stream) == {"n": 0}
        stream.cancel()
        with pytest.raises(sp.CallCancelledError):
            list(stream)
        assert session.call("notes") == [] and session.state == "resumed"
