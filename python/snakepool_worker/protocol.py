"""Wire protocol v1: frames, JSON codec and reply encoding.

A frame is a 4-byte unsigned big-endian length ``N`` followed by ``N`` bytes of UTF-8 JSON.
This module is the only place that knows about bytes on the wire; everything above it
works with Python objects. The messages (requests, replies, and the v1 additions: chunk,
credit and cancel frames) are described in ``runtime.py``.

The JSON codec is ``orjson`` when it can be imported, otherwise the standard library
``json`` module. Setting the environment variable ``SNAKEPOOL_JSON=json`` forces the
standard library codec (useful when comparing behaviour between the two).
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import struct
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

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
"""Largest read used when discarding the payload of an oversized frame."""

HEADER = struct.Struct(">I")
"""The frame header: payload length, unsigned 32-bit big-endian."""

_unpack_header = HEADER.unpack_from

_OWN_BUFFER_BYTES = 4096
"""An incomplete frame larger than this is collected in a buffer of its own."""

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


class Overloaded(Exception):
    """A call that would pass the worker's ``max_concurrency`` calls in flight."""


class Cancelled(Exception):
    """A call cancelled by the host (or by the worker stopping) before it finished."""


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


def encode_chunk(request_id: int, value: Any) -> bytes:
    """Encode a chunk frame of a streaming call: ``{"id", "chunk": value}``.

    Raises ``SerializationError`` when the value cannot be encoded.
    """
    return dumps({"id": request_id, "chunk": value})


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


