"""The asyncio client: ``AsyncClient`` over ``httpx.AsyncClient``, its ``AsyncSession`` and
``AsyncCallStream``; the same API as the sync client, awaited."""

from __future__ import annotations

from types import TracebackType
from typing import Any, AsyncIterator, Dict, Optional, Type

import httpx

from .dspy import AsyncDspy
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


class AsyncClient:
    """A client of one ``snakepool serve`` for asyncio; see ``Client`` for the arguments.

    Use it as an async context manager, or ``await aclose()``.
    """

    def __init__(
        self, url: str, token: Optional[str] = None, *, timeout: Optional[float] = DEFAULT_TIMEOUT
    ) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=auth_headers(token), timeout=http_timeout(timeout, None)
        )

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r})"

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self._http.aclose()

    async def call(
        self,
        command: str,
        args: Args = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> Any:
        """Run ``command`` with ``args`` on any worker; return its result (see ``Client.call``)."""
        return (await self._call(command, args, None, timeout, request_id)).result

    async def stream(
        self,
        command: str,
        args: Args = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> "AsyncCallStream":
        """Start ``command`` as a stream, once a worker has it: ``async for`` over the
        ``AsyncCallStream`` for its chunks, then read its ``result``."""
        return await self._stream(command, args, None, timeout, request_id)

    def session(self, session_id: str, *, close: bool = True) -> "AsyncSession":
        """The session ``session_id``; as an async context manager, closed on exit unless
        ``close`` is false."""
        return AsyncSession(self, session_id, close=close)

    async def cancel(self, request_id: str) -> None:
        """Cancel the plain call in flight under ``request_id`` (see ``Client.cancel``)."""
        await self._cancel(request_id, None)

    async def health(self) -> Dict[str, Any]:
        """The server's health (see ``Client.health``)."""
        response = await self._send("GET", "/health")
        if response.status_code != 503:
            raise_for_error(response)
        return json_of(response)

    async def pool(self) -> Dict[str, Any]:
        """The pool's workers, queue, sessions, spawner and totals (an operator route)."""
        return await self._get("/v1/pool")

    async def sessions(
        self, *, limit: Optional[int] = None, after: Optional[str] = None
    ) -> Dict[str, Any]:
        """A page of the sessions in memory (see ``Client.sessions``)."""
        params = {k: v for k, v in (("limit", limit), ("after", after)) if v is not None}
        return await self._get("/v1/sessions", params=params)

    async def metrics(self) -> str:
        """The server's metrics as OpenMetrics text (an operator route)."""
        response = await self._send("GET", "/metrics")
        raise_for_error(response)
        return response.text

    async def _cancel(self, request_id: str, session_id: Optional[str]) -> None:
        response = await self._send(
            "DELETE", call_path(request_id), headers=session_headers(session_id)
        )
        raise_for_error(response)

    async def _get(self, path: str, **kwargs: Any) -> Any:
        response = await self._send("GET", path, **kwargs)
        raise_for_error(response)
        return json_of(response)

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.RequestError as exc:
            raise connection_error(exc) from exc

    async def _call(
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
        response = await self._send(
            "POST", "/v1/call", timeout=http_timeout(self._timeout, timeout), **request
        )
        return reply_of(response)

    async def _stream(
        self,
        command: str,
        args: Args,
        session_id: Optional[str],
        timeout: Optional[float],
        request_id: Optional[str],
    ) -> "AsyncCallStream":
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
            response = await self._http.send(request, stream=True)
        except httpx.RequestError as exc:
            raise connection_error(exc) from exc
        try:
            if response.status_code >= 400:
                await response.aread()
                raise_for_error(response)
            check_event_stream(response)
        except httpx.RequestError as exc:
            await response.aclose()
            raise connection_error(exc) from exc
        except BaseException:
            await response.aclose()
            raise
        return AsyncCallStream(self, response, session_id)


class AsyncCallStream:
    """A streamed call for asyncio: ``async for`` gives its chunks, then ``result`` is its
    result (see ``CallStream``). Use ``async with`` (or ``await aclose()``) to hang up early.
    """

    def __init__(
        self, client: AsyncClient, response: httpx.Response, session_id: Optional[str]
    ) -> None:
        self.request_id: str = response.headers.get("x-request-id", "")
        """The call's id on the server, for ``cancel``."""
        self.session_state = session_state(response)
        """For a session's stream, what the call found its session to be."""
        self._client = client
        self._session_id = session_id
        self._response = response
        self._lines = response.aiter_lines()
        self._events = CallEvents(self.request_id)
        self._raised = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        while not self._events.finished:
            try:
                line = await self._lines.__anext__()
            except StopAsyncIteration:
                self._events.end()
            except httpx.RequestError as exc:
                self._events.end(connection_error(exc))
            else:
                chunk = self._events.feed(line)
                if chunk is not NOTHING:
                    return chunk
        await self._response.aclose()
        if self._events.error is not None and not self._raised:
            self._raised = True
            raise self._events.error
        raise StopAsyncIteration

    async def __aenter__(self) -> "AsyncCallStream":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.aclose()

    @property
    def finished(self) -> bool:
        """Whether the call has ended: its result or error was read (or the stream closed)."""
        return self._events.finished

    @property
    def result(self) -> Any:
        """The call's result; raises the error that ended it, or ``RuntimeError`` if its
        chunks were not all read yet."""
        return self._events.result()

    async def cancel(self) -> None:
        """Ask the server to cancel the call; read on to see it end with ``CallCancelledError``."""
        await self._client._cancel(self.request_id, self._session_id)

    async def aclose(self) -> None:
        """Hang up; a call that had not ended fails with ``CallCancelledError``."""
        if not self._events.finished:
            self._events.abandon()
            self._raised = True
        await self._response.aclose()


class AsyncSession:
    """A session for asyncio (see ``Session``); an async context manager."""

    def __init__(self, client: AsyncClient, session_id: str, *, close: bool = True) -> None:
        self.id = check_session_id(session_id)
        self.state: Optional[str] = None
        """The ``X-Session-State`` of the last call (``None`` before the first)."""
        self.dspy = AsyncDspy(self)
        """The DSPy commands in this session."""
        self._client = client
        self._close_on_exit = close

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._close_on_exit:
            await self.close()

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r}, state={self.state!r})"

    async def call(
        self,
        command: str,
        args: Args = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> Any:
        """Run ``command`` with ``args`` in this session; return its result."""
        reply = await self._client._call(command, args, self.id, timeout, request_id)
        self.state = reply.session_state
        return reply.result

    async def stream(
        self,
        command: str,
        args: Args = None,
        *,
        timeout: Optional[float] = None,
        request_id: Optional[str] = None,
    ) -> AsyncCallStream:
        """Start ``command`` as a stream in this session."""
        stream = await self._client._stream(command, args, self.id, timeout, request_id)
        self.state = stream.session_state
        return stream

    async def cancel(self, request_id: str) -> None:
        """Cancel this session's call in flight under ``request_id`` (see ``Client.cancel``)."""
        await self._client._cancel(request_id, self.id)

    async def info(self) -> Dict[str, Any]:
        """What the server knows of the session (see ``Session.info``)."""
        return await self._client._get(session_path(self.id), headers=session_headers(self.id))

    async def close(self) -> bool:
        """Close the session and free its id; ``False`` if it was not open."""
        try:
            response = await self._client._send(
                "DELETE", session_path(self.id), headers=session_headers(self.id)
            )
            raise_for_error(response)
        except SessionNotFoundError:
            return False
        return True
