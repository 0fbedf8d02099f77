"""Shared fixtures: real worker subprocesses on real pipes, with deadline-bound I/O."""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import pytest

TESTS_DIR = Path(__file__).resolve().parent
PACKAGE_ROOT = TESTS_DIR.parent

for _path in (str(PACKAGE_ROOT), str(TESTS_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

HANDLERS_MODULE = "handlers_for_tests"
DEFAULT_TIMEOUT = 10.0
"""Upper bound for any single wait; a healthy worker answers in milliseconds."""


def encode(message: Any) -> bytes:
    """A frame for ``message``, encoded independently of the package under test."""
    payload = json.dumps(message).encode("utf-8")
    return struct.pack(">I", len(payload)) + payload


def raw_frame(payload: bytes) -> bytes:
    """A frame with an arbitrary payload."""
    return struct.pack(">I", len(payload)) + payload


class StderrDrain:
    """Reads a pipe on a thread so the child never blocks on stderr; lets tests wait for text."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._data = bytearray()
        self._eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="stderr-drain", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._data += chunk
                self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return self._data.decode("utf-8", "replace")

    def __len__(self) -> int:
        with self._cond:
            return len(self._data)

    def wait_for(self, needle: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Wait until ``needle`` has appeared on stderr; return all stderr so far."""
        encoded = needle.encode("utf-8")
        deadline = time.monotonic() + timeout
        with self._cond:
            while encoded not in self._data:
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    pytest.fail(
                        f"{needle!r} did not appear on stderr; stderr was:\n"
                        f"{self._data.decode('utf-8', 'replace')}"
                    )
                self._cond.wait(remaining)
            return self._data.decode("utf-8", "replace")

    def wait_eof(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Wait until the child has closed stderr; return everything it wrote."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._eof:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail("stderr was not closed in time")
                self._cond.wait(remaining)
            return self._data.decode("utf-8", "replace")


class WorkerProcess:
    """A running ``python -m snakepool_worker`` with frame helpers bound to deadlines."""

    def __init__(self, argv: Sequence[str], env: Dict[str, str]) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.stdin_fd = self.proc.stdin.fileno()
        self.stdout_fd = self.proc.stdout.fileno()
        os.set_blocking(self.stdin_fd, False)
        self.stderr = StderrDrain(self.proc.stderr.fileno())
        self._next_id = 1

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -- writing ------------------------------------------------------------------------------

    def send_raw(self, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Write all of ``data`` to the worker's stdin, failing the test on timeout."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.stdin_fd, select.POLLOUT)
        while len(view):
            try:
                written = os.write(self.stdin_fd, view)
            except BlockingIOError:
                written = 0
            view = view[written:]
            if not len(view):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"worker did not read its input in time ({len(view)} bytes left)")
            poller.poll(remaining * 1000)

    def send(self, message: Any) -> None:
        self.send_raw(encode(message))

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    # -- reading ------------------------------------------------------------------------------

    def _read_exact(self, size: int, deadline: float) -> bytes:
        data = bytearray()
        poller = select.poll()
        poller.register(self.stdout_fd, select.POLLIN)
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(
                    f"no complete frame from the worker in time; stderr:\n{self.stderr.text}"
                )
            if not poller.poll(remaining * 1000):
                continue
            chunk = os.read(self.stdout_fd, size - len(data))
            if not chunk:
                raise EOFError(f"worker stdout closed after {len(data)} of {size} bytes")
            data += chunk
        return bytes(data)

    def recv_raw(self, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Read one frame's payload."""
        deadline = time.monotonic() + timeout
        (size,) = struct.unpack(">I", self._read_exact(4, deadline))
        return self._read_exact(size, deadline)

    def recv(self, timeout: float = DEFAULT_TIMEOUT) -> Dict[str, Any]:
        """Read and decode one reply."""
        return json.loads(self.recv_raw(timeout))

    def read_eof(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Expect the worker to close stdout with no further frames."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.stdout_fd, select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail("worker stdout was not closed in time")
            if poller.poll(remaining * 1000):
                chunk = os.read(self.stdout_fd, 65536)
                assert chunk == b"", f"unexpected bytes on stdout: {chunk[:200]!r}"
                return

    # -- requests -----------------------------------------------------------------------------

    def new_id(self) -> int:
        request_id = self._next_id
        self._next_id += 1
        return request_id

    def call(
        self, command: str, args: Optional[Dict[str, Any]] = None, **extra: Any
    ) -> Dict[str, Any]:
        """Send one request and return its reply, checking the id matches."""
        request_id = self.new_id()
        message: Dict[str, Any] = {"id": request_id, "command": command}
        if args is not None:
            message["args"] = args
        message.update(extra)
        self.send(message)
        reply = self.recv()
        assert reply["id"] == request_id, reply
        return reply

    def result(self, command: str, args: Optional[Dict[str, Any]] = None) -> Any:
        """Call ``command`` and return its result, failing the test on an error reply."""
        reply = self.call(command, args)
        assert reply["success"] is True, reply
        return reply["result"]

    def handshake(self, worker_id: str = "t1") -> Dict[str, Any]:
        self.send(
            {"id": 0, "command": "ping", "args": {"initialization": True, "worker_id": worker_id}}
        )
        reply = self.recv()
        assert reply["id"] == 0 and reply["success"] is True, reply
        return reply["result"]

    # -- lifecycle ------------------------------------------------------------------------------

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker did not exit in time; stderr:\n{self.stderr.text}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()
        self.stderr.wait_eof()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def worker_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SNAKEPOOL_") and key != "PYTHONPATH"
    }
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), str(TESTS_DIR)])
    if extra:
        env.update(extra)
    return env


SpawnWorker = Callable[..., WorkerProcess]


@pytest.fixture
def spawn_worker() -> Iterator[SpawnWorker]:
    """Factory: ``spawn_worker(*extra_args, modules=[...], env={...})`` starts a worker.

    Default command modules are off unless ``default_modules=True``, so the runtime tests
    see the same workers whether or not DSPy is installed.
    """
    started: List[WorkerProcess] = []

    def spawn(
        *extra_args: str,
        modules: Sequence[str] = (HANDLERS_MODULE,),
        worker_id: Optional[str] = "t1",
        env: Optional[Dict[str, str]] = None,
        default_modules: bool = False,
    ) -> WorkerProcess:
        argv = [sys.executable, "-m", "snakepool_worker"]
        if worker_id is not None:
            argv += ["--worker-id", worker_id]
        for module in modules:
            argv += ["--module", module]
        argv += list(extra_args)
        process_env = {} if default_modules else {"SNAKEPOOL_DEFAULT_MODULES": "0"}
        process_env.update(env or {})
        process = WorkerProcess(argv, worker_env(process_env))
        started.append(process)
        return process

    yield spawn
    for process in started:
        process.kill()


@pytest.fixture
def worker(spawn_worker: SpawnWorker) -> WorkerProcess:
    """A worker with the test handlers loaded, after a successful handshake."""
    process = spawn_worker()
    process.handshake()
    return process


LM_POLICY_VARIABLES = (
    "SNAKEPOOL_LM_PROFILES",
    "SNAKEPOOL_LM_CLIENT_SETTINGS",
    "SNAKEPOOL_LM_CACHE_DIR",
)


class LMEnv:
    """Sets the LM policy variables of this process (a worker's environment, in-process)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch

    def profiles(self, profiles: Any) -> None:
        """``SNAKEPOOL_LM_PROFILES``: a dict (encoded as JSON) or raw text."""
        text = profiles if isinstance(profiles, str) else json.dumps(profiles)
        self._monkeypatch.setenv("SNAKEPOOL_LM_PROFILES", text)

    def client_settings(self, value: str = "allow") -> None:
        self._monkeypatch.setenv("SNAKEPOOL_LM_CLIENT_SETTINGS", value)

    def cache_dir(self, path: Any) -> None:
        self._monkeypatch.setenv("SNAKEPOOL_LM_CACHE_DIR", str(path))

    def set(self, name: str, value: str) -> None:
        self._monkeypatch.setenv(name, value)


@pytest.fixture
def lm_env(monkeypatch: pytest.MonkeyPatch) -> LMEnv:
    """The LM policy variables cleared (no profiles, client settings denied, no cache dir)."""
    for name in LM_POLICY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return LMEnv(monkeypatch)

