"""How much memory DSPy sessions leave in a worker after they are dropped.

Reproduces, in one Python process and without the Rust host, what a worker started with
``--preload dspy`` does for N sessions: each session gets ``configure_lm`` with a scripted
dummy LM and ``create_program`` with ``"question -> answer"``, sent as request frames to
the worker's ``Runtime`` (the same registry, command functions and session dicts); then
every session is dropped with ``Runtime.drop_session`` (what ``cleanup_session`` runs:
the cleanup hooks), followed by the worker's delayed ``gc.collect()`` and
``release_freed_memory()`` (``malloc_trim``).

With ``--snapshot`` each session is first snapshotted (``snapshot_session``), as the
pool's idle eviction does before ``cleanup_session`` on a compactable journal. Without
``--cold`` one session is created and dropped before the idle measurement, so that what
DSPy and pydantic build once per process is in the baseline.

Prints the RSS (VmRSS) when idle, with the sessions, and after dropping them (before and
after the collection), how many objects that collection found in reference cycles, and
the pymalloc arenas in use. With tracemalloc (the default; its bookkeeping adds to the
RSS) it also prints the Python heap at each step and the allocations held after the drop
that were not held when idle (a snapshot diff grouped by traceback): when the heap is
back to idle but the RSS or the arena count is not, the rest is fragmentation (arenas
kept by a few objects that outlived the sessions), not objects the sessions left.

Run from the repository root::

    .venv/bin/python benches/python/dspy_session_memory.py [--sessions 2000] [--snapshot]
        [--cold] [--no-tracemalloc] [--top 15] [--frames 8]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tracemalloc
from pathlib import Path
from typing import Any, Dict, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

import dspy  # noqa: E402,F401  (the worker's --preload dspy)

import snakepool_worker.dspy  # noqa: E402,F401  (registers the DSPy commands)
from snakepool_worker.registry import default_registry  # noqa: E402
from snakepool_worker.runtime import Runtime, release_freed_memory  # noqa: E402

LM_ARGS: Dict[str, Any] = {"provider": "dummy", "answers": [{"answer": "42"}]}
PROGRAM_ARGS: Dict[str, Any] = {"signature": "question -> answer"}


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pymalloc_arenas() -> Optional[int]:
    """pymalloc's arenas (1 MiB each) in use, from ``sys._debugmallocstats()`` (which
    writes to the C stderr, and reports nothing while tracemalloc runs)."""
    read_end, write_end = os.pipe()
    saved = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    with os.fdopen(read_end, "rb") as pipe:
        found = re.search(rb"# arenas allocated current\s*=\s*([\d,]+)", pipe.read())
    return int(found.group(1).replace(b",", b"")) if found else None


class Worker:
    """The worker's runtime, fed request frames in-process."""

    def __init__(self) -> None:
        self.runtime = Runtime(default_registry, worker_id="memory-bench")
        self.next_id = 0

    def call(self, command: str, session_id: str, args: Dict[str, Any]) -> Any:
        self.next_id += 1
        frame = {"id": self.next_id, "command": command, "args": {**args, "session_id": session_id}}
        reply = json.loads(self.runtime.handle_frame(json.dumps(frame).encode()))
        if not reply["success"]:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply["result"]


def settle() -> int:
    """The worker's collection after dropped sessions; returns the objects it found
    unreachable (held only by reference cycles)."""
    found = gc.collect()
    release_freed_memory()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=2000, help="sessions to create (2000)")
    parser.add_argument("--snapshot", action="store_true", help="snapshot each before the drop")
    parser.add_argument("--cold", action="store_true", help="no warm-up session before idle")
    parser.add_argument("--no-tracemalloc", action="store_true", help="RSS and arenas only")
    parser.add_argument("--top", type=int, default=15, help="retained allocations shown (15)")
    parser.add_argument("--frames", type=int, default=8, help="traceback depth kept (8)")
    options = parser.parse_args()
    tracing = not options.no_tracemalloc

    worker = Worker()
    if not options.cold:
        worker.call("configure_lm", "warm-up", LM_ARGS)
        worker.call("create_program", "warm-up", PROGRAM_ARGS)
        if options.snapshot:
            worker.call("snapshot_session", "warm-up", {})
        worker.runtime.drop_session("warm-up")
    if tracing:
        tracemalloc.start(options.frames)
    settle()
    heap = {}
    idle_snapshot = tracemalloc.take_snapshot() if tracing else None
    heap["idle"] = tracemalloc.get_traced_memory()[0] if tracing else 0
    arenas_idle = pymalloc_arenas()
    idle = rss_mib()

    # Session ids are made afresh for each call, as the worker reads them from each
    # request: a list of them kept here would outlive the sessions, amid their memory.
    for i in range(options.sessions):
        worker.call("configure_lm", f"session-{i}", LM_ARGS)
        worker.call("create_program", f"session-{i}", PROGRAM_ARGS)
    loaded = rss_mib()
    heap["with sessions"] = tracemalloc.get_traced_memory()[0] if tracing else 0

    for i in range(options.sessions):
        if options.snapshot:
            worker.call("snapshot_session", f"session-{i}", {})
        worker.runtime.drop_session(f"session-{i}")
    before_collection = rss_mib()
    cyclic = settle()
    dropped = rss_mib()
    heap["after dropping"] = tracemalloc.get_traced_memory()[0] if tracing else 0
    after_snapshot = tracemalloc.take_snapshot() if tracing else None
    arenas_after = pymalloc_arenas()

    print(
        f"{options.sessions} sessions; snapshot before the drop: {options.snapshot}; "
        f"warm-up: {not options.cold}; tracemalloc: {tracing}"
    )
    print(f"RSS idle:                             {idle:7.1f} MiB")
    print(f"RSS with the sessions:                {loaded:7.1f} MiB  ({loaded - idle:+.1f})")
    print(f"RSS after dropping, before collecting:{before_collection:7.1f} MiB")
    print(
        f"RSS after dropping and collecting:    {dropped:7.1f} MiB  ({dropped - idle:+.1f}, "
        f"{100 * (dropped - idle) / idle:+.1f}% over idle)"
    )
    print(f"objects the collection found in reference cycles: {cyclic}")
    if arenas_idle is not None:
        print(f"pymalloc arenas in use: {arenas_idle} idle, {arenas_after} after dropping")
    if idle_snapshot is None or after_snapshot is None:
        return
    grown = {name: (size - heap["idle"]) / 2**20 for name, size in heap.items() if name != "idle"}
    print("Python heap over idle (tracemalloc): " + ", ".join(
        f"{name} {size:+.2f} MiB" for name, size in grown.items()
    ))
    mine = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = after_snapshot.filter_traces(mine).compare_to(
        idle_snapshot.filter_traces(mine), "traceback"
    )
    stats = [stat for stat in stats if stat.size_diff > 0]
    total = sum(stat.size_diff for stat in stats) / 1024
    print(f"\nheld after the drop, not when idle: {total:.1f} KiB; top {options.top}:")
    for stat in stats[: options.top]:
        print(f"  {stat.size_diff / 1024:+8.1f} KiB  {stat.count_diff:+6d} blocks")
        for line in stat.traceback.format(most_recent_first=True)[:6]:
            print(f"      {line.strip()}")


if __name__ == "__main__":
    main()
