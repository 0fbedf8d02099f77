"""A server with a bearer token: every route but ``/health`` needs it."""

from __future__ import annotations

import pytest
from conftest import CALL_TIMEOUT, TOKEN, Server, run_async, unique

import snakepool_client as sp


def test_the_right_token_opens_every_route(token_server: Server) -> None:
    with sp.Client(token_server.url, TOKEN, timeout=CALL_TIMEOUT) as client:
        assert client.call("echo", {"a": 1}) == {"a": 1}
        with client.session(unique("authorized")) as session:
            session.call("set_value", {"key": "k", "value": 1})
            assert session.info()["journal_entries"] == 1
        assert len(client.pool()["workers"]) == 2


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_a_missing_or_wrong_token_is_unauthorized(token_server: Server, token: str) -> None:
    with sp.Client(token_server.url, token, timeout=CALL_TIMEOUT) as client:
        assert client.health()["status"] == "ready"
        with pytest.raises(sp.UnauthorizedError) as raised:
            client.call("echo")
        error = raised.value
        assert (error.kind, error.status) == ("unauthorized", 401)
        assert error.request_id
        with pytest.raises(sp.UnauthorizedError):
            client.stream("count", {"n": 1})
        with pytest.raises(sp.UnauthorizedError):
            client.session(unique("refused")).close()
        with pytest.raises(sp.UnauthorizedError):
            client.cancel(sp.new_request_id())
        with pytest.raises(sp.UnauthorizedError):
            client.pool()


def test_the_async_client_sends_its_token(token_server: Server) -> None:
    async def calls() -> None:
        async with sp.AsyncClient(token_server.url, TOKEN, timeout=CALL_TIMEOUT) as client:
            assert await client.call("echo", {"b": 2}) == {"b": 2}
        async with sp.AsyncClient(token_server.url, "wrong", timeout=CALL_TIMEOUT) as client:
            with pytest.raises(sp.UnauthorizedError):
                await client.call("echo")

    run_async(calls())
