"""The direct side of the DSPy comparison in benches/compare.rs.

The same program as the bench runs through snakepool (ChainOfThought
``question -> answer: int`` with a DummyLM), called in this process under the same
per-call ``dspy.context`` the worker uses. Prints {"ready": true} after 200 warm-up
calls, then reads a call count per stdin line, makes that many calls and answers
{"samples_us": [...], "p50_us": ..., "p99_us": ...}.
"""

from __future__ import annotations

import json
import sys
import time

import dspy
from dspy.utils.dummies import DummyLM

QUESTION = "What is 2 plus 3?"


def main() -> None:
    lm = DummyLM({QUESTION: {"reasoning": "2 + 3 = 5", "answer": "5"}})
    program = dspy.ChainOfThought("question -> answer: int")

    def once() -> None:
        with dspy.context(lm=lm, track_usage=True, disable_history=True):
            prediction = program(question=QUESTION)
        assert prediction.answer == 5, prediction

    for _ in range(200):
        once()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        samples = []
        for _ in range(int(line)):
            started = time.perf_counter()
            once()
            samples.append((time.perf_counter() - started) * 1e6)
        ordered = sorted(samples)
        p50 = ordered[len(ordered) // 2]
        p99 = ordered[min(len(ordered) - 1, round((len(ordered) - 1) * 0.99))]
        reply = {"samples_us": samples, "p50_us": p50, "p99_us": p99}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
