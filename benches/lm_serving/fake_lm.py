"""A fake OpenAI-compatible LM for benchmarks: answers every chat completion after a
fixed latency, in the field format of DSPy's ChatAdapter.

    python benches/lm_serving/fake_lm.py [--port 0] [--latency-ms 200]

prints ``listening on http://127.0.0.1:PORT`` once it accepts connections, then serves:

``POST /v1/chat/completions``
    Waits ``--latency-ms``, then answers ``[[ ## reasoning ## ]]`` and
    ``[[ ## answer ## ]]`` fields (a ``question -> answer`` Predict uses the answer, a
    ChainOfThought both): for a question "What is A plus B?" the answer is A + B, else
    42. With ``"stream": true`` the same text comes as server-sent events
    (``chat.completion.chunk`` objects, then ``data: [DONE]``); the first chunk is sent
    after the latency, the others ``--chunk-interval-ms`` apart.
``GET /stats``
    ``{"requests", "streamed", "in_flight", "max_in_flight", "latency_ms"}``: requests
    answered since the start, how many of them streamed, completions being answered now
    and the most at once since the last reset.
``POST /stats/reset``
    Sets ``max_in_flight`` to the current ``in_flight``; returns the stats before.

Needs only aiohttp (which DSPy's litellm already installs). Binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from typing import Any, Dict, List, Optional

from aiohttp import web

QUESTION = re.compile(r"What is (-?\d+) plus (-?\d+)\?")


class Stats:
    def __init__(self, latency_ms: float) -> None:
        self.latency_ms = latency_ms
        self.requests = 0
        self.streamed = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def as_dict(self) -> Dict[str, Any]:
        return {
            "requests": self.requests,
            "streamed": self.streamed,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "latency_ms": self.latency_ms,
        }


def last_user_text(messages: Any) -> str:
    """The text of the last user message (string or content parts)."""
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(
                    part.get("text", "") for part in content if isinstance(part, dict)
                )
    return ""


def answer_text(messages: Any) -> str:
    """The completion: every output field a ``question -> answer`` program may want."""
    found = QUESTION.search(last_user_text(messages))
    if found:
        a, b = int(found.group(1)), int(found.group(2))
        reasoning, answer = f"{a} plus {b} is {a + b}.", str(a + b)
    else:
        reasoning, answer = "The answer is always 42.", "42"
    return (
        f"[[ ## reasoning ## ]]\n{reasoning}\n\n"
        f"[[ ## answer ## ]]\n{answer}\n\n"
        "[[ ## completed ## ]]"
    )


def usage(messages: Any, text: str) -> Dict[str, int]:
    prompt = max(1, len(json.dumps(messages)) // 4)
    completion = max(1, len(text) // 4)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion(model: str, text: str, tokens: Dict[str, int]) -> Dict[str, Any]:
    return {
        "id": f"chatcmpl-fake-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": tokens,
    }


def chunk(
    ident: str,
    model: str,
    delta: Dict[str, Any],
    finish: Optional[str],
    tokens: Optional[Dict[str, int]] = None,
) -> bytes:
    body: Dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if tokens is not None:
        body["usage"] = tokens
    return f"data: {json.dumps(body)}\n\n".encode()


def pieces(text: str, size: int = 16) -> List[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def make_app(latency_ms: float, chunk_interval_ms: float) -> web.Application:
    stats = Stats(latency_ms)
    latency = latency_ms / 1000.0
    interval = chunk_interval_ms / 1000.0

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response(
                {"error": {"message": "body is not JSON", "type": "invalid_request_error"}},
                status=400,
            )
        if not isinstance(body, dict):
            body = {}
        messages = body.get("messages")
        model = str(body.get("model") or "fake")
        stream = bool(body.get("stream"))
        text = answer_text(messages)
        tokens = usage(messages, text)
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            await asyncio.sleep(latency)
            if not stream:
                return web.json_response(completion(model, text, tokens))
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(request)
            ident = f"chatcmpl-fake-{time.monotonic_ns()}"
            parts = pieces(text)
            for i, part in enumerate(parts):
                if i and interval:
                    await asyncio.sleep(interval)
                delta = {"content": part}
                if i == 0:
                    delta["role"] = "assistant"
                await response.write(chunk(ident, model, delta, None))
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            await response.write(
                chunk(ident, model, {}, "stop", tokens if include_usage else None)
            )
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            stats.streamed += 1
            return response
        finally:
            stats.in_flight -= 1
            stats.requests += 1

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats.as_dict())

    async def reset_stats(request: web.Request) -> web.Response:
        before = stats.as_dict()
        stats.max_in_flight = stats.in_flight
        return web.json_response(before)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/chat/completions", chat_completions)
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/stats/reset", reset_stats)
    return app


async def serve(port: int, latency_ms: float, chunk_interval_ms: float) -> None:
    app = make_app(latency_ms, chunk_interval_ms)
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    host, bound = runner.addresses[0][:2]
    print(f"listening on http://{host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--chunk-interval-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.port, args.latency_ms, args.chunk_interval_ms))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
