"""An OpenAI-compatible chat completions server on 127.0.0.1, run on a thread for tests.

Each path prefix (``/a/v1``, ``/b/v1`` ...) is its own endpoint with its own behaviour:
answer with a fixed field value, fail with an HTTP status and a body, reply with text
that is not JSON, or stream its answer: a request with ``"stream": true`` is answered
with Server-Sent Events carrying the content in pieces, optionally pausing after the
first few until the test releases the rest. Every request is recorded (path, headers,
body) so tests can check what reached the provider, and every wait has a deadline.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional, Tuple

DEFAULT_TIMEOUT = 10.0


class Recorded:
    """One request the server received."""

    __slots__ = ("path", "headers", "body")

    def __init__(self, path: str, headers: Dict[str, str], body: bytes) -> None:
        self.path = path
        self.headers = headers
        self.body = body

    @property
    def authorization(self) -> Optional[str]:
        return self.headers.get("authorization")


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
"""The usage the server reports for one call."""


def chat_content(fields: Dict[str, str]) -> str:
    """DSPy's ChatAdapter format for ``fields``: what the LM answers."""
    content = "".join(f"[[ ## {name} ## ]]\n{value}\n\n" for name, value in fields.items())
    return content + "[[ ## completed ## ]]"


def chat_reply(fields: Dict[str, str]) -> Dict[str, Any]:
    """A chat completion whose content is DSPy's ChatAdapter format for ``fields``."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "test-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": chat_content(fields)},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }


def split_content(content: str) -> List[str]:
    """``content`` in pieces as a tokenizer might cut it: each word with the whitespace
    before it (so ``[[ ## answer ## ]]`` alone is five pieces)."""
    return re.findall(r"\s*\S+", content)


def _event(data: Any) -> bytes:
    """One Server-Sent Event carrying ``data`` as JSON."""
    return f"data: {json.dumps(data)}\n\n".encode()


def _completion_chunk(delta: Dict[str, str], finish_reason: Optional[str] = None) -> bytes:
    return _event(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "test-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
    )


class StreamScript:
    """How an endpoint streams its answer, and how far it has got.

    The content goes out in ``pieces``; with ``pause_after`` set, the server sends that
    many pieces, sets ``paused`` and sends nothing more until ``release`` is set (and
    ends the response unfinished if it is not set within ``DEFAULT_TIMEOUT``).
    ``finished`` is set once a response has been sent whole, ``[DONE]`` included. The
    events are shared by every request to the endpoint.
    """

    __slots__ = ("pieces", "pause_after", "release", "paused", "finished")

    def __init__(self, content: str, pause_after: Optional[int] = None) -> None:
        self.pieces = split_content(content)
        if pause_after is not None and not 0 < pause_after < len(self.pieces):
            raise ValueError(
                f"pause_after must be within 1..{len(self.pieces) - 1}, got {pause_after}"
            )
        self.pause_after = pause_after
        self.release = threading.Event()
        self.paused = threading.Event()
        self.finished = threading.Event()

    def events(self, include_usage: bool) -> Iterator[bytes]:
        """The response's events: one per piece, the finish, the usage if asked, ``[DONE]``."""
        for index, piece in enumerate(self.pieces):
            if index == self.pause_after:
                self.paused.set()
                if not self.release.wait(DEFAULT_TIMEOUT):
                    return
            yield _completion_chunk({"content": piece})
        yield _completion_chunk({}, "stop")
        if include_usage:
            yield _event({"object": "chat.completion.chunk", "choices": [], "usage": USAGE})
        yield b"data: [DONE]\n\n"
        self.finished.set()


class FakeLMServer:
    """The server; configure endpoints with ``answer``, ``stream``, ``fail`` and ``garbage``."""

    def __init__(self) -> None:
        self._routes: Dict[str, Tuple[int, str, bytes]] = {}
        self._streams: Dict[str, StreamScript] = {}
        self._requests: List[Recorded] = []
        self._cond = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {key.lower(): value for key, value in self.headers.items()}
                status, content_type, payload = server._record(self.path, headers, body)
                streamed = server._streamed(self.path, body)
                if streamed is None:
                    self._reply(status, content_type, payload)
                else:
                    self._send_events(streamed)

            def _reply(self, status: int, content_type: str, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _send_events(self, events: Iterator[bytes]) -> None:
                """Each event as soon as it is made; the response ends when the connection
                closes (HTTP/1.0), so it has no length."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                try:
                    for event in events:
                        self.wfile.write(event)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client hung up: a cancelled call

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fake-lm-server",
            daemon=True,
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def base(self, prefix: str) -> str:
        """The ``api_base`` of the endpoint at ``/<prefix>/v1``."""
        return f"http://127.0.0.1:{self.port}/{prefix}/v1"

    # -- endpoints --------------------------------------------------------------------------

    def _route(self, prefix: str, status: int, payload: bytes) -> None:
        self._streams.pop(prefix, None)
        self._routes[prefix] = (status, "application/json", payload)

    def answer(self, prefix: str, **fields: str) -> None:
        """Answer every call to ``prefix`` with these output field values."""
        self._route(prefix, 200, json.dumps(chat_reply(fields)).encode())

    def stream(self, prefix: str, pause_after: Optional[int] = None, **fields: str) -> StreamScript:
        """Answer calls to ``prefix`` with these output field values, streamed in pieces
        to a request with ``"stream": true`` (see ``StreamScript`` for ``pause_after``)
        and whole to others."""
        script = StreamScript(chat_content(fields), pause_after)
        self.answer(prefix, **fields)
        self._streams[prefix] = script
        return script

    def fail(self, prefix: str, status: int, body: str) -> None:
        """Fail every call to ``prefix`` with ``status`` and an OpenAI-style error body."""
        payload = json.dumps({"error": {"message": body, "type": "test_error"}}).encode()
        self._route(prefix, status, payload)

    def garbage(self, prefix: str, text: str) -> None:
        """Answer every call to ``prefix`` with HTTP 200 and ``text``, which is not JSON."""
        self._route(prefix, 200, text.encode())

    # -- requests ---------------------------------------------------------------------------

    def _record(self, path: str, headers: Dict[str, str], body: bytes) -> Tuple[int, str, bytes]:
        prefix = path.strip("/").split("/", 1)[0]
        with self._cond:
            self._requests.append(Recorded(path, headers, body))
            self._cond.notify_all()
        route = self._routes.get(prefix)
        if route is None:
            return 404, "text/plain", f"no endpoint {prefix!r}".encode()
        return route

    def _streamed(self, path: str, body: bytes) -> Optional[Iterator[bytes]]:
        """The events answering a request with ``"stream": true`` to a streaming
        endpoint, or ``None``: answer as recorded."""
        script = self._streams.get(path.strip("/").split("/", 1)[0])
        if script is None:
            return None
        try:
            request = json.loads(body)
        except ValueError:
            return None
        if not isinstance(request, dict) or request.get("stream") is not True:
            return None
        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return script.events(include_usage)

    @property
    def requests(self) -> List[Recorded]:
        with self._cond:
            return list(self._requests)

    def count(self, prefix: Optional[str] = None) -> int:
        """Requests received so far (to ``prefix`` only, when given)."""
        return sum(
            1
            for request in self.requests
            if prefix is None or request.path.startswith(f"/{prefix}/")
        )

    def wait_for(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> List[Recorded]:
        """Wait until at least ``count`` requests have arrived; raise on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"the fake LM server got {len(self._requests)} of {count} requests "
                        f"within {timeout} s"
                    )
                self._cond.wait(remaining)
            return list(self._requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(DEFAULT_TIMEOUT)
