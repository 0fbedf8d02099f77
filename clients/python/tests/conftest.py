"""Fixtures: real ``snakepool serve`` processes on random loopback ports, and deadline-bound
waits.

The binary is ``$SNAKEPOOL_BIN`` (default ``target/debug/snakepool``, relative to the
repository root) and the workers' interpreter ``$SNAKEPOOL_PYTHON`` (default: this one).
A server is ready once it has printed ``listening on URL`` and then ``pool ready``.
"""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, List, Optional, TypeVar

import pytest

from snakepool_client import Client

REPO_ROOT = Path(__file__).resolve().parents[3]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
MODULES = ("sp_test_handlers", "async_handlers", "snakepool_worker.dspy")
"""The command modules the servers load. ``snapshot_handlers`` is left out: it registers
``note`` and ``notes`` as ``async_handlers`` does, and a worker refuses a command name
registered twice."""

START_LIMIT = 60.0
"""Longest wait for a server to be ready (or for its binary to appear, while rebuilt)."""
WAIT = 10.0
"""Longest wait for something that should happen almost at once."""
CALL_TIMEOUT = 30.0
"""The HTTP timeout of the tests' clients: no request waits longer."""

T = TypeVar("T")


def binary() -> Path:
    """The ``snakepool`` binary under test; waits (bounded) while it is being rebuilt."""
    path = Path(os.environ.get("SNAKEPOOL_BIN", "target/debug/snakepool"))
    if not path.is_absolute():
        path = REPO_ROOT / path
    wait_until(f"{path} to exist", lambda: path.exists(), START_LIMIT, poll=0.2)
    return path


def wait_until(
    what: str, condition: Callable[[], bool], limit: float = WAIT, poll: float = 0.005
) -> None:
    """Check ``condition`` until it holds; fail the test if it still does not after ``limit`` s."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {limit} s waiting for {what}")
        time.sleep(poll)


async def wait_until_async(
    what: str, condition: Callable[[], Awaitable[bool]], limit: float = WAIT, poll: float = 0.005
) -> None:
    """``wait_until`` for a condition that is awaited."""
    deadline = time.monotonic() + limit
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {limit} s waiting for {what}")
        await asyncio.sleep(poll)


def run_async(coroutine: Awaitable[T], limit: float = 60.0) -> T:
    """Run ``coroutine`` on a new event loop; fail the test if it takes longer than ``limit``."""

    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, limit)

    return asyncio.run(bounded())


def unique(prefix: str) -> str:
    """A session id no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Server:
    """A ``snakepool serve`` process, ready to serve."""

    def __init__(self, extra: List[str]) -> None:
        env = {key: value for key, value in os.environ.items() if not key.startswith("SNAKEPOOL_")}
        python = os.environ.get("SNAKEPOOL_PYTHON", sys.executable)
        command = [str(binary()), "serve", "--listen", "127.0.0.1:0", "--workers", "2"]
        command += ["--journal", "memory", "--python", python, "--python-path", str(FIXTURES)]
        for module in MODULES:
            command += ["--module", module]
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            command + extra,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._read_stdout, name="serve-stdout", daemon=True).start()
        deadline = time.monotonic() + START_LIMIT
        first = self._next_line(deadline)
        if not first.startswith("listening on "):
            self._fail(f"expected `listening on URL`, got {first!r}")
        self.url = first[len("listening on ") :].strip()
        ready = self._next_line(deadline)
        if not ready.startswith("pool ready"):
            self._fail(f"expected `pool ready`, got {ready!r}")

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next_line(self, deadline: float) -> str:
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self._fail(f"no line from `snakepool serve` within {START_LIMIT} s")
        if line is None:
            self._fail("`snakepool serve` closed its stdout")
        return line

    def _fail(self, message: str) -> Any:
        self.stop()
        self._stderr.seek(0)
        stderr = self._stderr.read().decode(errors="replace")[-4000:]
        pytest.fail(f"{message}; stderr:\n{stderr}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not stopped within 20 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """A server without a token."""
    process = Server([])
    yield process
    process.stop()


TOKEN = "client-test-token-" + uuid.uuid4().hex


@pytest.fixture(scope="session")
def token_server() -> Iterator[Server]:
    """A server that requires the bearer token ``TOKEN``."""
    process = Server(["--token", TOKEN])
    yield process
    process.stop()


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    """A sync client of ``server``."""
    with Client(server.url, timeout=CALL_TIMEOUT) as sync_client:
        yield sync_client
