"""What ``execute_program`` costs on the worker side, against the same call in-process.

One process, two paths, rounds alternating between them (with a third, ``ping``, for
scale):

- *direct*: the program of ``dspy_direct.py`` (ChainOfThought ``question -> answer:
  int`` with a DummyLM scripted by prompt) called under the same per-call
  ``dspy.context`` that script uses;
- *bridge*: the same program created in a session of a worker runtime with the DSPy
  commands, called with ``execute_program`` request frames.

The worker runtime is served as a worker serves it: its frame loop (``FrameServer``)
runs on the main thread, on two pipes. A second thread plays the host: it writes each
request frame and blocks reading the reply (with the worker's JSON codec), timing each
round trip. The direct calls run on the main thread too, inside a bench command of the
runtime that times each call itself, so both paths run their DSPy code on the same
thread. The bridge's figures therefore hold the worker's whole path (frame loop,
dispatch, JSON, the DSPy bridge) plus the two pipe hops and thread switches of a round
trip, which a host pays too. The process is pinned to one CPU (``--cpu``), as
``cargo bench --bench compare`` pins its section 3.

Reported per path: median wall time and CPU time (``time.process_time``, every thread)
per call, the CPU time of the main thread alone per call (the worker's share: the mean
of each round, their median), and the same for a ``ping`` round trip: the floor of any
call through the frame loop. Then
a cProfile of each path on the main thread over the same number of calls, the functions
whose own time per call grew most from direct to bridge, and the cumulative time per
call of the worker's own functions on the bridge path.

Usage::

    .venv/bin/python benches/python/dspy_bridge_overhead.py [--calls 500] [--rounds 10]
        [--warmup 300] [--cpu 0] [--profile-calls 2000] [--top 30] [--root DIR] [--json]

``--root`` imports ``snakepool_worker`` from another package root (a directory holding
it), to compare two versions of the worker.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

QUESTION = "What is 2 plus 3?"
ANSWERS = {QUESTION: {"reasoning": "2 + 3 = 5", "answer": "5"}}
SIGNATURE = "question -> answer: int"
SESSION = "bench"
HEADER = struct.Struct(">I")
REPO_PYTHON = Path(__file__).resolve().parents[2] / "python"
POLL_WAIT = ("~", 0, "<method 'poll' of 'select.epoll' objects>")
"""The frame loop's wait for the next request: idle time, not cost."""

Sample = Tuple[float, float]
"""One call's ``(wall µs, CPU µs)``."""

Times = Dict[Tuple[str, int, str], Tuple[float, float]]
"""``(own µs, cumulative µs)`` per call, by cProfile's function key."""


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per path per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=300, help="calls per path first")
    parser.add_argument("--cpu", type=int, default=0, help="CPU to pin to (-1: none)")
    parser.add_argument("--profile-calls", type=int, default=2000)
    parser.add_argument("--top", type=int, default=30, help="rows of the profile tables")
    parser.add_argument("--root", type=Path, default=REPO_PYTHON, help="package root")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser.parse_args()


def direct_call() -> Callable[[], None]:
    """One call of the program as ``dspy_direct.py`` makes it."""
    import dspy
    from dspy.utils.dummies import DummyLM

    lm = DummyLM(ANSWERS)
    program = dspy.ChainOfThought(SIGNATURE)

    def once() -> None:
        with dspy.context(lm=lm, track_usage=True, disable_history=True):
            prediction = program(question=QUESTION)
        assert prediction.answer == 5, prediction

    return once


def timed(once: Callable[[], None], count: int) -> List[Sample]:
    """``count`` calls of ``once``: wall and process CPU µs of each."""
    samples = []
    wall = time.perf_counter
    cpu = time.process_time
    for _ in range(count):
        wall_start, cpu_start = wall(), cpu()
        once()
        samples.append(((wall() - wall_start) * 1e6, (cpu() - cpu_start) * 1e6))
    return samples


class Worker:
    """A worker runtime with the DSPy commands and two bench commands, on two pipes.

    ``bench_direct {count, timed}`` makes ``count`` direct calls (timed: their samples
    are the result) and ``bench_profile {on}`` starts or stops ``profiler``, both on the
    thread serving the frames.
    """

    def __init__(self) -> None:
        from snakepool_worker.builtins import register_builtins
        from snakepool_worker.dspy import register_commands
        from snakepool_worker.loop import FrameServer
        from snakepool_worker.registry import Registry
        from snakepool_worker.runtime import Runtime

        registry = Registry()
        register_builtins(registry)
        register_commands(registry)
        registry.register("bench_direct", self._direct)
        registry.register("bench_profile", self._profile)
        self.profiler = cProfile.Profile()
        self._once = direct_call()
        request_in, self.requests = os.pipe()
        self.replies, reply_out = os.pipe()
        self._own_fds = (request_in, reply_out)
        self._server = FrameServer(Runtime(registry, worker_id="bench"), request_in, reply_out)

    def _direct(self, args: Dict[str, Any], ctx: Any) -> List[Sample]:
        if args["timed"]:
            return timed(self._once, args["count"])
        for _ in range(args["count"]):
            self._once()
        return []

    def _profile(self, args: Dict[str, Any], ctx: Any) -> None:
        if args["on"]:
            self.profiler.enable()
        else:
            self.profiler.disable()

    def serve(self) -> None:
        """Serve frames on this thread until the host closes its end of the requests."""
        try:
            self._server.run()
        finally:
            for fd in self._own_fds:
                os.close(fd)


