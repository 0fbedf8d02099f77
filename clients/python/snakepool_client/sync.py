"""The synchronous client: ``Client`` over ``httpx.Client``, its ``Session`` and ``CallStream``."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Dict, Iterator, Optional, Type

import httpx

from .dspy import Dspy
from .errors import SessionNotFoundError
from .sse import NOTHING, CallEvents
from .wire import (
    DEFAULT_TIMEOUT,
    Args,
    Reply,
    auth_headers,
    call_path,
    call_request,
    check_event_stream,
    check_session_id,
    connection_error,
    http_timeout,
    json_of,
    raise_for_error,
    reply_of,
    session_headers,
    session_path,
    session_state,
)


class Client:
    """A client of one ``snakepool serve``; thread-safe.

    ``url`` is the server's base URL (``http://127.0.0.1:8700``), ``token`` its bearer
    token (``--token``; the admin token also opens the operator's routes), and ``timeout``
    how many seconds to wait for an answer on top of a call's own timeout (``None``: no
    limit). A call without a timeout of its own runs under the server's (30 s unless
    configured), after waiting for a free worker: keep ``timeout`` above both. Use it as
    a context manager, or ``close()`` it.
    """

    def __init__(
        self, url: str, token: Optional[str] = None, *, timeout: Optional[float] = DEFAULT_TIMEOUT
    ) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=self.url, headers=auth_headers(token), timeout=http_timeout(timeout, None)
        )

    def __enter__(self) -> "Client":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def close(self) -> None:
        """Close the client's connections."""
        self._http.close()

    def call(
        self,
        command: str,
        args: Args = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> Any:
        """Run ``command`` with ``args`` on any worker; return its result.

        ``timeout`` (seconds) is the call's own, clamped by the server into its range.
        ``request_id`` names the call (16 to 128 characters of ``A-Za-z0-9-_``; see
        ``new_request_id``) so that ``cancel`` can reach it while it runs.
        """
        return self._call(command, args, None, timeout, request_id).result

    def stream(
        self,
        command: str,
        args: Args = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> "CallStream":
        """Start ``command`` as a stream, once a worker has it: iterate the ``CallStream``
        for the chunks the command yields, then read its ``result``.

        A call refused before it starts raises here.
        """
        return self._stream(command, args, None, timeout, request_id)

    def session(self, session_id: str, *, close: bool = True) -> "Session":
        """The session ``session_id`` (opened by its first call). As a context manager, it
        is closed on exit unless ``close`` is false."""
        return Session(self, session_id, close=close)

    def cancel(self, request_id: str) -> None:
        """Cancel the plain call in flight under ``request_id``; it then fails with
        ``CallCancelledError``. ``CallNotFoundError`` if no such call runs (on this server:
        behind a load balancer, only the node running a call knows it),
        ``NotCancellableError`` for a sync command (it runs to completion). A session's
        call is cancelled with ``Session.cancel``."""
        self._cancel(request_id, None)

    def health(self) -> Dict[str, Any]:
        """The server's health: ``{"status": "ready", "workers": n}``, or while it cannot
        serve, ``starting``, ``degraded`` (with a ``reason``) or ``shutting_down``."""
        response = self._send("GET", "/health")
        if response.status_code != 503:
            raise_for_error(response)
        return json_of(response)

    def pool(self) -> Dict[str, Any]:
        """The pool's workers, queue, sessions, spawner and totals (an operator route)."""
        return self._get("/v1/pool")

    def sessions(
        self, *, limit: Optional[int] = None, after: Optional[str] = None
    ) -> Dict[str, Any]:
        """A page of the sessions in memory, in id order, after id ``after`` (an operator
        route): ``{"sessions": [...], "next_after": id or None}``."""
        params = {k: v for k, v in (("limit", limit), ("after", after)) if v is not None}
        return self._get("/v1/sessions", params=params)

    def metrics(self) -> str:
        """The server's metrics as OpenMetrics text (an operator route)."""
        response = self._send("GET", "/metrics")
        raise_for_error(response)
        return response.text

    def _cancel(self, request_id: str, session_id: Optional[str]) -> None:
        response = self._send("DELETE", call_path(request_id), headers=session_headers(session_id))
        raise_for_error(response)

    def _get(self, path: str, **kwargs: Any) -> Any:
        response = self._send("GET", path, **kwargs)
        raise_for_error(response)
        return json_of(response)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.RequestError as exc:
            raise connection_error(exc) from exc

    def _call(
        self,
        command: str,
        args: Args,
        session_id: Optional[str],
        timeout: Optional[float],
        request_id: Optional[str],
    ) -> Reply:
        request = call_request(
            command,
            args,
            session_id=session_id,
            timeout=timeout,
            request_id=request_id,
            stream=False,
        )
        response = self._send(
            "POST", "/v1/call", timeout=http_timeout(self._timeout, timeout), **request
        )
        return reply_of(response)

    def _stream(
        self,
        command: str,
        args: Args,
        session_id: Optional[str],
        timeout: Optional[float],
        request_id: Optional[str],
    ) -> "CallStream":
        request = self._http.build_request(
            "POST",
            "/v1/call",
            timeout=http_timeout(self._timeout, timeout),
            **call_request(
                command,
                args,
                session_id=session_id,
                timeout=timeout,
                request_id=request_id,
                stream=True,
            ),
        )
        try:
            response = self._http.send(request, stream=True)
        except httpx.RequestError as exc:
            raise connection_error(exc) from exc
        try:
            if response.status_code >= 400:
                response.read()
                raise_for_error(response)
            check_event_stream(response)
        except httpx.RequestError as exc:
            response.close()
            raise connection_error(exc) from exc
        except BaseException:
            response.close()
            raise
        return CallStream(self, response, session_id)


class CallStream:
    """A streamed call: iterating it gives the chunks its command yields, as they come;
    ``result`` is the call's result once they are all read.

    The error that ends a call (a ``WorkerError``, a ``CallCancelledError``, ...) is
    raised by the iteration, and again by ``result``. Closing the stream before its end
    (``close()``, or leaving its ``with`` block) hangs up, which cancels a cancellable
    command on the server.
    """

    def __init__(
        self, client: Client, response: httpx.Response, session_id: Optional[str]
    ) -> None:
        self.request_id: str = response.headers.get("x-request-id", "")
        """The call's id on the server, for ``cancel``."""
        self.session_state = session_state(response)
        """For a session's stream, what the call found its session to be."""
        self._client = client
        self._session_id = session_id
        self._response = response
        self._lines = response.iter_lines()
        self._events = CallEvents(self.request_id)
        self._raised = False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while not self._events.finished:
            try:
                line = next(self._lines)
            except StopIteration:
                self._events.end()
            except httpx.RequestError as exc:
                self._events.end(connection_error(exc))
            else:
                chunk = self._events.feed(line)
                if chunk is not NOTHING:
                    return chunk
        self._response.close()
        if self._events.error is not None and not self._raised:
            self._raised = True
            raise self._events.error
        raise StopIteration

    def __enter__(self) -> "CallStream":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    @property
    def finished(self) -> bool:
        """Whether the call has ended: its result or error was read (or the stream closed)."""
        return self._events.finished

    @property
    def result(self) -> Any:
        """The call's result; raises the error that ended it, or ``RuntimeError`` if its
        chunks were not all read yet."""
        return self._events.result()

    def cancel(self) -> None:
        """Ask the server to cancel the call; read on to see it end with ``CallCancelledError``."""
        self._client._cancel(self.request_id, self._session_id)

    def close(self) -> None:
        """Hang up; a call that had not ended fails with ``CallCancelledError``."""
        if not self._events.finished:
            self._events.abandon()
            self._raised = True
        self._response.close()


class Session:
    """A session: its calls run in order on its own worker, and its state lasts across
    them (rebuilt from its journal if that worker is lost).

    ``state`` is what the last call found the session to be: ``created`` (new, or closed
    before), ``resumed`` or ``rebuilt``. As a context manager it is closed on exit unless
    made with ``close=False``. ``dspy`` runs the DSPy commands in it.
    """

    def __init__(self, client: Client, session_id: str, *, close: bool = True) -> None:
        self.id = check_session_id(session_id)
        self.state: Optional[str] = None
        """The ``X-Session-State`` of the last call (``None`` before the first)."""
        self.dspy = Dspy(self)
        """The DSPy commands in this session."""
        self._client = client
        self._close_on_exit = close

    def __enter__(self) -> "Session":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._close_on_exit:
            self.close()

    def __repr__(self) -> str:
        return f"Session({self.id!r}, state={self.state!r})"

    def call(
        self,
        command: str,
        args: Args = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> Any:
        """Run ``command`` with ``args`` in this session; return its result (see
        ``Client.call``)."""
        reply = self._client._call(command, args, self.id, timeout, request_id)
        self.state = reply.session_state
        return reply.result

    def stream(
        self,
        command: str,
        args: Args = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> CallStream:
        """Start ``command`` as a stream in this session (see ``Client.stream``)."""
        stream = self._client._stream(command, args, self.id, timeout, request_id)
        self.state = stream.session_state
        return stream

    def cancel(self, request_id: str) -> None:
        """Cancel this session's call in flight under ``request_id`` (see ``Client.cancel``)."""
        self._client._cancel(request_id, self.id)

    def info(self) -> Dict[str, Any]:
        """What the server knows of the session (an operator route): its worker, age, idle
        time, journal and rebuilds. ``SessionNotFoundError`` if it is not open."""
        return self._client._get(session_path(self.id), headers=session_headers(self.id))

    def close(self) -> bool:
        """Close the session and free its id; ``False`` if it was not open."""
        try:
            response = self._client._send(
                "DELETE", session_path(self.id), headers=session_headers(self.id)
            )
            raise_for_error(response)
        except SessionNotFoundError:
            return False
        return True
