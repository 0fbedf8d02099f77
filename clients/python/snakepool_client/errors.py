"""Typed errors: one class per error kind the server sends, and the transport failure.

Every failure is a ``SnakepoolError`` with the server's ``kind``, the HTTP ``status``
(``None`` when the error ended an event stream, or never reached the server), the
``message``, the ``request_id`` and the whole error object as ``body`` (it holds the
details of each kind, e.g. ``worker`` and ``command``). ``error_class(kind)`` gives the
class of a kind; a kind this client does not know maps to ``SnakepoolError`` itself.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Type


class SnakepoolError(Exception):
    """A call or request that failed, as the server (or the transport) reported it."""

    kind: str = ""
    """The stable name of the cause, e.g. ``worker_error``."""

    def __init__(
        self,
        message: str,
        *,
        kind: Optional[str] = None,
        status: Optional[int] = None,
        request_id: Optional[str] = None,
        body: Optional[Mapping[str, Any]] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind if kind is not None else type(self).kind
        self.status = status
        """The HTTP status; ``None`` for an error event of a stream or a transport failure."""
        self.message = message
        self.request_id = request_id
        """The id the server gave the request (``X-Request-Id``), if it got that far."""
        self.body: Dict[str, Any] = dict(body or {})
        """The error object the server sent, with every detail of its kind."""
        self.retry_after = retry_after
        """Seconds to wait before retrying, when the server said (``Retry-After``)."""

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}" if self.kind else self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, status={self.status!r}, "
            f"message={self.message!r})"
        )

    def _detail(self, name: str) -> Any:
        return self.body.get(name)


class ConnectionError(SnakepoolError):  # noqa: A001 - the name the API promises
    """The server could not be reached, or the connection broke before its answer."""

    kind = "connect"


class BadResponseError(SnakepoolError):
    """The server's answer was not what the API describes (e.g. not JSON)."""

    kind = "bad_response"


# Refused before the call reached the pool.


class BadRequestError(SnakepoolError):
    """The request is malformed: a body that is not the call's JSON, a bad ``X-Request-Id``."""

    kind = "bad_request"


class InvalidRequestError(SnakepoolError):
    """The call cannot be made as given: ``args`` not an object or carrying a
    ``session_id``, a bad session id, an oversized request."""

    kind = "invalid_request"


class BodyTooLargeError(SnakepoolError):
    """The request body is above the server's body limit."""

    kind = "body_too_large"


class UnauthorizedError(SnakepoolError):
    """No bearer token, or not the right one."""

    kind = "unauthorized"


class ForbiddenError(SnakepoolError):
    """The command is internal to the pool (``shutdown``, ``cleanup_session``, ...)."""

    kind = "forbidden"


class DuplicateRequestIdError(SnakepoolError):
    """A call under the same ``X-Request-Id`` is in flight."""

    kind = "duplicate_request_id"


class CallNotFoundError(SnakepoolError):
    """No call is in flight under that request id (never started, or already ended)."""

    kind = "call_not_found"


class NotCancellableError(SnakepoolError):
    """The call is a sync command: it runs to completion."""

    kind = "not_cancellable"


class SessionNotFoundError(SnakepoolError):
    """No open session has that id."""

    kind = "session_not_found"


class StartingError(SnakepoolError):
    """The server's pool is still starting; retry shortly."""

    kind = "starting"


# What the pool answers.


class UnknownCommandError(SnakepoolError):
    """No worker command has that name."""

    kind = "unknown_command"


class WorkerError(SnakepoolError):
    """The command raised an exception in its worker (which serves on)."""

    kind = "worker_error"

    @property
    def python_type(self) -> Optional[str]:
        """The exception's type, e.g. ``ValueError`` or ``ProgramNotFound``."""
        return self._detail("python_type")

    @property
    def python_message(self) -> Optional[str]:
        """The exception's message."""
        return self._detail("python_message")

    @property
    def traceback(self) -> Optional[str]:
        """The worker-side traceback, when the worker sent one."""
        return self._detail("traceback")


class RequestTimeoutError(SnakepoolError):
    """The call ran past its timeout; ``worker_killed`` says whether its worker went."""

    kind = "request_timeout"

    @property
    def worker_killed(self) -> Optional[bool]:
        """Whether the worker was killed (a sync call), or only the call cancelled."""
        return self._detail("worker_killed")


