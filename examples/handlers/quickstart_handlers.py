"""Commands for the quickstart example: plain work and per-session state."""

from __future__ import annotations

import os
from typing import Any

from snakepool_worker import command


@command("word_count")
def word_count(args: dict, ctx: Any) -> dict:
    """Count the words of args.text."""
    words = args["text"].split()
    return {"words": len(words), "pid": os.getpid()}


@command("remember", mutates_session=True)
def remember(args: dict, ctx: Any) -> int:
    """Add args.fact to the session's notes; returns how many it holds."""
    notes = ctx.session.setdefault("notes", [])
    notes.append(args["fact"])
    return len(notes)


@command("recall")
def recall(args: dict, ctx: Any) -> dict:
    """The session's notes and the pid of the worker holding them."""
    return {"notes": ctx.session.get("notes", []), "pid": os.getpid()}