class Host:
    """The host's end of the pipes: one request at a time, each reply awaited."""

    def __init__(self, worker: Worker) -> None:
        from snakepool_worker.protocol import dumps, loads

        self._dumps = dumps
        self._loads = loads
        self._requests = worker.requests
        self._replies = worker.replies
        self._next_id = 0

    def call(self, command: str, args: Dict[str, Any]) -> Any:
        """Send one request and return its result (raise on a failure reply)."""
        self._next_id += 1
        payload = self._dumps({"id": self._next_id, "command": command, "args": args})
        os.write(self._requests, HEADER.pack(len(payload)) + payload)
        reply = self._loads(self._read(HEADER.unpack(self._read(4))[0]))
        if not reply.get("success"):
            raise RuntimeError(f"{command} failed: {reply.get('error')}")
        return reply["result"]

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            piece = os.read(self._replies, size - len(data))
            if not piece:
                raise EOFError("the frame loop closed its output")
            data += piece
        return data

    def program_call(self) -> Callable[[], None]:
        """One ``execute_program`` of a new chain of thought in the bench session."""
        session = {"session_id": SESSION}
        self.call("configure_lm", {"provider": "dummy", "answers": ANSWERS, **session})
        created = self.call(
            "create_program", {"signature": SIGNATURE, "type": "chain_of_thought", **session}
        )
        args = {"program_id": created["program_id"], "inputs": {"question": QUESTION}, **session}

        def once() -> None:
            result = self.call("execute_program", args)
            assert result["outputs"]["answer"] == 5, result

        return once

    def direct(self, count: int) -> List[Sample]:
        """``count`` direct calls, timed on the worker's thread."""
        samples = self.call("bench_direct", {"count": count, "timed": True})
        return [(wall, cpu) for wall, cpu in samples]

    def close(self) -> None:
        """End of input: the frame loop stops."""
        os.close(self._requests)
        os.close(self._replies)


def median(values: List[float]) -> float:
    """The median of ``values`` (NaN for none)."""
    return statistics.median(values) if values else float("nan")


def main_thread_cpu() -> float:
    """Seconds of CPU the main thread (the frame loop's) has used."""
    ident = threading.main_thread().ident
    assert ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def measure(host: Host, bridged: Callable[[], None], args: argparse.Namespace) -> Dict[str, Any]:
    """Alternating rounds of both paths, and of pings (the floor of any call through the
    frame loop); medians per call."""
    host.direct(args.warmup)
    timed(bridged, args.warmup)
    paths: List[Tuple[str, Callable[[], List[Sample]]]] = [
        ("direct", lambda: host.direct(args.calls)),
        ("bridge", lambda: timed(bridged, args.calls)),
        ("ping", lambda: timed(lambda: host.call("ping", {}), args.calls)),
    ]
    samples: Dict[str, List[Sample]] = {name: [] for name, _ in paths}
    rounds: Dict[str, List[float]] = {name: [] for name, _ in paths}
    worker_cpu: Dict[str, List[float]] = {name: [] for name, _ in paths}
    for number in range(args.rounds):
        for name, run in paths if number % 2 == 0 else paths[::-1]:
            before = main_thread_cpu()
            got = run()
            worker_cpu[name].append((main_thread_cpu() - before) * 1e6 / args.calls)
            samples[name] += got
            rounds[name].append(median([wall for wall, _ in got]))
    figures: Dict[str, Any] = {}
    for name, got in samples.items():
        figures[name] = {
            "wall_us": median([wall for wall, _ in got]),
            "cpu_us": median([cpu for _, cpu in got]),
            "worker_thread_cpu_us": median(worker_cpu[name]),
            "wall_us_per_round": [round(value, 1) for value in rounds[name]],
        }
    figures["difference"] = {
        key: figures["bridge"][key] - figures["direct"][key]
        for key in ("wall_us", "cpu_us", "worker_thread_cpu_us")
    }
    return figures


