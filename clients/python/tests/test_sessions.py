"""Session calls: state that lasts, ``X-Session-State``, info, and closing."""

from __future__ import annotations

import pytest
from conftest import unique

import snakepool_client as sp


def test_session_calls_keep_state_and_report_it(client: sp.Client) -> None:
    session = client.session(unique("state"))
    assert session.state is None
    assert session.call("set_value", {"key": "k", "value": [1, 2]}) == {"stored": "k"}
    assert session.state == "created"
    assert session.call("get_value", {"key": "k"}) == [1, 2]
    assert session.state == "resumed"
    assert session.call("whoami")["session_id"] == session.id
    info = session.info()
    assert info["id"] == session.id and info["journal_entries"] == 1
    assert info["worker"] is not None and info["rebuilds"] == 0
    assert session.close() is True
    assert session.close() is False


def test_leaving_the_context_closes_the_session(client: sp.Client) -> None:
    session_id = unique("scoped")
    with client.session(session_id) as session:
        session.call("set_value", {"key": "k", "value": 1})
        assert session.state == "created"
    with pytest.raises(sp.SessionNotFoundError) as raised:
        session.info()
    assert raised.value.status == 404
    again = client.session(session_id)
    with pytest.raises(sp.WorkerError) as missing:
        again.call("get_value", {"key": "k"})
    assert missing.value.python_type == "KeyError"
    assert again.call("whoami")["session_id"] == session_id and again.state == "resumed"
    again.close()


def test_a_session_made_with_close_false_stays_open(client: sp.Client) -> None:
    session_id = unique("kept")
    with client.session(session_id, close=False) as session:
        session.call("set_value", {"key": "k", "value": "kept"})
    later = client.session(session_id)
    assert later.call("get_value", {"key": "k"}) == "kept"
    assert later.state == "resumed"
    assert later.close()
    assert later.call("whoami")["session_id"] == session_id and later.state == "created"
    later.close()


def test_session_ids_travel_escaped(client: sp.Client) -> None:
    with client.session(unique("odd/id?é &")) as session:
        assert session.call("whoami")["session_id"] == session.id
        assert session.info()["id"] == session.id


def test_a_session_that_was_never_opened(client: sp.Client) -> None:
    session = client.session(unique("never"))
    with pytest.raises(sp.SessionNotFoundError):
        session.info()
    assert session.close() is False
