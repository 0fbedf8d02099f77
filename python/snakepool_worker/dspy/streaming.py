"""Streaming a program run: its string outputs, piece by piece as the LM writes them.

``execute_program`` with ``"stream": true`` runs the program through ``dspy.streamify``
(with ``acall``, on the worker's event loop like any run) under ``state.arun``, so with the
same ``dspy.context`` settings and the same ``LMCallFailed`` for a failed LM call, and with
a ``dspy.streaming.StreamListener`` on each string output field of the program's
signature, and on ``reasoning`` for a chain of thought. Each piece a listener catches
becomes a chunk ``{"field", "predictor", "text"}``: the output field, the name DSPy gives
the predictor writing it (``self`` for a ``predict`` program, ``predict`` for a chain of
thought) and the text. A field's texts, in order, make up its value as DSPy parses it; a
field's last piece may be empty. The stream ends with the result a run without streaming
returns. An answer from the response cache is not streamed: the call then sends no chunk,
only its result.

DSPy's stream must only ever be stopped from inside it: closed while it waits at a
``yield``, it leaves the task group running the program to be closed later by another
task, which fails. So a relay task reads the stream, and is never suspended anywhere but
in it, and hands the chunks over through a queue; cancelling the relay stops the program
inside DSPy. The queue holds what the host's credit does not yet let the call send, at
most one LM response.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Dict, List

from ..registry import Final
from .loader import load_dspy
from .programs import Program
from .state import LMBinding, arun, program_result

_END = object()
"""Queued when the relay has finished, however it finished."""


def streamed_fields(program: Program) -> List[str]:
    """The fields a run of ``program`` streams: its string outputs (after the reasoning of
    a chain of thought)."""
    fields = ["reasoning"] if program.type == "chain_of_thought" else []
    return fields + [field.name for field in program.outputs if field.type == "str"]


def _chunk(response: Any) -> Dict[str, Any]:
    """The chunk sent for a ``dspy.streaming.StreamResponse``."""
    return {
        "field": response.signature_field_name,
        "predictor": response.predict_name,
        "text": response.chunk,
    }


async def _relay(program: Program, inputs: Dict[str, Any], send: Callable[[Any], None]) -> Any:
    """Run ``program`` through ``dspy.streamify``, ``send`` each chunk; return the prediction.

    The stream is read to its end, and nothing here awaits anything else, so a cancel
    always reaches the program inside DSPy's stream.
    """
    dspy = load_dspy()
    listeners = [
        dspy.streaming.StreamListener(signature_field_name=name)
        for name in streamed_fields(program)
    ]
    run = dspy.streamify(
        program.module,
        stream_listeners=listeners,
        include_final_prediction_in_output_stream=True,
        is_async_program=True,
        async_streaming=True,
    )
    prediction = None
    async for value in run(**inputs):
        if isinstance(value, dspy.streaming.StreamResponse):
            send(_chunk(value))
        elif isinstance(value, dspy.Prediction):
            prediction = value
    if prediction is None:
        raise RuntimeError("DSPy's stream of the program ended without its prediction")
    return prediction


async def _stop(relay: "asyncio.Task[Any]") -> None:
    """Cancel ``relay`` if it still runs, and wait until it has finished."""
    relay.cancel()
    await asyncio.wait({relay})
    if not relay.cancelled():
        relay.exception()  # retrieved: a call that ended early has no use for it


async def stream_program(
    binding: LMBinding, program: Program, inputs: Dict[str, Any]
) -> AsyncIterator[Any]:
    """Run ``program`` on ``inputs`` with ``binding``'s LM, streaming its string outputs.

    Yields a chunk (see ``_chunk``) for each piece of a streamed field, then
    ``Final(result)`` with the result ``execute_program`` returns.
    """
    chunks: "asyncio.Queue[Any]" = asyncio.Queue()
    relay = asyncio.ensure_future(arun(binding, lambda: _relay(program, inputs, chunks.put_nowait)))
    relay.add_done_callback(lambda _: chunks.put_nowait(_END))
    try:
        chunk = await chunks.get()
        while chunk is not _END:
            yield chunk
            chunk = await chunks.get()
        prediction = await relay
    finally:
        await _stop(relay)
    yield Final(program_result(program, prediction))
