"""Server-Sent Events: parsing a stream's lines, and what a call's events mean.

``EventParser`` turns lines into events (the rules of the WHATWG event stream format
that the server uses: ``event:`` and ``data:`` fields, comments as keep-alives, a blank
line ending each event). ``CallEvents`` follows one call's stream: ``chunk`` events,
then one ``result`` (data ``{"result": ...}``) or ``error`` (data ``{"error": {...}}``).
"""

from __future__ import annotations

import json
from typing import Any, List, NamedTuple, Optional

from .errors import (
    BadResponseError,
    CallCancelledError,
    ConnectionError,
    SnakepoolError,
    error_from_body,
)


class ServerEvent(NamedTuple):
    """One event: its name (``message`` when it has none) and its data."""

    event: str
    data: str


class EventParser:
    """Events from the lines of an event stream, one line at a time."""

    def __init__(self) -> None:
        self._event = ""
        self._data: List[str] = []

    def feed(self, line: str) -> Optional[ServerEvent]:
        """Take one line (without its line break); return the event it completes, if any."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the server's keep-alive
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        return None

    def _dispatch(self) -> Optional[ServerEvent]:
        event = ServerEvent(self._event or "message", "\n".join(self._data)) if self._data else None
        self._event, self._data = "", []
        return event


NOTHING: Any = object()
"""What ``CallEvents.feed`` returns for a line that completes no chunk."""


class CallEvents:
    """One call's event stream as it is read: its chunks, then its result or error."""

    def __init__(self, request_id: Optional[str]) -> None:
        self.request_id = request_id
        self.finished = False
        """Whether the call has ended (with a result or an error)."""
        self.error: Optional[SnakepoolError] = None
        """The error that ended the call, once it ended with one."""
        self._result: Any = None
        self._parser = EventParser()

    def feed(self, line: str) -> Any:
        """Take one line; return the chunk it completes, else ``NOTHING``."""
        event = self._parser.feed(line)
        if event is None or self.finished or event.event not in ("chunk", "result", "error"):
            return NOTHING
        value = self._decode(event)
        if self.finished:
            return NOTHING  # undecodable
        if event.event == "chunk":
            return value
        if event.event == "result" and isinstance(value, dict) and "result" in value:
            self._finish(result=value["result"])
            return NOTHING
        error = value.get("error") if isinstance(value, dict) else None
        if event.event == "error" and isinstance(error, dict):
            self._fail(error_from_body({"request_id": self.request_id, **error}))
        else:
            self._fail(
                BadResponseError(
                    f"a {event.event!r} event without its {event.event}: {event.data[:200]!r}",
                    request_id=self.request_id,
                )
            )
        return NOTHING

    def end(self, error: Optional[SnakepoolError] = None) -> None:
        """The stream ended (or broke with ``error``): a call without its result failed."""
        if not self.finished:
            self._fail(
                error
                or ConnectionError(
                    "the event stream ended before the call's result", request_id=self.request_id
                )
            )

    def abandon(self) -> None:
        """This client closed the stream before the call ended."""
        if not self.finished:
            self._fail(
                CallCancelledError(
                    "the stream was closed by this client before the call ended",
                    request_id=self.request_id,
                )
            )

    def result(self) -> Any:
        """The call's result; raises the error that ended it, or ``RuntimeError`` while it runs."""
        if not self.finished:
            raise RuntimeError("the call has not ended yet: read its stream to the end first")
        if self.error is not None:
            raise self.error
        return self._result

    def _decode(self, event: ServerEvent) -> Any:
        try:
            return json.loads(event.data)
        except ValueError:
            self._fail(
                BadResponseError(
                    f"the data of a {event.event!r} event is not JSON: {event.data[:200]!r}",
                    request_id=self.request_id,
                )
            )
            return NOTHING

    def _finish(self, *, result: Any) -> None:
        self.finished, self._result = True, result

    def _fail(self, error: SnakepoolError) -> None:
        self.finished, self.error = True, error
