"""Plain calls, the server's read routes, and the typed errors of failed calls."""

from __future__ import annotations

import socket

import pytest
from conftest import unique

import snakepool_client as sp


def test_a_plain_call_returns_the_result(client: sp.Client) -> None:
    assert client.call("echo", {"text": "hi", "n": [1, 2]}) == {"text": "hi", "n": [1, 2]}
    assert client.call("echo") == {}
    assert client.call("whoami")["session_id"] is None


def test_health_pool_sessions_and_metrics(client: sp.Client) -> None:
    health = client.health()
    assert health["status"] == "ready" and health["workers"] >= 1
    pool = client.pool()
    assert len(pool["workers"]) == 2 and "totals" in pool
    session = client.session(unique("listed"))
    session.call("echo")
    page = client.sessions(limit=1000)
    assert session.id in [entry["id"] for entry in page["sessions"]]
    assert session.close()
    assert "snakepool" in client.metrics()


def test_unknown_command(client: sp.Client) -> None:
    with pytest.raises(sp.UnknownCommandError) as raised:
        client.call("no_such_command")
    error = raised.value
    assert (error.kind, error.status) == ("unknown_command", 404)
    assert error.body["command"] == "no_such_command"
    assert error.request_id and "no_such_command" in error.message


def test_a_python_exception_is_a_worker_error(client: sp.Client) -> None:
    rid = sp.new_request_id()
    with pytest.raises(sp.WorkerError) as raised:
        client.call("fail", {"message": "bad input"}, request_id=rid)
    error = raised.value
    assert (error.status, error.python_type) == (422, "ValueError")
    assert error.python_message == "bad input"
    assert "Traceback" in (error.traceback or "") and error.request_id == rid


def test_invalid_requests(client: sp.Client) -> None:
    with pytest.raises(sp.InvalidRequestError) as raised:
        client.call("echo", {"session_id": "mine"})
    assert (raised.value.status, raised.value.body["command"]) == (400, "echo")
    with pytest.raises(sp.InvalidRequestError):
        client.call("echo", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(sp.BadRequestError) as bad:
        client.call("echo", request_id="short")
    assert bad.value.status == 400 and "X-Request-Id" in bad.value.message


def test_an_internal_command_is_forbidden(client: sp.Client) -> None:
    with pytest.raises(sp.ForbiddenError) as raised:
        client.call("shutdown")
    assert raised.value.status == 403


def test_a_call_past_its_timeout(client: sp.Client) -> None:
    with pytest.raises(sp.RequestTimeoutError) as raised:
        client.call("nap", {"seconds": 30}, timeout=1)
    error = raised.value
    assert (error.status, error.worker_killed, error.body["timeout_ms"]) == (504, False, 1000)


def test_a_worker_that_dies_mid_call(client: sp.Client) -> None:
    with pytest.raises(sp.WorkerCrashedError) as raised:
        client.call("crash", {"code": 7})
    assert raised.value.status == 502 and "7" in (raised.value.exit_status or "")
    assert "about to crash" not in raised.value.message  # stderr stays on the server
    assert client.call("echo", {"after": True}) == {"after": True}


def test_an_unreachable_server_is_a_connection_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with sp.Client(f"http://127.0.0.1:{port}", timeout=5) as nowhere:
        with pytest.raises(sp.ConnectionError) as raised:
            nowhere.call("echo")
    assert raised.value.kind == "connect" and raised.value.status is None
    assert isinstance(raised.value, sp.SnakepoolError)

