"""Commands for benches/compare.rs: the same tiny task the ProcessPoolExecutor runs."""

from __future__ import annotations

from typing import Any

from snakepool_worker import command


@command("add")
def add(args: dict, ctx: Any) -> int:
    """args.a + args.b, like ``ppe_bench.add``."""
    return args["a"] + args["b"]
