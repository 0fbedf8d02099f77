"""DSPy's documented deployment, for the LM-serving benchmark: a FastAPI app whose
endpoint awaits ``program.acall(...)``, run by uvicorn with several worker processes.

    LM_SERVING_API_BASE=http://127.0.0.1:PORT/v1 \\
        python -m uvicorn fastapi_app:app --app-dir benches/lm_serving --workers 2

As in DSPy's deployment tutorial, each uvicorn worker process imports this module, so
it configures one ``dspy.LM`` and builds one program at start-up, and every request
awaits ``program.acall(question=...)`` on the worker's event loop. The LM is
``$LM_SERVING_MODEL`` (default ``openai/fake``) at ``$LM_SERVING_API_BASE`` with DSPy's
response cache off, as on the snakepool side. ``$LM_SERVING_PROGRAM`` picks ``predict`` (default) or
``chain_of_thought`` for the ``question -> answer`` signature.

So that one load generator (``snakepool bench --url ... --dspy-profile NAME``) drives
both servers, the endpoint is snakepool's ``POST /v1/call``: it takes
``{"command", "args", "session_id"?, "timeout_ms"?}`` and answers ``{"result": ...}``.
``execute_program`` runs the program on ``args.inputs.question``; ``configure_lm`` and
``create_program`` (the per-session setup the load generator does on snakepool) answer
at once, since the app has one LM and one program for everybody. ``DELETE
/v1/sessions/{id}`` answers 200 for the same reason.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

# DSPy's model metadata (for cost estimates) is fetched from the internet on first use
# unless this is set; snakepool sets it for its workers, and this benchmark stays on
# 127.0.0.1.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from pydantic import BaseModel  # noqa: E402

API_BASE = os.environ.get("LM_SERVING_API_BASE", "http://127.0.0.1:8080/v1")
MODEL = os.environ.get("LM_SERVING_MODEL", "openai/fake")
PROGRAM_TYPE = os.environ.get("LM_SERVING_PROGRAM", "predict")
SIGNATURE = "question -> answer"

app = FastAPI(
    title="DSPy program API",
    description="DSPy's FastAPI deployment recipe, for snakepool's LM-serving benchmark",
)

lm = dspy.LM(MODEL, api_base=API_BASE, api_key="x", cache=False)
dspy.settings.configure(lm=lm)
if PROGRAM_TYPE == "chain_of_thought":
    program = dspy.ChainOfThought(SIGNATURE)
elif PROGRAM_TYPE == "predict":
    program = dspy.Predict(SIGNATURE)
else:
    raise SystemExit(f"LM_SERVING_PROGRAM must be predict or chain_of_thought, got {PROGRAM_TYPE!r}")


class Call(BaseModel):
    """The body of snakepool's ``POST /v1/call``."""

    command: str
    args: Dict[str, Any] = {}
    session_id: Optional[str] = None
    timeout_ms: Optional[int] = None


def error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status)


@app.post("/v1/call")
async def call(body: Call) -> Any:
    if body.command == "execute_program":
        inputs = body.args.get("inputs")
        if not isinstance(inputs, dict) or not isinstance(inputs.get("question"), str):
            return error(400, "invalid_request", "args.inputs.question must be a string")
        try:
            result = await program.acall(question=inputs["question"])
        except Exception as exc:  # the tutorial's endpoint turns any failure into a 500
            return error(500, "lm_call_failed", f"{type(exc).__name__}: {exc}")
        outputs = {"answer": result.answer}
        reasoning = getattr(result, "reasoning", None) if PROGRAM_TYPE != "predict" else None
        return {"result": {"outputs": outputs, "reasoning": reasoning}}
    if body.command == "configure_lm":
        return {"result": {"provider": "litellm", "model": lm.model}}
    if body.command == "create_program":
        return {"result": {"program_id": "program", "type": PROGRAM_TYPE}}
    return error(404, "unknown_command", f"no command {body.command!r}")


@app.delete("/v1/sessions/{session_id}")
async def close_session(session_id: str) -> Any:
    return {"closed": True}


@app.get("/health")
async def health() -> Any:
    return {"status": "ready"}
