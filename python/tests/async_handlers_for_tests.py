"""Async, streaming and misbehaving handlers for ``--module async_handlers_for_tests``.

Calls prove they overlap by meeting at rendezvous points (``meet``), and are held or
released through gates (``gate`` / ``open_gate``), so no test depends on timing.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import Any, AsyncIterator, Dict, Iterator, List

from snakepool_worker import Context, Final, command

EVENTS: List[Dict[str, Any]] = []
"""What the handlers saw (started, cancelled, closed ...), in order."""

PRODUCED: Dict[str, int] = {}
"""Values each ``produce`` stream has yielded so far, by args.name."""

_ARRIVED: Dict[str, int] = {}
_MEETINGS: Dict[str, asyncio.Event] = {}
_GATES: Dict[str, asyncio.Event] = {}

CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("CURRENT", default="unset")


def _event(table: Dict[str, asyncio.Event], name: str) -> asyncio.Event:
    event = table.get(name)
    if event is None:
        event = table[name] = asyncio.Event()
    return event


@command("meet")
async def meet(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Wait until args.expect calls of rendezvous args.name are in flight at once."""
    name, expect = args["name"], args["expect"]
    _ARRIVED[name] = arrived = _ARRIVED.get(name, 0) + 1
    meeting = _event(_MEETINGS, name)
    if arrived >= expect:
        meeting.set()
    await asyncio.wait_for(meeting.wait(), args.get("timeout", 10))
    return {"arrived_as": arrived, "request_id": ctx.request_id}


@command("gate")
async def gate(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Wait until ``open_gate`` opens gate args.name (records started/cancelled)."""
    EVENTS.append({"event": "started", "id": ctx.request_id, "gate": args["name"]})
    try:
        await _event(_GATES, args["name"]).wait()
    except asyncio.CancelledError:
        EVENTS.append({"event": "cancelled", "id": ctx.request_id})
        if args.get("swallow"):
            return {"swallowed": True}
        raise
    return {"gate": args["name"], "id": ctx.request_id}


@command("open_gate")
def open_gate(args: Dict[str, Any], ctx: Context) -> str:
    """Open gate args.name (a sync handler; it runs on the loop thread)."""
    _event(_GATES, args["name"]).set()
    return args["name"]


@command("events")
def events(args: Dict[str, Any], ctx: Context) -> List[Dict[str, Any]]:
    """What the handlers recorded so far."""
    return EVENTS


@command("isolated")
async def isolated(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Set a context variable and the session, meet the others, report what is seen."""
    CURRENT.set(args["tag"])
    ctx.session["tag"] = args["tag"]
    await meet({"name": args["meeting"], "expect": args["expect"]}, ctx)
    return {"var": CURRENT.get(), "session": dict(ctx.session), "session_id": ctx.session_id}


@command("read_var")
def read_var(args: Dict[str, Any], ctx: Context) -> str:
    """The context variable as a sync handler sees it."""
    return CURRENT.get()


@command("async_add")
async def async_add(args: Dict[str, Any], ctx: Context) -> Any:
    """Add args.a and args.b after yielding to the loop once."""
    await asyncio.sleep(0)
    return args["a"] + args["b"]


@command("async_fail")
async def async_fail(args: Dict[str, Any], ctx: Context) -> Any:
    await asyncio.sleep(0)
    raise ValueError(args.get("message", "async boom"))


@command("async_journaled", mutates_session=True)
async def async_journaled(args: Dict[str, Any], ctx: Context) -> int:
    """Store args.value; the host journals it as a plain set."""
    await asyncio.sleep(0)
    ctx.session["value"] = args["value"]
    ctx.journal_as("async_add", {"a": args["value"], "b": 0})
    return len(ctx.session)


@command("block_loop")
async def block_loop(args: Dict[str, Any], ctx: Context) -> str:
    """Misbehave: block the event loop with time.sleep inside an async handler."""
    ctx.log.warning("blocking the loop for %s s", args["seconds"])
    time.sleep(args["seconds"])
    return "unblocked"


@command("returns_coroutine")
def returns_coroutine(args: Dict[str, Any], ctx: Context) -> Any:
    """A plain function that returns a coroutine: declared wrongly."""
    return async_add({"a": 1, "b": 2}, ctx)


@command("count")
def count(args: Dict[str, Any], ctx: Context) -> Iterator[Any]:
    """Yield 0..args.n-1, then return a summary."""
    for i in range(args["n"]):
        yield i
    return {"total": args["n"]}


@command("count_plain")
def count_plain(args: Dict[str, Any], ctx: Context) -> Iterator[int]:
    """Yield 0..args.n-1 and return nothing."""
    yield from range(args["n"])


@command("async_count")
async def async_count(args: Dict[str, Any], ctx: Context) -> AsyncIterator[Any]:
    """Yield 0..args.n-1, awaiting between values; gate args.gate (if given) first."""
    if args.get("gate"):
        await _event(_GATES, args["gate"]).wait()
    for i in range(args["n"]):
        await asyncio.sleep(0)
        yield {"i": i, "id": ctx.request_id}
    if args.get("final"):
        yield Final({"total": args["n"]})
        yield "never sent: the stream ended at Final"


@command("produce")
def produce(args: Dict[str, Any], ctx: Context) -> Iterator[int]:
    """Yield up to args.n values, counting them in PRODUCED; record a cancel."""
    name = args["name"]
    PRODUCED[name] = 0
    try:
        for i in range(args["n"]):
            PRODUCED[name] = i + 1
            yield i
    except asyncio.CancelledError:
        EVENTS.append({"event": "stream cancelled", "name": name, "at": PRODUCED[name]})
        raise
    finally:
        EVENTS.append({"event": "stream closed", "name": name})
    return PRODUCED[name]


@command("async_produce")
async def async_produce(args: Dict[str, Any], ctx: Context) -> AsyncIterator[int]:
    """Like ``produce``, as an async generator."""
    name = args["name"]
    PRODUCED[name] = 0
    try:
        for i in range(args["n"]):
            PRODUCED[name] = i + 1
            yield i
    except asyncio.CancelledError:
        EVENTS.append({"event": "stream cancelled", "name": name, "at": PRODUCED[name]})
        raise
    finally:
        EVENTS.append({"event": "stream closed", "name": name})


@command("produced")
def produced(args: Dict[str, Any], ctx: Context) -> Dict[str, int]:
    """How many values each ``produce`` stream has yielded."""
    return PRODUCED


@command("stream_fails")
def stream_fails(args: Dict[str, Any], ctx: Context) -> Iterator[int]:
    yield 1
    raise ValueError("stream broke")


@command("stream_bad_chunk")
def stream_bad_chunk(args: Dict[str, Any], ctx: Context) -> Iterator[Any]:
    yield 1
    yield {"value": object()}
    EVENTS.append({"event": "advanced after a bad chunk"})


@command("stream_big_chunk")
def stream_big_chunk(args: Dict[str, Any], ctx: Context) -> Iterator[str]:
    yield "x" * int(args["size"])


@command("in_thread")
async def in_thread(args: Dict[str, Any], ctx: Context) -> int:
    """Sum args.values on a thread of the loop's default executor."""
    return await asyncio.to_thread(sum, args["values"])
