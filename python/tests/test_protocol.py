"""Frame encoding/decoding, the JSON codec and the fd-level reader and writer."""

from __future__ import annotations

import json
import os
import struct
import threading
from typing import Callable, List, Tuple

import pytest

from snakepool_worker import protocol
from snakepool_worker.protocol import (
    FrameReader,
    FrameTooLarge,
    FrameWriter,
    SerializationError,
    TruncatedFrame,
    decode_frame,
    encode_failure,
    encode_frame,
    encode_success,
    is_valid_id,
)

Codec = Tuple[str, protocol.Dumps, protocol.Loads]


def chunked_reader(data: bytes, chunk: int = 1) -> Callable[[memoryview], int]:
    """A readinto that hands out ``data`` at most ``chunk`` bytes per call."""
    position = 0

    def readinto(view: memoryview) -> int:
        nonlocal position
        count = min(chunk, len(view), len(data) - position)
        view[:count] = data[position : position + count]
        position += count
        return count

    return readinto


def frames(*payloads: bytes) -> bytes:
    return b"".join(encode_frame(payload) for payload in payloads)


def test_encode_frame_header_is_big_endian_length() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert encode_frame(b"x" * 258)[:4] == b"\x00\x00\x01\x02"


def test_decode_frame_splits_complete_frames_and_waits_for_partial_ones() -> None:
    data = frames(b"one", b"two") + b"\x00\x00"
    first, rest = decode_frame(data)
    assert first == b"one"
    second, rest = decode_frame(rest)
    assert second == b"two"
    assert decode_frame(rest) == (None, b"\x00\x00")
    assert decode_frame(b"\x00\x00\x00\x05ab") == (None, b"\x00\x00\x00\x05ab")


def test_decode_frame_rejects_oversized_header() -> None:
    with pytest.raises(FrameTooLarge) as info:
        decode_frame(struct.pack(">I", 2000), max_frame_bytes=1024)
    assert info.value.size == 2000 and info.value.limit == 1024


@pytest.mark.parametrize("chunk", [1, 3, 7, 64 * 1024])
def test_reader_reassembles_frames_across_any_chunking(chunk: int) -> None:
    payloads = [b"", b"a", b"hello world", b"z" * 70_000, b"tail"]
    reader = FrameReader(0, readinto=chunked_reader(frames(*payloads), chunk), buffer_size=1024)
    assert [bytes(reader.read_frame()) for _ in payloads] == payloads
    assert reader.read_frame() is None


def test_reader_truncated_header_and_payload() -> None:
    reader = FrameReader(0, readinto=chunked_reader(b"\x00\x00", 10))
    with pytest.raises(TruncatedFrame, match="truncated frame"):
        reader.read_frame()
    reader = FrameReader(0, readinto=chunked_reader(b"\x00\x00\x00\x09abc", 10))
    with pytest.raises(TruncatedFrame, match="truncated frame"):
        reader.read_frame()


def test_reader_skips_oversized_frame_in_bounded_chunks() -> None:
    big = 300_000
    data = struct.pack(">I", big) + b"\xff" * big + frames(b"after")
    requested: List[int] = []
    inner = chunked_reader(data, 1 << 30)

    def readinto(view: memoryview) -> int:
        requested.append(len(view))
        return inner(view)

    reader = FrameReader(0, 1024, readinto=readinto)
    with pytest.raises(FrameTooLarge) as info:
        reader.read_frame()
    assert info.value.size == big
    reader.skip(info.value.size)
    assert reader.read_frame() == b"after"
    assert max(requested) <= protocol.DISCARD_CHUNK_BYTES


def test_reader_skip_hits_end_of_input() -> None:
    reader = FrameReader(0, 1024, readinto=chunked_reader(struct.pack(">I", 5000) + b"x" * 10, 4))
    with pytest.raises(FrameTooLarge):
        reader.read_frame()
    with pytest.raises(TruncatedFrame):
        reader.skip(5000)


def test_reader_and_writer_over_a_real_pipe() -> None:
    read_fd, write_fd = os.pipe()
    payloads = [b"{}", b"y" * 200_000, json.dumps({"k": "\u00e9"}).encode()]

    def produce() -> None:
        writer = FrameWriter(write_fd)
        for payload in payloads:
            writer.write_frame(payload)
        os.close(write_fd)

    thread = threading.Thread(target=produce)
    thread.start()
    try:
        reader = FrameReader(read_fd)
        received = [bytes(reader.read_frame()) for _ in payloads]
        assert reader.read_frame() is None
    finally:
        thread.join()
        os.close(read_fd)
    assert received == payloads


def test_writer_raises_broken_pipe_when_reader_is_gone() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    try:
        with pytest.raises(BrokenPipeError):
            FrameWriter(write_fd).write_frame(b"{}")
    finally:
        os.close(write_fd)


@pytest.mark.parametrize(
    "value, valid",
    [(0, True), (2**64 - 1, True), (2**64, False), (-1, False), (True, False), (1.0, False)],
)
def test_is_valid_id(value: object, valid: bool) -> None:
    assert is_valid_id(value) is valid


def test_success_and_failure_payloads() -> None:
    assert json.loads(encode_success(7, {"a": [1, "é"]})) == {
        "id": 7,
        "success": True,
        "result": {"a": [1, "é"]},
    }
    assert json.loads(encode_failure(8, "ValueError", "bad", "tb")) == {
        "id": 8,
        "success": False,
        "error": {"type": "ValueError", "message": "bad", "traceback": "tb"},
    }


def test_failure_with_unencodable_text_is_escaped() -> None:
    reply = json.loads(encode_failure(1, "ValueError", "lone \udc80 surrogate"))
    assert reply["error"]["message"] == "lone \\udc80 surrogate"


def test_failure_is_shortened_to_fit_the_frame_limit() -> None:
    data = encode_failure(1, "ValueError", "m" * 50_000, "t" * 50_000, max_frame_bytes=4096)
    assert len(data) <= 4096
    error = json.loads(data)["error"]
    assert error["type"] == "ValueError"
    assert "characters cut" in error["message"] and "characters cut" in error["traceback"]


def test_unserialisable_result_raises_serialization_error() -> None:
    with pytest.raises(SerializationError):
        encode_success(1, object())


@pytest.fixture(params=["json", "orjson"])
def codec(request: pytest.FixtureRequest) -> Codec:
    """Both codecs, when orjson is installed."""
    if request.param == "orjson":
        pytest.importorskip("orjson")
    return protocol.build_codec(request.param == "orjson")


def test_codecs_round_trip_plain_json(codec: Codec) -> None:
    name, dumps, loads = codec
    value = {"s": "é\u2603", "i": -3, "f": 1.5, "l": [None, True, False], "d": {}, "u": 2**64 - 1}
    assert json.loads(dumps(value)) == value
    assert loads(dumps(value)) == value
    assert loads(bytearray(dumps(value))) == value


def test_codecs_agree_on_edge_values(codec: Codec) -> None:
    import datetime
    import enum

    class Colour(str, enum.Enum):
        RED = "red"

    name, dumps, loads = codec
    assert json.loads(dumps({"n": 2**70, 1: "x", "c": Colour.RED})) == {
        "n": 2**70,
        "1": "x",
        "c": "red",
    }
    for bad in (object(), {"when": datetime.datetime(2024, 1, 1)}, {(1, 2): 3}):
        with pytest.raises(SerializationError):
            dumps(bad)
    with pytest.raises(ValueError):
        loads(b'{"id": 1, "x": "\xff"}')
    with pytest.raises(ValueError):
        loads(b"{not json")
