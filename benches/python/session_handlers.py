"""A session counter with a snapshot, for benches/session_lifetime.rs."""

from __future__ import annotations

from typing import Any, Dict

from snakepool_worker import command, session_restore, session_snapshot


@command("bump", mutates_session=True)
def bump(args: Dict[str, Any], ctx: Any) -> int:
    """Add 1 to the session's counter; returns it."""
    ctx.session["count"] = ctx.session.get("count", 0) + 1
    return ctx.session["count"]


@command("count")
def count(args: Dict[str, Any], ctx: Any) -> int:
    """The session's counter."""
    return ctx.session.get("count", 0)


@session_snapshot
def count_snapshot(session: Dict[str, Any]) -> Any:
    """The counter, or nothing."""
    return {"count": session["count"]} if "count" in session else None


@session_restore
def count_restore(session: Dict[str, Any], part: Any) -> None:
    """The counter from a snapshot."""
    session["count"] = int(part["count"])
