"""The fork server: import the heavy modules once, then fork a ready worker per request.

``python -m snakepool_worker.zygote --socket-fd FD [worker runtime flags]``

The host talks to the zygote over a Unix ``SOCK_SEQPACKET`` socket, one JSON message per
datagram:

- zygote → host: ``{"op": "ready", "pid", "fork_safe", "threads", "preloaded"}`` once,
  then ``{"op": "spawned", "request", "pid"}`` or ``{"op": "spawn_failed", "request",
  "reason", "unsafe"}`` per request, and ``{"op": "exited", "pid", "code" | "signal"}``
  when a forked worker ends.
- host → zygote: ``{"op": "spawn", "request", "worker_id", "argv"}`` carrying the
  worker's stdin, stdout and stderr as three file descriptors (``SCM_RIGHTS``).

Besides ``--preload``, the zygote imports the library behind each default command module
it loads (DSPy for ``snakepool_worker.dspy``), since it pays that import once for all
workers. The zygote forks only while it is single-threaded: a process with other threads can
deadlock its child (a lock held by a thread that does not exist after the fork). Each
child gets its own process group, the three descriptors as fds 0-2, a watchdog on the
host's pid, and then runs the ordinary worker runtime (``runtime.main``) with ``argv``.
The zygote exits when the host closes the socket.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import traceback
from typing import Any, Dict, List, Optional, Sequence

from . import runtime

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_IMPORT_FAILED = 3
EXIT_CHILD_FAILED = 70

MAX_MESSAGE = 64 * 1024


def native_thread_count() -> int:
    """Threads of this process as the kernel sees them (C threads included)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def thread_names() -> List[str]:
    """Names of the Python threads other than the main one, plus unnamed native ones."""
    names = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    native_extra = native_thread_count() - 1 - len(names)
    if native_extra > 0:
        names.append(f"{native_extra} native thread(s) not started by Python")
    return names


def _send(sock: socket.socket, message: Dict[str, Any]) -> None:
    sock.send(json.dumps(message).encode())


def _parse(argv: Optional[Sequence[str]]) -> tuple[int, List[str], List[str]]:
    parser = argparse.ArgumentParser(prog="snakepool_worker.zygote", add_help=True)
    parser.add_argument("--socket-fd", type=int, required=True, metavar="FD")
    ours, rest = parser.parse_known_args(argv)
    options = runtime.parse_options(rest)
    preload = list(options.preload)
    # The zygote pays an import once for every worker, so the libraries behind the
    # default command modules (DSPy for snakepool_worker.dspy) are preloaded too.
    for requirement, module in runtime.DEFAULT_MODULES:
        if module in options.modules and requirement not in preload:
            preload.append(requirement)
    return ours.socket_fd, preload, list(options.modules)


def _import_all(names: List[str]) -> bool:
    for name in names:
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as exc:
            traceback.print_exc()
            sys.stderr.write(f"snakepool_worker.zygote: failed to import module {name!r}: {exc}\n")
            return False
    return True


def _exit_message(pid: int, status: int) -> Dict[str, Any]:
    if os.WIFSIGNALED(status):
        return {"op": "exited", "pid": pid, "signal": os.WTERMSIG(status)}
    return {"op": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)}


def _run_child(
    sock: socket.socket, wake_fds: Sequence[int], fds: List[int], argv: List[str]
) -> None:
    """In the forked child: become a worker. Never returns."""
    code = EXIT_CHILD_FAILED
    try:
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        for fd in wake_fds:
            os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        code = runtime.main(argv)
    except BaseException:
        try:
            traceback.print_exc()
        finally:
            os._exit(EXIT_CHILD_FAILED)
    os._exit(code)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, _exit_message(pid, status))


def _serve(sock: socket.socket) -> int:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    sock_fd = sock.fileno()
    while True:
        try:
            ready, _, _ = select.select([sock_fd, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            _reap(sock)
        if sock_fd not in ready:
            continue
        message, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 3)
        if not message:
            for fd in fds:
                os.close(fd)
            return EXIT_OK
        request = json.loads(message)
        request_id = request.get("request", 0)
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            _send(
                sock,
                {
                    "op": "spawn_failed",
                    "request": request_id,
                    "reason": f"got {len(fds)} fds, not 3",
                },
            )
            continue
        if native_thread_count() != 1:
            for fd in fds:
                os.close(fd)
            reason = ", ".join(thread_names())
            _send(
                sock,
                {"op": "spawn_failed", "request": request_id, "reason": reason, "unsafe": True},
            )
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            _send(sock, {"op": "spawn_failed", "request": request_id, "reason": str(exc)})
            continue
        if pid == 0:
            _run_child(sock, (wake_r, wake_w), fds, [str(a) for a in request.get("argv", [])])
        for fd in fds:
            os.close(fd)
        _send(sock, {"op": "spawned", "request": request_id, "pid": pid})


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the zygote; return its exit code."""
    try:
        socket_fd, preload, modules = _parse(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    # Stray prints while importing go to stderr, never to a worker's channel.
    os.dup2(2, 1)
    sock = socket.socket(fileno=socket_fd)
    os.set_inheritable(sock.fileno(), False)
    if not _import_all(preload + modules):
        return EXIT_IMPORT_FAILED
    gc.collect()
    gc.freeze()
    fork_safe = native_thread_count() == 1
    _send(
        sock,
        {
            "op": "ready",
            "pid": os.getpid(),
            "fork_safe": fork_safe,
            "threads": [] if fork_safe else thread_names(),
            "preloaded": preload + modules,
        },
    )
    if not fork_safe:
        return EXIT_OK
    try:
        return _serve(sock)
    except (BrokenPipeError, ConnectionResetError):
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
