"""Serial ``ping`` round trips to ``python -m snakepool_worker`` over pipes, two runtimes.

Compares the worker runtime of two package roots (directories holding a
``snakepool_worker`` package) on the same machine in one run: each variant's worker is
started once, both workers and this driver are pinned to one CPU, and the rounds
alternate between the variants so drift (frequency, other load) hits both alike.

Usage::

    python benches/python/worker_ping.py --baseline /tmp/old/python [--candidate python]
        [--pings 20000] [--rounds 5] [--cpu 0] [--json]

Per variant it reports the median and p99 wall time of one round trip (µs, seen from
this driver), and the worker's CPU time per ping: from ``/proc/PID/stat`` (utime +
stime, in clock ticks, so coarse over short runs) and from ``/proc/PID/schedstat``
(nanoseconds on the CPU). The driver speaks the frame protocol by hand (4-byte
big-endian length + JSON), so it measures the worker, not a client library.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HEADER = struct.Struct(">I")
REPO_PYTHON = Path(__file__).resolve().parents[2] / "python"
CLOCK_TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


class Worker:
    """One worker process on two pipes, pinned to ``cpu``."""

    def __init__(self, label: str, root: Path, python: str, cpu: int) -> None:
        self.label = label
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEPOOL_")}
        env["PYTHONPATH"] = str(root)
        env["SNAKEPOOL_DEFAULT_MODULES"] = "0"
        self.proc = subprocess.Popen(
            [python, "-m", "snakepool_worker", "--worker-id", f"bench-{label}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        os.sched_setaffinity(self.proc.pid, {cpu})
        self.w = self.proc.stdin.fileno()
        self.r = self.proc.stdout.fileno()
        self.next_id = 0
        hello = self.round_trip({"initialization": True, "worker_id": f"bench-{label}"})
        manifest = hello["result"]["manifest"]
        self.runtime_file = manifest.get("python_executable"), manifest.get("runtime_version")

    def _frame(self, args: Dict[str, Any]) -> bytes:
        payload = json.dumps({"id": self.next_id, "command": "ping", "args": args}).encode()
        self.next_id += 1
        return HEADER.pack(len(payload)) + payload

    def _read_reply(self) -> bytes:
        data = os.read(self.r, 65536)
        while len(data) < 4 or len(data) < 4 + HEADER.unpack_from(data)[0]:
            more = os.read(self.r, 65536)
            if not more:
                raise EOFError(f"worker {self.label} closed its output")
            data += more
        return data[4:]

    def round_trip(self, args: Dict[str, Any]) -> Dict[str, Any]:
        os.write(self.w, self._frame(args))
        reply: Dict[str, Any] = json.loads(self._read_reply())
        assert reply.get("success") is True, reply
        return reply

    def pings(self, count: int) -> List[int]:
        """``count`` serial pings; the wall time of each, in ns."""
        frames = [self._frame({}) for _ in range(count)]
        write, read, r, w = os.write, os.read, self.r, self.w
        clock = time.perf_counter_ns
        samples = [0] * count
        for i, frame in enumerate(frames):
            start = clock()
            write(w, frame)
            data = read(r, 65536)
            while len(data) < 4 or len(data) < 4 + HEADER.unpack_from(data)[0]:
                data += read(r, 65536)
            samples[i] = clock() - start
        return samples

    def cpu(self) -> tuple[int, int]:
        """``(utime + stime in ticks, ns on the CPU)`` of the worker so far."""
        with open(f"/proc/{self.proc.pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        with open(f"/proc/{self.proc.pid}/schedstat", "rb") as sched:
            on_cpu = int(sched.read().split()[0])
        return ticks, on_cpu

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


def percentile(sorted_values: List[int], fraction: float) -> float:
    index = min(len(sorted_values) - 1, int(round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index] / 1000.0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, metavar="ROOT")
    parser.add_argument("--candidate", type=Path, default=REPO_PYTHON, metavar="ROOT")
    parser.add_argument("--pings", type=int, default=20_000, help="pings per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per variant")
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    options = parser.parse_args(argv)

    os.sched_setaffinity(0, {options.cpu})
    workers = [
        Worker("baseline", options.baseline.resolve(), options.python, options.cpu),
        Worker("candidate", options.candidate.resolve(), options.python, options.cpu),
    ]
    samples: Dict[str, List[int]] = {w.label: [] for w in workers}
    ticks: Dict[str, int] = {w.label: 0 for w in workers}
    on_cpu: Dict[str, int] = {w.label: 0 for w in workers}
    medians: Dict[str, List[float]] = {w.label: [] for w in workers}
    try:
        for worker in workers:
            worker.pings(options.warmup)
        for round_index in range(options.rounds):
            order = workers if round_index % 2 == 0 else workers[::-1]
            for worker in order:
                ticks0, cpu0 = worker.cpu()
                round_samples = worker.pings(options.pings)
                ticks1, cpu1 = worker.cpu()
                ticks[worker.label] += ticks1 - ticks0
                on_cpu[worker.label] += cpu1 - cpu0
                samples[worker.label] += round_samples
                medians[worker.label].append(statistics.median(round_samples) / 1000.0)
    finally:
        for worker in workers:
            worker.close()

    total = options.pings * options.rounds
    report: Dict[str, Any] = {
        "pings_per_variant": total,
        "rounds": options.rounds,
        "cpu": options.cpu,
        "python": options.python,
        "variants": {},
    }
    for worker in workers:
        ordered = sorted(samples[worker.label])
        report["variants"][worker.label] = {
            "median_us": percentile(ordered, 0.5),
            "p99_us": percentile(ordered, 0.99),
            "round_medians_us": [round(m, 2) for m in medians[worker.label]],
            "cpu_us_per_ping_stat": ticks[worker.label] * CLOCK_TICK_US / total,
            "cpu_us_per_ping_schedstat": on_cpu[worker.label] / 1000.0 / total,
        }
    if options.json:
        print(json.dumps(report, indent=2))
        return 0
    base = report["variants"]["baseline"]
    print(
        f"{total} serial pings per variant in {options.rounds} alternating rounds, "
        f"driver and workers pinned to CPU {options.cpu}"
    )
    print(f"{'':10} {'median µs':>10} {'p99 µs':>8} {'CPU µs/ping':>12} {'(schedstat)':>12}")
    for label, figures in report["variants"].items():
        print(
            f"{label:10} {figures['median_us']:10.2f} {figures['p99_us']:8.2f} "
            f"{figures['cpu_us_per_ping_stat']:12.2f} {figures['cpu_us_per_ping_schedstat']:12.2f}"
        )
    cand = report["variants"]["candidate"]
    print(
        "candidate / baseline: median {:.3f}, p99 {:.3f}, CPU {:.3f} (stat), "
        "{:.3f} (schedstat)".format(
            cand["median_us"] / base["median_us"],
            cand["p99_us"] / base["p99_us"],
            cand["cpu_us_per_ping_stat"] / max(base["cpu_us_per_ping_stat"], 1e-9),
            cand["cpu_us_per_ping_schedstat"] / base["cpu_us_per_ping_schedstat"],
        )
    )
    print("round medians µs:", {k: v["round_medians_us"] for k, v in report["variants"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
