"""Command handlers imported by the test workers (``--module handlers_for_tests``)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any, Dict, List

from snakepool_worker import Context, command, on_session_cleanup

CLEANUPS: List[Dict[str, Any]] = []
"""Every cleanup hook call seen by this worker, in order."""


@command("echo")
def echo(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Return the arguments unchanged.

    Longer description that must not appear in the manifest.
    """
    return args


@command()
def add(args: Dict[str, Any], ctx: Context) -> Any:
    """Add args.a and args.b."""
    return args["a"] + args["b"]


@command
def fail(args: Dict[str, Any], ctx: Context) -> Any:
    raise ValueError(args.get("message", "boom"))


@command("set_value", mutates_session=True)
def set_value(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Store args.value under args.key in the session."""
    ctx.session[args["key"]] = args["value"]
    return {"session_id": ctx.session_id, "size": len(ctx.session)}


@command("journaled_set", mutates_session=True)
def journaled_set(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Store args.value under args.key; the host journals it as set_value."""
    ctx.session[args["key"]] = args["value"]
    ctx.journal_as("set_value", {"key": args["key"], "value": args["value"]})
    return {"session_id": ctx.session_id, "size": len(ctx.session)}


@command("imported")
def imported(args: Dict[str, Any], ctx: Context) -> Dict[str, bool]:
    """Whether each of args.names has been imported in this worker."""
    return {name: name in sys.modules for name in args["names"]}


@command("get_value")
def get_value(args: Dict[str, Any], ctx: Context) -> Any:
    """Read args.key from the session (null when absent)."""
    return ctx.session.get(args["key"])


@command("context")
def context(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Describe the call context."""
    return {
        "worker_id": ctx.worker_id,
        "session_id": ctx.session_id,
        "request_id": ctx.request_id,
        "command": ctx.command,
        "logger": ctx.log.name,
        "session": dict(ctx.session),
    }


@command("print_stdout")
def print_stdout(args: Dict[str, Any], ctx: Context) -> str:
    """Write to stdout three ways: print(), a raw fd-1 write and a child process."""
    print(args["text"])
    os.write(1, (args["text"] + " via fd 1\n").encode())
    subprocess.run([sys.executable, "-c", f"print({args['text'] + ' via child'!r})"], check=True)
    return "printed"


@command("spam_stderr")
def spam_stderr(args: Dict[str, Any], ctx: Context) -> int:
    """Write args.size bytes to stderr."""
    size = int(args["size"])
    line = "e" * 99 + "\n"
    sys.stderr.write(line * (size // 100) + "END-OF-SPAM\n")
    sys.stderr.flush()
    return size


@command("non_serialisable")
def non_serialisable(args: Dict[str, Any], ctx: Context) -> Any:
    return {"value": object()}


@command("huge")
def huge(args: Dict[str, Any], ctx: Context) -> str:
    """Return a string of args.size characters."""
    return "x" * int(args["size"])


@command("exit_now")
def exit_now(args: Dict[str, Any], ctx: Context) -> None:
    """End the process at once, as a crash would: nothing buffered is flushed."""
    os._exit(int(args.get("code", 70)))


@command("log_message")
def log_message(args: Dict[str, Any], ctx: Context) -> None:
    ctx.log.warning("handler says %s", args["text"])


_NEVER = threading.Event()


@command("start_blocking_thread")
def start_blocking_thread(args: Dict[str, Any], ctx: Context) -> str:
    """Start a non-daemon thread that never finishes."""
    thread = threading.Thread(target=_NEVER.wait, name="never-ending", daemon=False)
    thread.start()
    return thread.name


@command("cleanups")
def cleanups(args: Dict[str, Any], ctx: Context) -> List[Dict[str, Any]]:
    """Cleanup hook calls seen so far."""
    return CLEANUPS


@on_session_cleanup
def record_cleanup(session_id: str, session: Dict[str, Any]) -> None:
    CLEANUPS.append({"session_id": session_id, "keys": sorted(session)})


@on_session_cleanup
def failing_cleanup(session_id: str, session: Dict[str, Any]) -> None:
    raise RuntimeError(f"cleanup hook failure for {session_id}")