class CheckoutTimeoutError(SnakepoolError):
    """No worker became free within the server's checkout timeout."""

    kind = "checkout_timeout"


class CallCancelledError(SnakepoolError):
    """The call was cancelled (``DELETE /v1/calls/{request_id}``, or its client left)."""

    kind = "cancelled"


class WorkerCrashedError(SnakepoolError):
    """The worker died during the call; ``exit_status`` says how."""

    kind = "worker_crashed"

    @property
    def exit_status(self) -> Optional[str]:
        """How the worker ended, e.g. ``killed by signal 9``."""
        return self._detail("status")


class ProtocolError(SnakepoolError):
    """The worker broke the wire protocol; it was replaced."""

    kind = "protocol"


class SaturatedError(SnakepoolError):
    """The server's queue is full; nothing was queued. Retry later."""

    kind = "saturated"


class ShuttingDownError(SnakepoolError):
    """The server is shutting down and takes no new calls."""

    kind = "shutting_down"


class StartupFailedError(SnakepoolError):
    """No worker can start; the message says why."""

    kind = "startup_failed"


class TooManySessionsError(SnakepoolError):
    """Opening one more session would pass the server's limit."""

    kind = "too_many_sessions"


class SessionClosedError(SnakepoolError):
    """The session was closed while the call waited."""

    kind = "session_closed"


class SessionRebuildFailedError(SnakepoolError):
    """The session could not be rebuilt on a new worker; it refuses calls until closed."""

    kind = "session_rebuild_failed"

    @property
    def cause(self) -> Optional[SnakepoolError]:
        """The failure of the replay, as an error of its own kind."""
        cause = self._detail("cause")
        if not isinstance(cause, Mapping):
            return None
        return error_from_body(cause)


class JournalFullError(SnakepoolError):
    """The session's journal is full and cannot be compacted; nothing was changed."""

    kind = "journal_full"


class JournalUnavailableError(SnakepoolError):
    """The journal store cannot be reached; retry later."""

    kind = "journal_unavailable"


class SessionMovedError(SnakepoolError):
    """Another node owns the session now; retry (the call goes to its owner)."""

    kind = "session_moved"


class InvalidConfigError(SnakepoolError):
    """A server setting is out of range."""

    kind = "invalid_config"


class UnexpectedResultError(SnakepoolError):
    """A worker's result did not have the shape the server expected."""

    kind = "unexpected_result"


ERROR_CLASSES: Dict[str, Type[SnakepoolError]] = {
    cls.kind: cls
    for cls in (
        ConnectionError,
        BadResponseError,
        BadRequestError,
        InvalidRequestError,
        BodyTooLargeError,
        UnauthorizedError,
        ForbiddenError,
        DuplicateRequestIdError,
        CallNotFoundError,
        NotCancellableError,
        SessionNotFoundError,
        StartingError,
        UnknownCommandError,
        WorkerError,
        RequestTimeoutError,
        CheckoutTimeoutError,
        CallCancelledError,
        WorkerCrashedError,
        ProtocolError,
        SaturatedError,
        ShuttingDownError,
        StartupFailedError,
        TooManySessionsError,
        SessionClosedError,
        SessionRebuildFailedError,
        JournalFullError,
        JournalUnavailableError,
        SessionMovedError,
        InvalidConfigError,
        UnexpectedResultError,
    )
}
"""The class of each error kind."""


def error_class(kind: str) -> Type[SnakepoolError]:
    """The class of errors of ``kind``; ``SnakepoolError`` for a kind this client does not know."""
    return ERROR_CLASSES.get(kind, SnakepoolError)


def error_from_body(
    error: Mapping[str, Any],
    *,
    status: Optional[int] = None,
    retry_after: Optional[float] = None,
) -> SnakepoolError:
    """The typed error for an ``{"kind", "message", "request_id", ...}`` error object."""
    kind = error.get("kind")
    kind = kind if isinstance(kind, str) and kind else f"http_{status}"
    message = error.get("message")
    request_id = error.get("request_id")
    return error_class(kind)(
        message if isinstance(message, str) else "",
        kind=kind,
        status=status,
        request_id=request_id if isinstance(request_id, str) else None,
        body=error,
        retry_after=retry_after,
    )

