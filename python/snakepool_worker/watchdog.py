"""Dying with the host, and taking along whatever a handler started.

The host's pid comes from ``SNAKEPOOL_HOST_PID``. A fresh worker gets SIGTERM from the
kernel when the host dies (parent-death signal); a worker forked by the zygote has the
zygote as parent, so a thread watches the host's pid instead. Either way the processes a
handler started in the worker's process group are killed with the worker.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from typing import Optional


def _hosted_group_leader() -> bool:
    """Whether this process leads its own process group and was started by a host."""
    return bool(os.environ.get("SNAKEPOOL_HOST_PID")) and os.getpgrp() == os.getpid()


def kill_group_members() -> int:
    """SIGKILL the other processes of this worker's own process group; return how many.

    Does nothing unless the worker was started by a host and leads its own group, so a
    worker run by hand from a shell never touches the shell's group.
    """
    if not _hosted_group_leader():
        return 0
    me = os.getpid()
    group = os.getpgrp()
    killed = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == group:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def _kill_own_group() -> None:
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(1)


def _watch(pidfd: int) -> None:
    while True:
        try:
            ready, _, _ = select.select([pidfd], [], [])
        except InterruptedError:
            continue
        if ready:
            _kill_own_group()


def _terminate(signum: int, frame: object) -> None:
    kill_group_members()
    os._exit(128 + signum)


def install_termination_handler() -> None:
    """On SIGTERM (the host's stop, or its death through the parent-death signal), take
    the processes a handler left in the worker's group along, then exit."""
    if _hosted_group_leader():
        signal.signal(signal.SIGTERM, _terminate)


def start_host_watchdog(host_pid: Optional[int] = None) -> bool:
    """Start the watchdog thread; return whether it runs.

    Without a host pid (or without pidfd support) nothing happens. If the host is
    already gone, the process group is killed at once.
    """
    if host_pid is None:
        value = os.environ.get("SNAKEPOOL_HOST_PID", "").strip()
        if not value.isdigit():
            return False
        host_pid = int(value)
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return False
    try:
        pidfd = pidfd_open(host_pid)
    except ProcessLookupError:
        _kill_own_group()
    except OSError:
        return False
    thread = threading.Thread(
        target=_watch, args=(pidfd,), name="snakepool-host-watchdog", daemon=True
    )
    thread.start()
    return True
