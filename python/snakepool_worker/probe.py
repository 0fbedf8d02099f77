"""Commands for checking a pool from outside (``--module snakepool_worker.probe``).

``probe_echo`` answers with exactly the arguments it got, so a load generator can prove
that every reply belongs to its own request.
"""

from __future__ import annotations

import os
from typing import Any, Dict

from .registry import Context, command


@command("probe_echo")
def probe_echo(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Return the arguments unchanged, with the worker's pid."""
    return {"echo": args, "pid": os.getpid()}
