"""An OpenAI-compatible chat completions server on 127.0.0.1, run on a thread for tests.

Each path prefix (``/a/v1``, ``/b/v1`` ...) is its own endpoint with its own behaviour:
answer with a fixed field value, fail with an HTTP status and a body, or reply with text
that is not JSON. Every request is recorded (path, headers, body) so tests can check
what reached the provider, and waits for requests have deadlines.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

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


def chat_reply(fields: Dict[str, str]) -> Dict[str, Any]:
    """A chat completion whose content is DSPy's ChatAdapter format for ``fields``."""
    content = "".join(f"[[ ## {name} ## ]]\n{value}\n\n" for name, value in fields.items())
    content += "[[ ## completed ## ]]"
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "test-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


class FakeLMServer:
    """The server; configure endpoints with ``answer``, ``fail`` and ``garbage``."""

    def __init__(self) -> None:
        self._routes: Dict[str, Tuple[int, str, bytes]] = {}
        self._requests: List[Recorded] = []
        self._cond = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {key.lower(): value for key, value in self.headers.items()}
                status, content_type, payload = server._record(self.path, headers, body)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

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

    def answer(self, prefix: str, **fields: str) -> None:
        """Answer every call to ``prefix`` with these output field values."""
        payload = json.dumps(chat_reply(fields)).encode()
        self._routes[prefix] = (200, "application/json", payload)

    def fail(self, prefix: str, status: int, body: str) -> None:
        """Fail every call to ``prefix`` with ``status`` and an OpenAI-style error body."""
        payload = json.dumps({"error": {"message": body, "type": "test_error"}}).encode()
        self._routes[prefix] = (status, "application/json", payload)

    def garbage(self, prefix: str, text: str) -> None:
        """Answer every call to ``prefix`` with HTTP 200 and ``text``, which is not JSON."""
        self._routes[prefix] = (200, "application/json", text.encode())

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