def per_call(profiler: cProfile.Profile, calls: int) -> Times:
    """The profiler's own and cumulative µs per call, by function; it is reset after."""
    table = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    times = {key: (row[2] * 1e6 / calls, row[3] * 1e6 / calls) for key, row in table.items()}
    times.pop(POLL_WAIT, None)
    profiler.clear()
    return times


def profile(
    host: Host, bridged: Callable[[], None], profiler: cProfile.Profile, calls: int
) -> Tuple[Times, Times]:
    """Per-call profiles of both paths on the worker's thread."""
    host.call("bench_profile", {"on": True})
    host.call("bench_direct", {"count": calls, "timed": False})
    host.call("bench_profile", {"on": False})
    direct_times = per_call(profiler, calls)
    host.call("bench_profile", {"on": True})
    for _ in range(calls):
        bridged()
    host.call("bench_profile", {"on": False})
    return direct_times, per_call(profiler, calls)


def label(key: Tuple[str, int, str]) -> str:
    """A profiled function's name with the tail of its file's path."""
    filename, line, name = key
    if filename == "~":
        return name
    parts = Path(filename).parts
    for anchor in ("site-packages", "python"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor) :]
            break
    return f"{'/'.join(parts[-3:])}:{line}({name})"


def profile_report(direct_times: Times, bridge_times: Times, top: int) -> List[str]:
    """The functions whose own time grew most, and the worker's own functions."""
    total_direct = sum(own for own, _ in direct_times.values())
    total_bridge = sum(own for own, _ in bridge_times.values())
    lines = [
        f"profiled own time per call (cProfile, inflated): direct {total_direct:.0f} µs, "
        f"bridge {total_bridge:.0f} µs, difference {total_bridge - total_direct:+.0f} µs",
        f"\nown time per call, bridge minus direct (top {top}):",
        f"{'delta µs':>9} {'direct':>8} {'bridge':>8}  function",
    ]
    deltas = []
    for key in set(direct_times) | set(bridge_times):
        before = direct_times.get(key, (0.0, 0.0))[0]
        after = bridge_times.get(key, (0.0, 0.0))[0]
        deltas.append((after - before, before, after, key))
    deltas.sort(reverse=True)
    for delta, before, after, key in deltas[:top]:
        lines.append(f"{delta:+9.1f} {before:8.1f} {after:8.1f}  {label(key)}")
    ours = sorted(
        (cumulative, own, key)
        for key, (own, cumulative) in bridge_times.items()
        if "snakepool_worker" in key[0]
    )
    ours.reverse()
    lines.append("\nsnakepool_worker functions on the bridge path, cumulative µs per call:")
    lines.append(f"{'cumul.':>8} {'own':>7}  function")
    for cumulative, own, key in ours[:top]:
        lines.append(f"{cumulative:8.1f} {own:7.1f}  {label(key)}")
    return lines


def drive(worker: Worker, host: Host, args: argparse.Namespace, out: Dict[str, Any]) -> None:
    """The host's thread: set up the session, measure, profile, then end the worker."""
    try:
        host.call("ping", {"initialization": True, "worker_id": "bench"})
        bridged = host.program_call()
        out["figures"] = measure(host, bridged, args)
        out["profiles"] = profile(host, bridged, worker.profiler, args.profile_calls)
    finally:
        host.close()


def report(
    figures: Dict[str, Any], profiles: Tuple[Times, Times], args: argparse.Namespace
) -> None:
    """Print the figures and the profile tables."""
    from snakepool_worker.protocol import JSON_BACKEND

    print(f"snakepool_worker from {args.root}, JSON codec {JSON_BACKEND}, CPU {args.cpu}")
    print(f"{args.rounds} rounds x {args.calls} calls per path; medians per call:")
    for name in ("direct", "bridge", "difference", "ping"):
        row = figures[name]
        form = "+7.1f" if name == "difference" else "7.1f"
        print(
            f"  {name:10} wall {row['wall_us']:{form}} µs, CPU {row['cpu_us']:{form}} µs, "
            f"worker thread CPU {row['worker_thread_cpu_us']:{form}} µs"
        )
        if "wall_us_per_round" in row:
            print(f"             wall per round: {row['wall_us_per_round']}")
    print()
    print("\n".join(profile_report(*profiles, args.top)))


def main() -> None:
    """Serve the worker on this thread while the host's thread measures, then report."""
    args = parse_args()
    sys.path.insert(0, str(args.root.resolve()))
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    worker = Worker()
    host = Host(worker)
    out: Dict[str, Any] = {}
    host_thread = threading.Thread(target=drive, args=(worker, host, args, out), name="host")
    host_thread.start()
    worker.serve()
    host_thread.join()
    if "figures" not in out:
        raise SystemExit("the measurement failed (see above)")
    if args.json:
        print(json.dumps(out["figures"], indent=2))
        return
    report(out["figures"], out["profiles"], args)


if __name__ == "__main__":
    main()
