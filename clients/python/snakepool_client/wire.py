"""The HTTP shapes of the API, shared by the sync and the async client.

What a call sends (``POST /v1/call``: body, ``X-Session-Id``, ``X-Request-Id``,
``Accept``), the routes' paths, and how an answer is read: a result, the session state
it reports, or the typed error of an ``{"error": {...}}`` body.
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Dict, Mapping, NamedTuple, Optional, Union
from urllib.parse import quote

import httpx

from .errors import BadResponseError, ConnectionError, error_from_body

DEFAULT_TIMEOUT = 120.0
"""Seconds a client waits for an answer, on top of a call's own timeout."""

Args = Optional[Mapping[str, Any]]
"""A command's arguments: a JSON object (``None`` for none)."""


class Reply(NamedTuple):
    """A call's answer: its result, its session's state (session calls) and its request id."""

    result: Any
    session_state: Optional[str]
    request_id: Optional[str]


def new_request_id() -> str:
    """A fresh, unguessable request id (128 random bits) to name a call with, so that it can
    be cancelled (``cancel``) while it runs."""
    return secrets.token_hex(16)


def check_session_id(session_id: str) -> str:
    """``session_id`` if it can travel in the ``X-Session-Id`` header, else ``ValueError``.

    The server takes 1 to 256 bytes without control characters; a header value cannot
    start or end with whitespace either.
    """
    if not isinstance(session_id, str):
        raise TypeError(f"a session id is a string, got {type(session_id).__name__}")
    if not session_id:
        raise ValueError("a session id cannot be empty")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in session_id):
        raise ValueError(f"session id {session_id!r} holds control characters")
    if session_id != session_id.strip(" \t"):
        raise ValueError(
            f"session id {session_id!r} starts or ends with whitespace, which the "
            "X-Session-Id header cannot carry"
        )
    return session_id


def call_request(
    command: str,
    args: Args,
    *,
    session_id: Optional[str],
    timeout: Optional[float],
    request_id: Optional[str],
    stream: bool,
) -> Dict[str, Any]:
    """The ``json`` and ``headers`` of a ``POST /v1/call``."""
    body: Dict[str, Any] = {"command": command, "args": {} if args is None else args}
    if isinstance(body["args"], Mapping) and not isinstance(body["args"], dict):
        body["args"] = dict(body["args"])
    headers = session_headers(session_id)
    if session_id is not None:
        body["session_id"] = session_id
    if timeout is not None:
        if timeout < 0:
            raise ValueError(f"a call's timeout cannot be negative, got {timeout}")
        body["timeout_ms"] = math.ceil(timeout * 1000)
    if request_id is not None:
        headers["x-request-id"] = request_id
    if stream:
        headers["accept"] = "text/event-stream"
    return {"json": body, "headers": headers}


def session_headers(session_id: Optional[str]) -> Dict[str, Union[str, bytes]]:
    """``X-Session-Id`` for a request about session ``session_id`` (none for ``None``): a load
    balancer in front of several servers routes by it, to the node that has the session."""
    return {} if session_id is None else {"x-session-id": session_id.encode("utf-8")}


def http_timeout(base: Optional[float], call_timeout: Optional[float]) -> httpx.Timeout:
    """The HTTP timeouts of a call: ``base``, and for reading ``base`` plus the call's own."""
    if base is None:
        return httpx.Timeout(None)
    return httpx.Timeout(base, read=base + (call_timeout or 0.0))


def session_path(session_id: str) -> str:
    """The path of ``/v1/sessions/{id}``."""
    return "/v1/sessions/" + quote(session_id, safe="")


def call_path(request_id: str) -> str:
    """The path of ``/v1/calls/{request_id}``."""
    return "/v1/calls/" + quote(request_id, safe="")


def auth_headers(token: Optional[str]) -> Dict[str, str]:
    """The ``Authorization`` header of a bearer ``token``, if there is one."""
    return {"authorization": f"Bearer {token}"} if token is not None else {}


def connection_error(exc: httpx.RequestError) -> ConnectionError:
    """The ``ConnectionError`` for a transport failure of httpx."""
    where = f" ({exc.request.method} {exc.request.url})" if _has_request(exc) else ""
    return ConnectionError(f"{type(exc).__name__}{where}: {exc}")


def _has_request(exc: httpx.RequestError) -> bool:
    try:
        exc.request
    except RuntimeError:
        return False
    return True


def _retry_after(response: httpx.Response) -> Optional[float]:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def raise_for_error(response: httpx.Response) -> None:
    """Raise the typed error of a (read) answer with a 4xx or 5xx status."""
    if response.status_code < 400:
        return
    try:
        data = response.json()
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        text = response.text.strip()[:200]
        error = {"message": text or response.reason_phrase}
    if "request_id" not in error and "x-request-id" in response.headers:
        error = {**error, "request_id": response.headers["x-request-id"]}
    raise error_from_body(error, status=response.status_code, retry_after=_retry_after(response))


def json_of(response: httpx.Response) -> Any:
    """The JSON of a (read) successful answer; ``BadResponseError`` if it is not JSON."""
    try:
        return response.json()
    except ValueError:
        raise BadResponseError(
            f"the answer to {response.request.method} {response.request.url.path} is not "
            f"JSON: {response.text[:200]!r}",
            status=response.status_code,
            request_id=response.headers.get("x-request-id"),
        ) from None


def reply_of(response: httpx.Response) -> Reply:
    """A call's ``Reply`` from its (read) answer, or its typed error."""
    raise_for_error(response)
    data = json_of(response)
    if not isinstance(data, dict) or "result" not in data:
        raise BadResponseError(
            f"a call's answer without a result: {response.text[:200]!r}",
            status=response.status_code,
            request_id=response.headers.get("x-request-id"),
        )
    return Reply(data["result"], session_state(response), response.headers.get("x-request-id"))


def session_state(response: httpx.Response) -> Optional[str]:
    """What a session call's answer says its session was (``X-Session-State``)."""
    return response.headers.get("x-session-state")


def check_event_stream(response: httpx.Response) -> None:
    """``BadResponseError`` unless a (successful) answer is an event stream."""
    kind = response.headers.get("content-type", "")
    if not kind.startswith("text/event-stream"):
        raise BadResponseError(
            f"a streamed call was answered with {kind or 'no content type'}, not events",
            status=response.status_code,
            request_id=response.headers.get("x-request-id"),
        )
