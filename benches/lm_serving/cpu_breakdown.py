"""Where a worker's CPU goes: py-spy's raw samples of one worker, grouped by library.

Reads the collapsed stacks ``py-spy record --format raw`` writes (``frame;frame;... N``),
drops the samples of threads that only wait (the event loop in its selector, idle
executor threads), and credits each remaining sample to the innermost frame of its stack
that belongs to a known part: DSPy's LM client, the rest of DSPy, pydantic,
snakepool_worker, JSON, the asyncio event loop (with its socket I/O), the thread pool.
Prints one line per part, largest first, as a share of the busy samples.

Usage: cpu_breakdown.py SAMPLES
"""

from __future__ import annotations

import collections
import re
import sys
from typing import Counter, List, Tuple

IDLE_LEAVES = (
    "_worker (concurrent/futures/thread.py",
    "IdleSelector.select (snakepool_worker/loop.py",
)
"""Frames where a thread waits for work: not CPU."""

PARTS: List[Tuple[str, str]] = [
    ("dspy/_vendor/lm15", "DSPy's LM client (HTTP request and response, JSON)"),
    ("dspy/", "DSPy (adapter formatting and parsing, signatures, settings, callbacks)"),
    ("litellm/", "litellm"),
    ("pydantic", "pydantic"),
    ("snakepool_worker/", "snakepool_worker (frames, JSON, dispatch, the DSPy bridge)"),
    ("json/", "JSON (stdlib)"),
    ("orjson", "JSON (stdlib)"),
    ("asyncio/", "asyncio event loop and socket I/O"),
    ("selectors", "asyncio event loop and socket I/O"),
    ("concurrent/futures", "thread pool hand-offs"),
    ("threading", "thread pool hand-offs"),
]
OTHER = "other standard library (os.environ, urllib proxy lookup, contextlib ...)"


def part_of(frame: str) -> str:
    """The part a frame ``name (path:line)`` belongs to, or ``OTHER``."""
    match = re.search(r"\((.*)\)$", frame)
    path = match.group(1) if match else frame
    for key, name in PARTS:
        if key in path:
            return name
    return OTHER


def breakdown(path: str) -> Tuple[int, Counter[str]]:
    """Busy samples in all, and by part."""
    parts: Counter[str] = collections.Counter()
    busy = 0
    for line in open(path, encoding="utf-8"):
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if frames[-1].startswith(IDLE_LEAVES):
            continue
        known = (part_of(f) for f in reversed(frames))
        parts[next((p for p in known if p != OTHER), OTHER)] += int(count)
        busy += int(count)
    return busy, parts


def main() -> int:
    busy, parts = breakdown(sys.argv[1])
    print(f"{busy} busy samples")
    for name, count in parts.most_common():
        print(f"{100.0 * count / max(busy, 1):5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
