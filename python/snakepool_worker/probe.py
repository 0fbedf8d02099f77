"""Commands for checking a pool from outside (``--module snakepool_worker.probe``).

``probe_echo`` answers with exactly the arguments it got, so a load generator can prove
that every reply belongs to its own request; ``probe_echo_async`` does the same as a
concurrent command, holding its call open a while so that many overlap on a worker.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Dict

from .registry import Context, command


@command("probe_echo")
def probe_echo(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Return the arguments unchanged, with the worker's pid."""
    return {"echo": args, "pid": os.getpid()}


@command("probe_echo_async")
async def probe_echo_async(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Wait args.hold_ms (if given) on the event loop, then return the arguments unchanged."""
    hold_ms = args.get("hold_ms", 0)
    if hold_ms:
        await asyncio.sleep(float(hold_ms) / 1000)
    return {"echo": args, "pid": os.getpid()}
