"""Dying with the host: a thread that kills the worker's process group when the host exits.

The host's pid comes from ``SNAKEPOOL_HOST_PID``. A parent-death signal only covers the
worker itself, and only when the host is its parent; this watchdog also covers workers
forked by the zygote (whose parent is the zygote) and any processes a handler started in
the worker's process group.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from typing import Optional


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
