"""Commands for the quickstart example: plain work, a stream and per-session state."""

from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator

from snakepool_worker import Final, command


@command("word_count")
def word_count(args: dict, ctx: Any) -> dict:
    """Count the words of args.text."""
    words = args["text"].split()
    return {"words": len(words), "pid": os.getpid()}


@command("count_words")
async def count_words(args: dict, ctx: Any) -> AsyncIterator[Any]:
    """Stream the words of args.text one by one, then their count."""
    words = args["text"].split()
    for word in words:
        await asyncio.sleep(0)
        yield {"word": word}
    yield Final({"words": len(words)})


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
