"""The JSON Schema (draft 2020-12) of each DSPy command's ``args``, for the manifest.

Every argument a command takes, with its type, allowed values, default and meaning;
``required`` lists what every call needs, ``anyOf`` the forms of the commands that take
several (``configure_lm``, ``execute_program``), and ``optimize_program``'s ``allOf``
which options go with which optimizer. Each schema forbids other arguments
(``additionalProperties: false``), as the commands do; the ``session_id`` the host adds
to a session call is not a caller's argument and is not listed. Allowed values and
defaults come from the constants the commands use, so they cannot drift from them.
Descriptions are short: every worker's handshake carries the schemas.

The schemas document the arguments: the commands check their calls themselves, never
against these.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

from .configure import PROVIDERS
from .optimize import (
    DEFAULT_LABELED_K,
    DEFAULT_MAX_BOOTSTRAPPED_DEMOS,
    DEFAULT_MAX_LABELED_DEMOS,
    METRICS,
    OPTIMIZERS,
)
from .policy import DEFAULT_NUM_RETRIES
from .programs import MAX_PROGRAM_ID_CHARS, PROGRAM_TYPES
from .signatures import ALLOWED_TYPES, RESERVED_FIELD_NAMES

Schema = Dict[str, Any]


def _args(
    properties: Dict[str, Schema],
    required: Iterable[str] = (),
    defs: Optional[Dict[str, Schema]] = None,
    **extra: Any,
) -> Schema:
    """The schema of an ``args`` object holding ``properties`` and nothing else; ``defs``
    are its ``$defs`` (referred to as ``#/$defs/NAME``)."""
    schema: Schema = {"type": "object", "properties": properties}
    required = list(required)
    if required:
        schema["required"] = required
    schema.update(extra)
    schema["additionalProperties"] = False
    if defs:
        schema["$defs"] = defs
    return schema


def _form(
    title: str, properties: Dict[str, Any], required: Iterable[str] = (), **extra: Any
) -> Schema:
    """One form of a command's arguments: only the ``properties`` (each ``True``, or a
    constraint the form adds), with ``required`` among them."""
    schema: Schema = {"title": title, "properties": properties}
    required = list(required)
    if required:
        schema["required"] = required
    schema.update(extra)
    schema["additionalProperties"] = False
    return schema


def _only(*names: str) -> Dict[str, Any]:
    """``properties`` of a form allowing ``names`` as the command describes them."""
    return {name: True for name in names}


def _string(description: str, **extra: Any) -> Schema:
    """A non-empty string."""
    return {"type": "string", "minLength": 1, **extra, "description": description}


_PROGRAM_ID = _string("Id of a program of the session.")

_FIELD: Schema = {
    "type": "object",
    "properties": {
        "name": _string(
            "An identifier, not starting with '_', not a Python keyword nor an attribute of "
            "dspy.Signature ('reasoning' neither, in a chain_of_thought), none of: "
            f"{', '.join(RESERVED_FIELD_NAMES)}; declared once."
        ),
        "type": {"type": "string", "enum": list(ALLOWED_TYPES), "default": "str"},
        "desc": {"type": "string"},
        "description": {"type": "string", "description": "Another spelling of desc."},
    },
    "required": ["name"],
    "additionalProperties": False,
}
"""A signature field: ``$defs/field`` of ``create_program``'s schema."""

_FIELDS: Schema = {"type": "array", "items": {"$ref": "#/$defs/field"}, "minItems": 1}

_SIGNATURE: Schema = {
    "type": ["string", "object"],
    "description": (
        "'question -> answer', 'question: str, k: int -> answer: list[str]' (types: "
        f"{', '.join(ALLOWED_TYPES)}; str by default), or {{instructions?, inputs, "
        "outputs}; field names as in $defs/field."
    ),
    "properties": {
        "instructions": {"type": "string"},
        "inputs": _FIELDS,
        "outputs": _FIELDS,
    },
    "required": ["inputs", "outputs"],
    "additionalProperties": False,
}

_EXAMPLES = (
    "objects holding every input and output field (and optionally 'reasoning', for a "
    "chain_of_thought)"
)

_STATE: Schema = {
    "type": "object",
    "description": "The 'state' of a dump_program_state or optimize_program reply, or what "
    "DSPy's program.save() writes.",
}

CONFIGURE_LM: Schema = _args(
    {
        "profile": _string(
            "One of the operator's LM profiles (LMProfileNotFound lists them); beside it "
            "only temperature and max_tokens (LMSettingsForbidden)."
        ),
        "provider": {
            "type": "string",
            "enum": list(PROVIDERS),
            "description": "'dummy': the scripted test LM. 'litellm' (without a profile, "
            "the default unless model is 'dummy'): dspy.LM(model).",
        },
        "model": _string(
            "A dspy.LM model, e.g. 'openai/gpt-4o-mini', where the operator allows "
            "callers' LM settings (else LMSettingsForbidden); 'dummy': the test LM."
        ),
        "api_base": _string("The model's endpoint."),
        "api_key_env": _string(
            "The worker's environment variable holding the API key; not SNAKEPOOL_*.",
            pattern="^[A-Za-z_][A-Za-z0-9_]*$",
        ),
        "temperature": {
            "type": "number",
            "minimum": 0,
            "description": "Sampling temperature; default: the profile's, else DSPy's.",
        },
        "max_tokens": {
            "type": "integer",
            "minimum": 1,
            "description": "Most tokens per reply; at most the profile's max_tokens, if set.",
        },
        "num_retries": {
            "type": "integer",
            "minimum": 0,
            "default": DEFAULT_NUM_RETRIES,
            "description": "Retries of transient provider errors per LM call.",
        },
        "cache": {
            "type": "boolean",
            "const": False,
            "default": False,
            "description": "A caller's LM never caches: true is refused.",
        },
        "answers": {
            "type": ["array", "object"],
            "items": {"type": "object"},
            "additionalProperties": {"type": "object"},
            "default": [],
            "description": "The dummy LM's script: {output field: value} answers, one per "
            "LM call, or an object of prompt text -> answer.",
        },
        "follow_examples": {
            "type": "boolean",
            "default": False,
            "description": "The dummy LM answers from a demo matching the call's input "
            "first.",
        },
    },
    anyOf=[
        _form("profile", _only("profile", "temperature", "max_tokens"), ["profile"]),
        _form(
            "dummy",
            {
                "provider": {"const": "dummy"},
                "model": {"const": "dummy"},
                **_only("answers", "follow_examples"),
            },
            anyOf=[{"required": ["provider"]}, {"required": ["model"]}],
        ),
        _form(
            "model",
            _only(
                "provider",
                "model",
                "api_base",
                "api_key_env",
                "temperature",
                "max_tokens",
                "num_retries",
                "cache",
            ),
            ["model"],
        ),
    ],
)

_PROGRAM_TYPE: Schema = {"type": "string", "enum": list(PROGRAM_TYPES)}

CREATE_PROGRAM: Schema = _args(
    {
        "signature": _SIGNATURE,
        "type": {
            **_PROGRAM_TYPE,
            "default": "predict",
            "description": "dspy.Predict or dspy.ChainOfThought.",
        },
        "program_type": {**_PROGRAM_TYPE, "description": "Another spelling of type."},
        "instructions": _string("The instructions, with a string signature."),
        "demos": {
            "type": "array",
            "items": {"type": "object"},
            "description": f"Demos: {_EXAMPLES}. Not with state.",
        },
        "state": {**_STATE, "description": f"{_STATE['description']} Not with demos."},
        "program_id": _string(
            "A new id; default prog_1, prog_2 ... from the session's counter.",
            maxLength=MAX_PROGRAM_ID_CHARS,
        ),
        "id": _string("Another spelling of program_id.", maxLength=MAX_PROGRAM_ID_CHARS),
    },
    ["signature"],
    defs={"field": _FIELD},
)

EXECUTE_PROGRAM: Schema = _args(
    {
        "program_id": _string("The session's program to run (a session call)."),
        "program": _string("The served program to run (a plain call, without a session)."),
        "inputs": {
            "type": "object",
            "description": "A value for each input field of the program, and nothing else.",
        },
        "stream": {
            "type": "boolean",
            "default": False,
            "description": "Send the string outputs (and the reasoning) piece by piece as "
            "chunks {field, predictor, text} before the result.",
        },
    },
    ["inputs"],
    anyOf=[
        _form("session", _only("program_id", "inputs", "stream"), ["program_id", "inputs"]),
        _form("served", _only("program", "inputs", "stream"), ["program", "inputs"]),
    ],
)

OPTIMIZE_PROGRAM: Schema = _args(
    {
        "program_id": _PROGRAM_ID,
        "trainset": {
            "type": "array",
            "items": {"type": "object"},
            "minItems": 1,
            "description": f"Training examples: {_EXAMPLES}.",
        },
        "metric": {
            "type": "string",
            "enum": list(METRICS),
            "default": "exact_match",
            "description": "Output fields equal to, or containing, the example's (ignoring "
            "case and whitespace).",
        },
        "optimizer": {
            "type": "string",
            "enum": list(OPTIMIZERS),
            "default": "bootstrap_few_shot",
            "description": "dspy.BootstrapFewShot (needs the session's LM) or "
            "dspy.LabeledFewShot.",
        },
        "max_bootstrapped_demos": {
            "type": "integer",
            "minimum": 0,
            "default": DEFAULT_MAX_BOOTSTRAPPED_DEMOS,
            "description": "bootstrap_few_shot only.",
        },
        "max_labeled_demos": {
            "type": "integer",
            "minimum": 0,
            "default": DEFAULT_MAX_LABELED_DEMOS,
            "description": "bootstrap_few_shot only.",
        },
        "k": {
            "type": "integer",
            "minimum": 0,
            "default": DEFAULT_LABELED_K,
            "description": "Trainset examples made demos; labeled_few_shot only.",
        },
    },
    ["program_id", "trainset"],
    allOf=[
        {
            "if": {
                "properties": {"optimizer": {"const": "labeled_few_shot"}},
                "required": ["optimizer"],
            },
            "then": {
                "not": {
                    "anyOf": [
                        {"required": ["max_bootstrapped_demos"]},
                        {"required": ["max_labeled_demos"]},
                    ]
                }
            },
            "else": {"not": {"required": ["k"]}},
        }
    ],
)

_BY_PROGRAM_ID: Schema = _args({"program_id": _PROGRAM_ID}, ["program_id"])

LOAD_PROGRAM_STATE: Schema = _args(
    {"program_id": _PROGRAM_ID, "state": _STATE}, ["program_id", "state"]
)

_NONE: Schema = _args({})

ARGS_SCHEMAS: Dict[str, Schema] = {
    "configure_lm": CONFIGURE_LM,
    "create_program": CREATE_PROGRAM,
    "execute_program": EXECUTE_PROGRAM,
    "optimize_program": OPTIMIZE_PROGRAM,
    "dump_program_state": _BY_PROGRAM_ID,
    "load_program_state": LOAD_PROGRAM_STATE,
    "list_programs": _NONE,
    "get_program_info": _BY_PROGRAM_ID,
    "delete_program": _BY_PROGRAM_ID,
    "reset_state": _NONE,
}
"""The JSON Schema of each DSPy command's ``args``, by command name."""
