"""Wire protocol v1: frames, JSON codec and reply encoding.

A frame is a 4-byte unsigned big-endian length ``N`` followed by ``N`` bytes of UTF-8 JSON.
This module is the only place that knows about bytes on the wire; everything above it
works with Python objects.

The JSON codec is ``orjson`` when it can be imported, otherwise the standard library
``json`` module. Setting the environment variable ``SNAKEPOOL_JSON=json`` forces the
standard library codec (useful when comparing behaviour between the two).
"""

from __future__ import annotations

import importlib
import json
import os
import struct
from typing import Any, Callable, Dict, Optional, Tuple, Union

PROTOCOL_VERSION = 1
"""Version of the wire protocol spoken by this runtime."""

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
"""Default upper bound for the payload of one frame, in either direction."""

MIN_MAX_FRAME_BYTES = 1024
"""Smallest accepted ``max_frame_bytes``; anything lower cannot carry a manifest."""

LIMIT_MAX_FRAME_BYTES = 0xFFFFFFFF
"""Largest length a 4-byte header can express."""

MAX_U64 = 0xFFFFFFFFFFFFFFFF
"""Largest request id accepted (ids are u64 on the host side)."""

DISCARD_CHUNK_BYTES = 64 * 1024
"""Chunk size used when skipping the payload of an oversized frame."""

HEADER = struct.Struct(">I")
"""The frame header: payload length, unsigned 32-bit big-endian."""

Buffer = Union[bytes, bytearray, memoryview]


# --------------------------------------------------------------------------------------------
# Error types. Their class names are the ``error.type`` strings seen by the host.
# --------------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """A frame that carries a usable id but is otherwise not a valid request."""


class BadRequest(Exception):
    """A well-formed frame whose request fields are wrong (command, args, session_id)."""


class UnknownCommand(Exception):
    """The request names a command that is not registered on this worker."""


class SerializationError(Exception):
    """A handler returned a value that cannot be encoded as JSON."""


class ResultTooLarge(Exception):
    """An encoded reply would exceed the maximum frame size."""


