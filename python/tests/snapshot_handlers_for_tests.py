"""Commands whose session state has a snapshot (loaded by test_snapshots.py)."""

from __future__ import annotations

from typing import Any, Dict, List

from snakepool_worker import Context, command, session_restore, session_snapshot


@command("note", mutates_session=True)
def note(args: Dict[str, Any], ctx: Context) -> int:
    """Add args.text to the session's notes; returns how many it holds."""
    notes: List[str] = ctx.session.setdefault("notes", [])
    notes.append(args["text"])
    return len(notes)


@command("notes")
def notes(args: Dict[str, Any], ctx: Context) -> List[str]:
    """The session's notes."""
    return list(ctx.session.get("notes", []))


@session_snapshot
def notes_snapshot(session: Dict[str, Any]) -> Any:
    """The session's notes, or nothing."""
    return {"notes": session["notes"]} if "notes" in session else None


@session_restore
def notes_restore(session: Dict[str, Any], part: Any) -> None:
    """Notes from a snapshot."""
    session["notes"] = list(part["notes"])
