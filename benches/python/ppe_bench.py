"""The ProcessPoolExecutor side of benches/compare.rs.

Reads one JSON request per line on stdin and answers each with one JSON line on stdout,
so the Rust bench can alternate its rounds with snakepool's. Executors are created on
first use (one per worker count, default start method: fork on Linux), warmed up, and
kept for later rounds, as snakepool's pools are.

Requests:
    {"op": "serial", "workers": W, "task": T, "calls": N}
        N times ``executor.submit(task).result()``, one at a time; answers
        {"samples_us": [...], "p50_us": ..., "p99_us": ...}.
    {"op": "throughput", "workers": W, "task": T, "tasks": N, "concurrency": C,
     "mode": M}
        N tasks in one of three ways; answers {"per_s": ..., "seconds": ...}:
        "window"  one thread submits, never more than C tasks in flight (a slot is
                  freed by a done-callback): the closed loop of C callers;
        "threads" C threads, each submitting one task and waiting for its result;
        "burst"   all N submitted at once, then waited for.
Tasks: "add" (``add(i, 1)``) and "ping" (``ping()``, a small dict like snakepool's).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Tuple


def add(a: int, b: int) -> int:
    """The tiny task: the sum of two numbers."""
    return a + b


def ping() -> Dict[str, Any]:
    """A reply shaped like snakepool's built-in ``ping``."""
    return {"status": "ok", "pid": os.getpid()}


Task = Tuple[Callable[..., Any], Callable[[int], tuple], Callable[[int], Any]]
TASKS: Dict[str, Task] = {
    "add": (add, lambda i: (i, 1), lambda i: i + 1),
    "ping": (ping, lambda i: (), lambda i: None),
}
EXECUTORS: Dict[int, cf.ProcessPoolExecutor] = {}


def executor(workers: int) -> cf.ProcessPoolExecutor:
    """The executor with ``workers`` processes, started and warmed up on first use."""
    ex = EXECUTORS.get(workers)
    if ex is None:
        ex = cf.ProcessPoolExecutor(max_workers=workers)
        n = 200 * workers
        list(ex.map(add, range(n), range(n), chunksize=1))
        EXECUTORS[workers] = ex
    return ex


def check(task: str, i: int, value: Any) -> None:
    """Fails loudly if a task answered wrongly."""
    want = TASKS[task][2](i)
    if want is not None and value != want:
        raise AssertionError(f"{task}({i}) returned {value!r}, expected {want!r}")


def percentile(samples: List[float], q: float) -> float:
    """The q-quantile of ``samples`` (sorted in place)."""
    samples.sort()
    return samples[min(len(samples) - 1, round((len(samples) - 1) * q))]


def serial(ex: cf.ProcessPoolExecutor, task: str, calls: int) -> Dict[str, float]:
    """Submit one task, wait for its result, repeat; per-call latency."""
    fn, args, _ = TASKS[task]
    samples = []
    for i in range(calls):
        started = time.perf_counter()
        value = ex.submit(fn, *args(i)).result()
        samples.append((time.perf_counter() - started) * 1e6)
        check(task, i, value)
    in_order = list(samples)
    return {
        "samples_us": in_order,
        "p50_us": percentile(samples, 0.5),
        "p99_us": percentile(samples, 0.99),
    }


def window(ex: cf.ProcessPoolExecutor, task: str, tasks: int, concurrency: int) -> None:
    """Keep ``concurrency`` tasks in flight from one submitting thread."""
    fn, args, _ = TASKS[task]
    slots = threading.Semaphore(concurrency)
    done = threading.Event()
    left = [tasks]
    lock = threading.Lock()
    errors: List[BaseException] = []

    def finished(i: int, future: cf.Future) -> None:
        try:
            check(task, i, future.result())
        except BaseException as exc:  # reported after the run
            errors.append(exc)
        slots.release()
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    for i in range(tasks):
        slots.acquire()
        ex.submit(fn, *args(i)).add_done_callback(lambda f, i=i: finished(i, f))
    done.wait()
    if errors:
        raise errors[0]


def threads(ex: cf.ProcessPoolExecutor, task: str, tasks: int, concurrency: int) -> None:
    """``concurrency`` threads, each submitting one task and waiting for it in turn."""
    fn, args, _ = TASKS[task]
    share = [tasks // concurrency + (k < tasks % concurrency) for k in range(concurrency)]

    def caller(k: int) -> None:
        for j in range(share[k]):
            i = k * tasks + j
            check(task, i, ex.submit(fn, *args(i)).result())

    pool = [threading.Thread(target=caller, args=(k,)) for k in range(concurrency)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def burst(ex: cf.ProcessPoolExecutor, task: str, tasks: int, concurrency: int) -> None:
    """Submit every task at once, then wait for all of them."""
    fn, args, _ = TASKS[task]
    futures = [ex.submit(fn, *args(i)) for i in range(tasks)]
    for i, future in enumerate(futures):
        check(task, i, future.result())


MODES = {"window": window, "threads": threads, "burst": burst}


def answer(request: Dict[str, Any]) -> Dict[str, Any]:
    """Runs one request."""
    ex = executor(request["workers"])
    if request["op"] == "serial":
        return serial(ex, request["task"], request["calls"])
    run = MODES[request["mode"]]
    started = time.perf_counter()
    run(ex, request["task"], request["tasks"], request["concurrency"])
    seconds = time.perf_counter() - started
    return {"per_s": request["tasks"] / seconds, "seconds": seconds}


def main() -> None:
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(answer(json.loads(line))), flush=True)
    for ex in EXECUTORS.values():
        ex.shutdown()


if __name__ == "__main__":
    main()