class FrameTooLarge(Exception):
    """An incoming frame header announces more bytes than the configured maximum."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"incoming frame of {size} bytes exceeds the maximum frame size of {limit} bytes"
        )
        self.size = size
        self.limit = limit


class TruncatedFrame(Exception):
    """End of input was reached in the middle of a frame."""


# --------------------------------------------------------------------------------------------
# JSON codec
# --------------------------------------------------------------------------------------------

_std_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _std_dumps(obj: Any) -> bytes:
    return _std_encoder.encode(obj).encode("utf-8")


def _std_loads(data: Buffer) -> Any:
    if isinstance(data, str):
        return json.loads(data)
    return json.loads(str(data, "utf-8"))


Dumps = Callable[[Any], bytes]
Loads = Callable[[Buffer], Any]


def build_codec(use_orjson: bool) -> Tuple[str, Dumps, Loads]:
    """Return ``(backend_name, dumps, loads)`` for orjson (if importable) or the stdlib.

    ``dumps`` raises ``SerializationError`` for values that cannot be encoded; ``loads``
    raises ``ValueError`` for invalid UTF-8 or JSON. Both codecs accept the same values
    as far as possible: types only orjson knows (dataclasses, datetimes, subclasses of
    builtins, integers wider than 64 bits) go through the standard library encoder.
    """
    orjson: Any = None
    if use_orjson:
        try:
            orjson = importlib.import_module("orjson")
        except ImportError:
            orjson = None

    if orjson is None:

        def std_dumps(obj: Any) -> bytes:
            try:
                return _std_dumps(obj)
            except (TypeError, ValueError, RecursionError) as exc:
                raise SerializationError(str(exc)) from None

        return "json", std_dumps, _std_loads

    options = (
        orjson.OPT_NON_STR_KEYS
        | orjson.OPT_PASSTHROUGH_DATACLASS
        | orjson.OPT_PASSTHROUGH_DATETIME
        | orjson.OPT_PASSTHROUGH_SUBCLASS
    )
    fast_dumps: Callable[..., bytes] = orjson.dumps

    def orjson_dumps(obj: Any) -> bytes:
        try:
            return fast_dumps(obj, option=options)
        except TypeError:
            pass  # let the standard library decide, so results do not depend on orjson
        try:
            return _std_dumps(obj)
        except (TypeError, ValueError, RecursionError) as exc:
            raise SerializationError(str(exc)) from None

    return "orjson", orjson_dumps, orjson.loads


JSON_BACKEND, dumps, loads = build_codec(
    os.environ.get("SNAKEPOOL_JSON", "").strip().lower() != "json"
)
"""The codec in use: ``dumps(obj) -> bytes`` and ``loads(buffer) -> object``."""


# --------------------------------------------------------------------------------------------
# Frame helpers
# --------------------------------------------------------------------------------------------


def encode_frame(payload: Buffer) -> bytes:
    """Return ``payload`` prefixed with its 4-byte big-endian length."""
    size = len(payload)
    if size > LIMIT_MAX_FRAME_BYTES:
        raise ValueError(f"payload of {size} bytes does not fit a 4-byte length header")
    return HEADER.pack(size) + bytes(payload)


def decode_frame(
    data: Buffer, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> Tuple[Optional[bytes], Buffer]:
    """Split one frame off the front of ``data``.

    Returns ``(payload, rest)`` or ``(None, data)`` when ``data`` does not yet hold a
    complete frame. Raises ``FrameTooLarge`` when the header exceeds ``max_frame_bytes``.
    """
    if len(data) < HEADER.size:
        return None, data
    (size,) = HEADER.unpack_from(data, 0)
    if size > max_frame_bytes:
        raise FrameTooLarge(size, max_frame_bytes)
    end = HEADER.size + size
    if len(data) < end:
        return None, data
    return bytes(data[HEADER.size : end]), data[end:]


def is_valid_id(value: Any) -> bool:
    """True for a request id the host can match: an int (not bool) in ``0..2**64-1``."""
    return type(value) is int and 0 <= value <= MAX_U64


def encode_success(request_id: int, result: Any) -> bytes:
    """Encode a success reply payload; raise ``SerializationError`` for unencodable results."""
    return dumps({"id": request_id, "success": True, "result": result})


def encode_success_journaled(request_id: int, result: Any, journal: Dict[str, Any]) -> bytes:
    """Encode a success reply that names the call the host journals instead of the request.

    The payload is ``{"id", "success": true, "result", "journal": {"command", "args"}}``.
    Raises ``SerializationError`` when the result or the journal args cannot be encoded.
    """
    return dumps({"id": request_id, "success": True, "result": result, "journal": journal})


def _clean_text(text: str) -> str:
    """Make ``text`` encodable as UTF-8 (lone surrogates become escapes)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def encode_failure(
    request_id: int,
    error_type: str,
    message: str,
    traceback: str = "",
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> bytes:
    """Encode a failure reply payload. Never raises for string input.

    Text that cannot be encoded is escaped, and an oversized message or traceback is
    shortened so the reply always fits in ``max_frame_bytes``.
    """
    error: Dict[str, str] = {"type": error_type, "message": message, "traceback": traceback}
    try:
        data = dumps({"id": request_id, "success": False, "error": error})
    except SerializationError:
        error = {key: _clean_text(value) for key, value in error.items()}
        data = dumps({"id": request_id, "success": False, "error": error})
    if len(data) <= max_frame_bytes:
        return data
    # Leave room for the envelope and for escaping (up to 6 bytes per character).
    budget = max(64, (max_frame_bytes - 512) // 12)
    for key in ("traceback", "message"):
        text = error[key]
        if len(text) > budget:
            error[key] = text[:budget] + f"... [{len(text) - budget} characters cut]"
    return dumps({"id": request_id, "success": False, "error": error})


# --------------------------------------------------------------------------------------------
# Reading and writing frames on file descriptors
# --------------------------------------------------------------------------------------------


def _default_readinto(fd: int) -> Callable[[memoryview], int]:
    readv = os.readv

    def readinto(view: memoryview) -> int:
        return readv(fd, [view])

    return readinto


class FrameReader:
    """Reads frames from a blocking file descriptor with as few system calls as possible.

    Small frames are served from an internal buffer (several frames may arrive in one
    read); a frame larger than what is buffered is read straight into a buffer of its
    own size. Nothing is allocated for a frame larger than ``max_frame_bytes``.
    """

    def __init__(
        self,
        fd: int,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        *,
        buffer_size: int = 64 * 1024,
        readinto: Optional[Callable[[memoryview], int]] = None,
    ) -> None:
        self.fd = fd
        self.max_frame_bytes = max_frame_bytes
        self._readinto = readinto if readinto is not None else _default_readinto(fd)
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def _fill(self) -> int:
        """Read more bytes into the buffer; return how many (0 means end of input)."""
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = start = end = 0
        elif end == len(self._buf):
            pending = bytes(self._view[start:end])
            self._buf[: len(pending)] = pending
            self._start, self._end = 0, len(pending)
            start, end = 0, len(pending)
        count = self._readinto(self._view[end:])
        self._end = end + count
        return count

    def read_frame(self) -> Optional[Union[bytes, bytearray]]:
        """Return the next payload, or ``None`` on end of input between frames.

        Raises ``TruncatedFrame`` on end of input inside a frame, and ``FrameTooLarge``
        (with the header consumed) when a frame exceeds the maximum; call ``skip`` with
        its size to discard the payload and stay in sync.
        """
        while self._end - self._start < HEADER.size:
            if self._fill() == 0:
                buffered = self._end - self._start
                if buffered == 0:
                    return None
                raise TruncatedFrame(f"truncated frame: end of input after {buffered} header bytes")
        (size,) = HEADER.unpack_from(self._buf, self._start)
        self._start += HEADER.size
        if size > self.max_frame_bytes:
            raise FrameTooLarge(size, self.max_frame_bytes)
        start = self._start
        if self._end - start >= size:
            self._start = start + size
            return bytes(self._view[start : start + size])
        return self._read_large(size)

    def _read_large(self, size: int) -> bytearray:
        payload = bytearray(size)
        target = memoryview(payload)
        have = self._end - self._start
        target[:have] = self._view[self._start : self._end]
        self._start = self._end = 0
        readinto = self._readinto
        while have < size:
            count = readinto(target[have:])
            if count == 0:
                raise TruncatedFrame(
                    f"truncated frame: end of input after {have} of {size} payload bytes"
                )
            have += count
        return payload

    def skip(self, size: int) -> None:
        """Discard exactly ``size`` payload bytes, reading at most 64 KiB at a time."""
        buffered = min(size, self._end - self._start)
        self._start += buffered
        remaining = size - buffered
        if remaining == 0:
            return
        self._start = self._end = 0
        chunk = min(DISCARD_CHUNK_BYTES, len(self._buf))
        view = self._view
        readinto = self._readinto
        while remaining > 0:
            count = readinto(view[: min(chunk, remaining)])
            if count == 0:
                raise TruncatedFrame(
                    f"truncated frame: end of input with {remaining} of {size} bytes to discard"
                )
            remaining -= count


class FrameWriter:
    """Writes frames to a blocking file descriptor, header and payload in one call."""

    _SMALL = 64 * 1024

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write_frame(self, payload: Buffer) -> None:
        """Write one frame. Raises ``BrokenPipeError`` when the reader has gone away."""
        fd = self.fd
        size = len(payload)
        if size <= self._SMALL:
            data = HEADER.pack(size) + payload
            written = os.write(fd, data)
            if written < len(data):
                self._write_rest(memoryview(data)[written:])
            return
        header = HEADER.pack(size)
        written = os.writev(fd, [header, payload])
        if written < HEADER.size:
            self._write_rest(memoryview(header)[written:])
            written = HEADER.size
        if written < HEADER.size + size:
            self._write_rest(memoryview(payload)[written - HEADER.size :])

    def _write_rest(self, view: memoryview) -> None:
        while len(view):
            written = os.write(self.fd, view)
            view = view[written:]
