"""``execute_program`` with ``"stream": true`` through real worker processes.

The worker's LM is a profile pointing at the fake OpenAI-compatible server, reached over
DSPy's own HTTP client; the server streams its answers as Server-Sent Events and can hold
a response open after its first pieces, so a test can show that chunks reach the client
while the LM is still writing. The tests pay for each chunk with one credit, as the host
does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from conftest import DEFAULT_TIMEOUT, SpawnWorker, WorkerProcess
from fake_lm_server import USAGE, FakeLMServer, StreamScript

pytest.importorskip("dspy")

from snakepool_worker.dspy import PROGRAMS_ENV  # noqa: E402

MODEL = "openai/test-model"
KEY = "sk-stream-test"
MARKER = "INTERNAL-BODY-MARKER-5f1e"
QUESTION = {"question": "What is the capital of Atlantis?"}
ANSWER = "Poseidonia is the capital of Atlantis"
REASONING = "The old maps name one city on the island"
PAUSE_AFTER = 7
"""Pieces sent before a paused stream waits: ``[[ ## answer ## ]]``, then two words."""
WINDOW = 16
"""The chunks a call may send before the host grants credit (the worker's default)."""


@pytest.fixture
def server() -> Iterator[FakeLMServer]:
    fake = FakeLMServer()
    yield fake
    fake.close()


def profile(server: FakeLMServer, prefix: str, **extra: Any) -> Dict[str, Any]:
    settings: Dict[str, Any] = {
        "model": MODEL,
        "api_base": server.base(prefix),
        "api_key_env": "SP_TEST_PROFILE_KEY",
        "num_retries": 0,
    }
    settings.update(extra)
    return settings


@pytest.fixture
def worker(spawn_worker: SpawnWorker, server: FakeLMServer, tmp_path: Path) -> WorkerProcess:
    """A worker whose profiles are named after their endpoints (``k`` caches), serving
    the program ``qa`` (``question -> answer``) with profile ``a``."""
    profiles = {prefix: profile(server, prefix) for prefix in ("a", "c", "p", "d")}
    profiles["k"] = profile(server, "k", cache=True)
    served = tmp_path / "qa.json"
    served.write_text(json.dumps({"signature": "question -> answer"}))
    env = {
        "SP_TEST_PROFILE_KEY": KEY,
        "SNAKEPOOL_LM_PROFILES": json.dumps(profiles),
        PROGRAMS_ENV: json.dumps({"qa": {"path": str(served), "profile": "a"}}),
    }
    process = spawn_worker(default_modules=True, env=env)
    process.handshake()
    return process


def session_result(worker: WorkerProcess, command: str, **args: Any) -> Any:
    return worker.result(command, {"session_id": "s1", **args})


def session_program(
    worker: WorkerProcess, prefix: str, program_type: str = "predict", signature: str = ""
) -> str:
    """Configure the session's LM with profile ``prefix`` and create a program."""
    session_result(worker, "configure_lm", profile=prefix)
    created = session_result(
        worker,
        "create_program",
        signature=signature or "question -> answer",
        type=program_type,
    )
    program_id: str = created["program_id"]
    return program_id


def start(worker: WorkerProcess, **args: Any) -> int:
    """Send an ``execute_program`` request and return its id, without waiting."""
    request_id = worker.new_id()
    worker.send({"id": request_id, "command": "execute_program", "args": args})
    return request_id


def next_frame(worker: WorkerProcess, request_id: int) -> Dict[str, Any]:
    """The call's next frame; a chunk is paid for with one credit, as the host does."""
    frame = worker.recv()
    assert frame["id"] == request_id, frame
    if "chunk" in frame:
        worker.send({"id": request_id, "credit": 1})
    return frame


def finish(worker: WorkerProcess, request_id: int) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """The call's remaining chunks and its final reply."""
    chunks = []
    while True:
        frame = next_frame(worker, request_id)
        if "chunk" not in frame:
            return chunks, frame
        chunks.append(frame["chunk"])


def stream_session(worker: WorkerProcess, program_id: str) -> Tuple[List[Any], Dict[str, Any]]:
    request_id = start(worker, session_id="s1", program_id=program_id, inputs=QUESTION, stream=True)
    return finish(worker, request_id)


def text(chunks: List[Dict[str, Any]], field: str) -> str:
    return "".join(chunk["text"] for chunk in chunks if chunk["field"] == field)


def succeeded(reply: Dict[str, Any]) -> Dict[str, Any]:
    assert reply["success"] is True, reply
    result: Dict[str, Any] = reply["result"]
    return result


def asked_to_stream(request: Any) -> bool:
    return json.loads(request.body).get("stream") is True


def clean_exit_stderr(worker: WorkerProcess) -> str:
    """End the worker (its event loop then closes any async generator still open) and
    return all it wrote on stderr."""
    worker.close_stdin()
    assert worker.wait() == 0
    return worker.stderr.wait_eof()


def paused_stream(server: FakeLMServer, prefix: str) -> StreamScript:
    return server.stream(prefix, pause_after=PAUSE_AFTER, answer=ANSWER)


def test_a_predict_program_streams_its_answer_then_the_usual_result(
    worker: WorkerProcess, server: FakeLMServer
) -> None:
    server.stream("a", answer=ANSWER)
    program_id = session_program(worker, "a")
    chunks, reply = stream_session(worker, program_id)
    assert len(chunks) >= 4, chunks
    assert {(chunk["field"], chunk["predictor"]) for chunk in chunks} == {("answer", "self")}
    assert text(chunks, "answer") == ANSWER
    streamed = succeeded(reply)
    plain = session_result(worker, "execute_program", program_id=program_id, inputs=QUESTION)
    assert streamed["outputs"] == plain["outputs"] == {"answer": ANSWER}
    assert streamed == plain
    assert [asked_to_stream(request) for request in server.requests] == [True, False]
    assert {key: streamed["usage"][MODEL][key] for key in USAGE} == USAGE


def test_a_chain_of_thought_streams_its_reasoning_then_its_answer(
    worker: WorkerProcess, server: FakeLMServer
) -> None:
    server.stream("c", reasoning=REASONING, answer=ANSWER)
    program_id = session_program(worker, "c", "chain_of_thought")
    chunks, reply = stream_session(worker, program_id)
    fields = [chunk["field"] for chunk in chunks]
    assert fields == sorted(fields, key=["reasoning", "answer"].index), fields
    assert fields.count("reasoning") >= 3 and fields.count("answer") >= 3, fields
    assert {chunk["predictor"] for chunk in chunks} == {"predict"}
    assert (text(chunks, "reasoning"), text(chunks, "answer")) == (REASONING, ANSWER)
    result = succeeded(reply)
    assert result["outputs"] == {"answer": ANSWER} and result["reasoning"] == REASONING


def test_chunks_arrive_while_the_lm_is_still_answering(
    worker: WorkerProcess, server: FakeLMServer
) -> None:
    script = paused_stream(server, "p")
    program_id = session_program(worker, "p")
    request_id = start(worker, session_id="s1", program_id=program_id, inputs=QUESTION, stream=True)
    try:
        first = next_frame(worker, request_id)
        # The server cannot finish its response before it is released, below.
        assert first["chunk"] == {"field": "answer", "predictor": "self", "text": "Poseidonia"}
        assert not script.finished.is_set()
        assert script.paused.wait(DEFAULT_TIMEOUT)
    finally:
        script.release.set()
    chunks, reply = finish(worker, request_id)
    assert script.finished.is_set()
    assert text([first["chunk"], *chunks], "answer") == ANSWER
    assert succeeded(reply)["outputs"] == {"answer": ANSWER}


def test_cancelling_a_paused_stream_answers_cancelled_and_the_worker_keeps_serving(
    worker: WorkerProcess, server: FakeLMServer
) -> None:
    script = paused_stream(server, "p")
    program_id = session_program(worker, "p")
    request_id = start(worker, session_id="s1", program_id=program_id, inputs=QUESTION, stream=True)
    try:
        assert "chunk" in next_frame(worker, request_id)
        assert script.paused.wait(DEFAULT_TIMEOUT)
        worker.send({"id": request_id, "cancel": True})
        _, reply = finish(worker, request_id)
    finally:
        script.release.set()
    assert reply["success"] is False and reply["error"]["type"] == "Cancelled", reply
    assert worker.call("ping")["success"] is True
    # The next stream runs as usual, and the cancelled one left nothing open behind it.
    server.stream("a", answer=ANSWER)
    session_result(worker, "configure_lm", profile="a")
    chunks, reply = stream_session(worker, program_id)
    assert text(chunks, "answer") == ANSWER and succeeded(reply)
    stderr = clean_exit_stderr(worker)
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr


def test_cancelling_a_stream_that_waits_for_credit_stops_it_cleanly(
    worker: WorkerProcess, server: FakeLMServer
) -> None:
    words = " ".join(f"word{n}" for n in range(2 * WINDOW))
    # The header's five pieces, then more words than the window: the call waits for
    # credit while DSPy still reads the LM's response.
    script = server.stream("p", pause_after=5 + WINDOW + 4, answer=words)
    program_id = session_program(worker, "p")
    request_id = start(worker, session_id="s1", program_id=program_id, inputs=QUESTION, stream=True)
    try:
        frames = [worker.recv() for _ in range(WINDOW)]
        assert [frame.get("chunk", {}).get("field") for frame in frames] == ["answer"] * WINDOW
        assert script.paused.wait(DEFAULT_TIMEOUT)
        worker.send({"id": request_id, "cancel": True})
        reply = worker.recv()
    finally:
        script.release.set()
    assert reply["id"] == request_id and reply["error"]["type"] == "Cancelled", reply
    assert worker.call("ping")["success"] is True
    stderr = clean_exit_stderr(worker)
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr


@pytest.mark.parametrize("value", ["yes", 1])
def test_stream_must_be_a_boolean(worker: WorkerProcess, server: FakeLMServer, value: Any) -> None:
    program_id = session_program(worker, "a")
    reply = worker.call(
        "execute_program",
        {"session_id": "s1", "program_id": program_id, "inputs": QUESTION, "stream": value},
    )
    assert reply["success"] is False, reply
    assert reply["error"]["type"] == "InvalidArgument"
    assert "args.stream must be true or false" in reply["error"]["message"]
    assert server.requests == []


def test_an_lm_failure_while_streaming_is_lm_call_failed_without_the_body(
    worker: WorkerProcess, server: FakeLMServer
) -> None:
    server.fail("d", 500, MARKER)
    program_id = session_program(worker, "d")
    chunks, reply = stream_session(worker, program_id)
    assert chunks == []
    assert reply["success"] is False, reply
    assert reply["error"]["type"] == "LMCallFailed"
    assert reply["error"]["message"].startswith(
        f"LM call failed (profile 'd', model '{MODEL}'): HTTP 500 from the provider ("
    )
    for secret in (MARKER, server.base("d"), KEY):
        assert secret not in json.dumps(reply), secret
    assert [asked_to_stream(request) for request in server.requests] == [True]


def test_a_cached_answer_ends_the_stream_with_no_chunk(
    worker: WorkerProcess, server: FakeLMServer
) -> None:
    server.stream("k", answer=ANSWER)
    program_id = session_program(worker, "k")
    first_chunks, first = stream_session(worker, program_id)
    assert text(first_chunks, "answer") == ANSWER
    chunks, again = stream_session(worker, program_id)
    assert chunks == []
    assert succeeded(again) == {"outputs": {"answer": ANSWER}, "reasoning": None, "usage": None}
    assert succeeded(first)["outputs"] == {"answer": ANSWER} and server.count("k") == 1


def test_only_string_outputs_are_streamed(worker: WorkerProcess, server: FakeLMServer) -> None:
    server.stream("a", answer="42", note="a note in several words")
    program_id = session_program(worker, "a", signature="question -> answer: int, note")
    chunks, reply = stream_session(worker, program_id)
    assert {chunk["field"] for chunk in chunks} == {"note"}
    assert text(chunks, "note") == "a note in several words"
    assert succeeded(reply)["outputs"] == {"answer": 42, "note": "a note in several words"}


def test_a_served_program_streams_as_a_plain_call(
    worker: WorkerProcess, server: FakeLMServer
) -> None:
    server.stream("a", answer=ANSWER)
    request_id = start(worker, program="qa", inputs=QUESTION, stream=True)
    chunks, reply = finish(worker, request_id)
    assert text(chunks, "answer") == ANSWER
    assert succeeded(reply)["outputs"] == {"answer": ANSWER}


@pytest.mark.parametrize("extra", [{}, {"stream": False}])
def test_without_streaming_the_reply_is_the_result_alone(
    worker: WorkerProcess, server: FakeLMServer, extra: Dict[str, Any]
) -> None:
    server.stream("a", answer=ANSWER)
    program_id = session_program(worker, "a")
    request_id = start(worker, session_id="s1", program_id=program_id, inputs=QUESTION, **extra)
    reply = worker.recv()
    assert reply["id"] == request_id and "chunk" not in reply, reply
    result = succeeded(reply)
    assert set(result) == {"outputs", "reasoning", "usage"}
    assert (result["outputs"], result["reasoning"]) == ({"answer": ANSWER}, None)
    assert {key: result["usage"][MODEL][key] for key in USAGE} == USAGE
    assert [asked_to_stream(request) for request in server.requests] == [False]
