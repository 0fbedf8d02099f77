"""snakepool_worker: the Python side of snakepool.

A worker process imports command modules and serves their commands to the snakepool host
over length-prefixed JSON frames on stdin/stdout::

    from snakepool_worker import command

    @command("add")
    def add(args, ctx):
        return args["a"] + args["b"]

Run it with ``python -m snakepool_worker --module my_handlers``.
"""

__version__ = "0.1.0"

from .protocol import PROTOCOL_VERSION
from .registry import (
    Context,
    Final,
    command,
    on_session_cleanup,
    session_restore,
    session_snapshot,
)

__all__ = [
    "PROTOCOL_VERSION",
    "Context",
    "Final",
    "__version__",
    "command",
    "on_session_cleanup",
    "session_restore",
    "session_snapshot",
]