class FrameDecoder:
    """Splits frames out of input that arrives in pieces; the frame logic of every reader.

    ``feed(data)`` adds bytes as they were read (``fill(readinto)`` reads and feeds
    once); ``frames()`` then returns the complete payloads, in order. Frames are cut out
    of the bytes read (several may arrive in one read); a frame that is incomplete and
    larger than 4 KiB gets a buffer of its own size, once its header has passed the size
    check, and later input is copied straight into it. A header announcing more than
    ``max_frame_bytes`` is refused before anything is allocated for it: ``frames()``
    returns a ``FrameTooLarge`` in its place and its payload is discarded as it arrives.
    ``empty`` is true while nothing is held (no partial frame, nothing to discard), so a
    reader that got exactly one whole frame in a read may cut it out itself (after the
    same size check). ``truncation()`` says whether end of input now would cut a frame.
    """

    def __init__(
        self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, buffer_size: int = 64 * 1024
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.buffer_size = buffer_size
        self.empty = True
        self._data = b""
        self._pos = 0
        self._large: Optional[bytearray] = None
        self._large_have = 0
        self._skip = 0
        self._skip_size = 0
        self._scratch: Optional[memoryview] = None

    @property
    def skipping(self) -> bool:
        """True while the payload of a refused frame is still being discarded."""
        return self._skip > 0

    def feed(self, data: Buffer) -> None:
        """Add input (any number of bytes, as read)."""
        if not data:
            return
        self.empty = False
        large = self._large
        if large is not None:
            take = min(len(large) - self._large_have, len(data))
            large[self._large_have : self._large_have + take] = data[:take]
            self._large_have += take
            data = data[take:]
        elif self._skip:
            take = min(self._skip, len(data))
            self._skip -= take
            data = data[take:]
        if not data:
            return
        pos = self._pos
        if pos < len(self._data):
            self._data = self._data[pos:] + bytes(data)
        else:
            self._data = bytes(data)
        self._pos = 0

    def fill(self, readinto: Callable[[memoryview], int]) -> int:
        """Read once with ``readinto(view)`` (at most ``buffer_size`` bytes, and at most
        ``DISCARD_CHUNK_BYTES`` while discarding) and feed it; return the byte count."""
        scratch = self._scratch
        if scratch is None:
            scratch = self._scratch = memoryview(bytearray(self.buffer_size))
        if self._skip:
            scratch = scratch[: min(self._skip, DISCARD_CHUNK_BYTES)]
        count = readinto(scratch)
        self.feed(scratch[:count])
        return count

    def frames(self) -> List[Union[bytes, bytearray, FrameTooLarge]]:
        """The complete payloads fed so far, in order (empty until more is fed).

        A frame over ``max_frame_bytes`` appears as a ``FrameTooLarge`` instance in its
        place: its header is consumed, its payload discarded as it arrives.
        """
        found: List[Union[bytes, bytearray, FrameTooLarge]] = []
        large = self._large
        if large is not None:
            if self._large_have < len(large):
                return found
            self._large = None
            found.append(large)
        elif self._skip:
            return found
        data = self._data
        pos = self._pos
        length = len(data)
        limit = self.max_frame_bytes
        while length - pos >= 4:
            (size,) = _unpack_header(data, pos)
            end = pos + 4 + size
            if size > limit:
                found.append(FrameTooLarge(size, limit))
                if end > length:
                    self._skip = end - length
                    self._skip_size = size
                    self._data = b""
                    self._pos = 0
                    return found
                pos = end
                continue
            if end > length:
                if size > _OWN_BUFFER_BYTES or 4 + size > self.buffer_size:
                    # Incomplete and not small: collect it in a buffer of its own,
                    # rather than joining the bytes read so far with every new piece.
                    large = bytearray(size)
                    have = length - pos - 4
                    large[:have] = data[pos + 4 :]
                    self._large = large
                    self._large_have = have
                    self._data = b""
                    self._pos = 0
                    return found
                break
            found.append(data[pos + 4 : end])
            pos = end
        self._pos = pos
        self.empty = pos == length
        return found

    def truncation(self) -> Optional[str]:
        """``None`` if input may end here; otherwise what end of input would cut."""
        if self._large is not None:
            return (
                f"truncated frame: end of input after {self._large_have} of "
                f"{len(self._large)} payload bytes"
            )
        if self._skip:
            return (
                f"truncated frame: end of input with {self._skip} of {self._skip_size} "
                "bytes to discard"
            )
        buffered = len(self._data) - self._pos
        if buffered == 0:
            return None
        if buffered < 4:
            return f"truncated frame: end of input after {buffered} header bytes"
        (size,) = _unpack_header(self._data, self._pos)
        return f"truncated frame: end of input after {buffered - 4} of {size} payload bytes"


class FrameReader:
    """Reads frames from a blocking file descriptor (a ``FrameDecoder`` driven by reads).

    The worker's frame loop reads through the event loop instead (``loop.py``); this
    reader serves tools and tests that want one frame at a time.
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
        self._decoder = FrameDecoder(max_frame_bytes, buffer_size)
        self._ready: Deque[Union[bytes, bytearray, FrameTooLarge]] = collections.deque()

    def read_frame(self) -> Optional[Union[bytes, bytearray]]:
        """Return the next payload, or ``None`` on end of input between frames.

        Raises ``TruncatedFrame`` on end of input inside a frame, and ``FrameTooLarge``
        (with the header consumed) when a frame exceeds the maximum; its payload is
        discarded by ``skip`` or, failing that, by the next ``read_frame``.
        """
        ready = self._ready
        decoder = self._decoder
        while not ready:
            ready.extend(decoder.frames())
            if ready:
                break
            if decoder.fill(self._readinto) == 0:
                problem = decoder.truncation()
                if problem is None:
                    return None
                raise TruncatedFrame(problem)
        payload = ready.popleft()
        if isinstance(payload, FrameTooLarge):
            raise payload
        return payload

    def skip(self, size: int) -> None:
        """Discard the payload of the frame just refused with ``FrameTooLarge(size)``.

        Reads at most ``DISCARD_CHUNK_BYTES`` at a time; raises ``TruncatedFrame`` if
        input ends first.
        """
        decoder = self._decoder
        while decoder.skipping:
            if decoder.fill(self._readinto) == 0:
                raise TruncatedFrame(decoder.truncation() or "truncated frame")


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
