"""DSPy commands: per-session language models and programs.

Imported by default when DSPy is installed (see ``snakepool_worker.runtime``). Importing
this module is cheap: ``dspy`` itself is imported on the first DSPy command, or at
start-up with ``--preload dspy``. LiteLLM is never imported here; DSPy imports it only if
a model needs it, on that model's first call.

Every command works on the state of one session and needs a session call
(``args.session_id``, set by the host); without one it fails with ``SessionRequired``.
Sessions are isolated: each has its own language model and programs, and programs run
under ``dspy.context(lm=<the session's LM>)``; nothing here calls ``dspy.configure``.

Commands (``*`` = ``mutates_session``, journaled by the host):

``configure_lm``\\* ``{model, api_base?, api_key_env?, temperature?, max_tokens?,
num_retries?=2, cache?=false}`` or ``{provider: "dummy", answers?, follow_examples?}``
    Creates the session's LM (replacing any previous one) and returns ``{provider,
    model, ...settings}``; ``provider`` is ``"litellm"`` for ``dspy.LM`` models (DSPy
    picks the client: its own HTTP client for OpenAI-compatible endpoints, LiteLLM for
    the rest) and ``"dummy"`` for ``dspy.utils.dummies.DummyLM`` (also selected by
    ``model: "dummy"``).
    ``api_key_env`` names an environment variable of the worker holding the key; the
    key never travels over the wire and is never returned. ``num_retries`` (default 2)
    retries transient provider errors (429, 5xx, network) with DSPy's back-off of 1 s,
    2 s, 4 s ... or the provider's ``Retry-After``; keep the host's request timeout above
    that. ``cache`` (default false) enables DSPy's response cache, which is shared by
    every session of the worker and, on disk, by every worker of the machine. A dummy
    LM's ``answers`` are a list of ``{output field: value}`` objects, one consumed per LM
    call (the JSON-adapter retry is off for it, so a reply that does not fit fails at
    once), or an object mapping prompt text to such an answer. With ``follow_examples``
    it answers from a demo whose input matches the call, and when none matches, from
    ``answers`` (DSPy's own DummyLM would fail the call instead). A call after the list
    is used up fails with ``DummyAnswersExhausted`` (DSPy's DummyLM would answer
    "No more responses").
``create_program``\\* ``{signature, type?="predict", instructions?, demos?, state?,
program_id?}``
    ``signature`` is ``"question -> answer"`` / ``"question: str -> answer: int"`` or
    ``{instructions?, inputs: [{name, type?, desc?}], outputs: [...]}``; types are
    ``str, int, float, bool, list[str], dict``. ``type`` is ``predict`` or
    ``chain_of_thought``; ``instructions`` goes with a string signature. ``demos`` are
    objects holding every input and output field; ``state`` comes from
    ``dump_program_state``. Ids default to ``prog_1``, ``prog_2`` ... from a per-session
    counter (skipping ids taken explicitly), so replaying the same calls yields the same
    ids. The DSPex spellings ``id`` and ``program_type`` are accepted. Returns
    ``{program_id, type, signature: {instructions, inputs: [{name, type, desc}],
    outputs}}``.
``execute_program`` ``{program_id, inputs}``
    Returns ``{outputs, reasoning, usage}``: outputs typed as declared, ``reasoning`` for
    chain of thought (else null), ``usage`` as ``{model: {prompt_tokens, ...}}`` or null.
``optimize_program``\\* ``{program_id, trainset, metric?="exact_match",
optimizer?="bootstrap_few_shot", max_bootstrapped_demos?=4, max_labeled_demos?=16, k?=16}``
    Compiles the program with ``dspy.BootstrapFewShot`` (needs an LM) or
    ``dspy.LabeledFewShot`` (``k``) and replaces it. Returns ``{program_id, optimizer,
    demos, state}`` and has the host journal ``load_program_state`` with that state
    instead of this call, so a rebuilt session gets the same program without re-running
    the optimizer. The program's previous demos are replaced. Metrics compare every
    declared output field, case- and whitespace-insensitively: ``exact_match`` (equal)
    or ``contains`` (expected text within the predicted text). A trainset example holds
    every input and output field (and may hold ``reasoning`` for chain of thought).
``dump_program_state`` ``{program_id}`` -> ``{program_id, state}``
``load_program_state``\\* ``{program_id, state}`` -> ``{program_id, demos}``
``list_programs`` ``{}`` -> ``{programs: [{program_id, type, signature: "q -> a"}]}``
``get_program_info`` ``{program_id}`` -> ``{program_id, type, signature, demos,
instructions}``
``delete_program``\\* ``{program_id}`` -> ``{deleted}``
``reset_state``\\* ``{}`` -> ``{programs_deleted, lm_cleared}``

Every command rejects arguments it does not know (``InvalidArgument``), so a misspelt
setting fails instead of being ignored.

Error types (the exception class names below): ``SessionRequired``, ``InvalidArgument``,
``InvalidSignature``, ``UnsupportedType``, ``ProgramNotFound``, ``MissingInput``,
``UnknownInput``, ``LMNotConfigured``, ``ApiKeyMissing``, ``UnknownMetric``,
``InvalidState``, ``DummyAnswersExhausted``. Failures inside DSPy keep DSPy's type names
(for example ``AdapterParseError`` when the LM's reply does not fit the signature,
``LMServerError`` when the provider keeps failing).
"""

from __future__ import annotations

import contextlib
import copy
import json
import keyword
import math
import os
import re
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from .registry import Context, Handler, Registry, default_registry

if TYPE_CHECKING:  # pragma: no cover
    import types

STATE_KEY = "dspy"
"""Key of the per-session DSPy state in ``ctx.session``."""

ALLOWED_TYPES: Tuple[str, ...] = ("str", "int", "float", "bool", "list[str]", "dict")
PROGRAM_TYPES: Tuple[str, ...] = ("predict", "chain_of_thought")
METRICS: Tuple[str, ...] = ("exact_match", "contains")
OPTIMIZERS: Tuple[str, ...] = ("bootstrap_few_shot", "labeled_few_shot")
PROVIDERS: Tuple[str, ...] = ("litellm", "dummy")

DEFAULT_NUM_RETRIES = 2
"""Retries of transient provider errors per LM call (DSPy's own default is 3)."""
DEFAULT_MAX_BOOTSTRAPPED_DEMOS = 4
DEFAULT_MAX_LABELED_DEMOS = 16
DEFAULT_LABELED_K = 16

_ID_PREFIX = "prog_"
_MAX_PROGRAM_ID_CHARS = 200
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PREDICTOR_STATE_KEYS = frozenset({"traces", "train", "demos", "signature", "lm", "fields"})

# Advisory model metadata (prices, context windows) is otherwise fetched from the
# internet on the first real LM call, by DSPy and by LiteLLM; the bundled copy will do.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


# --------------------------------------------------------------------------------------------
# Error types. Their class names are the ``error.type`` strings seen by the host.
# --------------------------------------------------------------------------------------------


class DSPyBridgeError(Exception):
    """Base class of the errors raised by the DSPy commands."""


class SessionRequired(DSPyBridgeError):
    """A DSPy command was called without ``args.session_id``."""


class InvalidArgument(DSPyBridgeError):
    """An argument is missing, has the wrong type, or has a value that is not allowed."""


class InvalidSignature(DSPyBridgeError):
    """A signature cannot be parsed or names its fields in a way DSPy cannot use."""


class UnsupportedType(InvalidSignature):
    """A signature field has a type outside ``ALLOWED_TYPES``."""


class ProgramNotFound(DSPyBridgeError):
    """No program with the given id exists in the session."""


class MissingInput(DSPyBridgeError):
    """``execute_program`` was not given every input field of the signature."""


class UnknownInput(DSPyBridgeError):
    """``execute_program`` was given inputs the signature does not declare."""


class LMNotConfigured(DSPyBridgeError):
    """The command needs a language model and the session has none."""


class ApiKeyMissing(DSPyBridgeError):
    """The environment variable named by ``api_key_env`` is not set in the worker."""


class UnknownMetric(DSPyBridgeError):
    """``optimize_program`` was given a metric name it does not know."""


class InvalidState(DSPyBridgeError):
    """A program state (from ``dump_program_state``) does not fit the program."""


class DummyAnswersExhausted(DSPyBridgeError):
    """A dummy LM was called after its list of scripted answers was used up."""


# --------------------------------------------------------------------------------------------
# Lazy DSPy import
# --------------------------------------------------------------------------------------------

_dspy_module: Optional["types.ModuleType"] = None
_scripted_lm_class: Any = None


def load_dspy() -> Any:
    """Import DSPy on first use and return the module."""
    global _dspy_module
    if _dspy_module is None:
        import dspy

        _dspy_module = dspy
    return _dspy_module


class _Script:
    """The scripted answers of a dummy LM; raises when used up instead of stopping."""

    def __init__(self, answers: List[Dict[str, Any]]) -> None:
        self._answers = answers
        self._next = 0

    def __iter__(self) -> "_Script":
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._next >= len(self._answers):
            raise DummyAnswersExhausted(
                f"the dummy LM has used all {len(self._answers)} of its scripted answers; "
                "call configure_lm again with more answers"
            )
        answer = self._answers[self._next]
        self._next += 1
        return answer


def scripted_lm_class() -> Any:
    """``DummyLM`` with a script that fails when used up and a ``follow_examples`` fallback."""
    global _scripted_lm_class
    if _scripted_lm_class is None:
        load_dspy()
        from dspy.utils.dummies import DummyLM

        class ScriptedLM(DummyLM):  # type: ignore[misc, valid-type]
            """A DummyLM: scripted answers, or a matching demo's outputs with follow_examples.

            With ``follow_examples`` and a non-empty script, a call whose input matches no
            demo takes the next scripted answer instead of failing.
            """

            def __init__(self, answers: Any, follow_examples: bool = False) -> None:
                super().__init__(answers, follow_examples=follow_examples)
                if isinstance(answers, list):
                    self.answers = _Script(answers)
                self.fallback = follow_examples and bool(answers)

            def _use_example(self, messages: Any) -> Any:
                found = super()._use_example(messages)
                if found is not None or not self.fallback:
                    return found
                if isinstance(self.answers, dict):
                    last = messages[-1]["content"]
                    for key, answer in self.answers.items():
                        if key in last:
                            return self._format_answer_fields(answer)
                    return "No more responses"
                return self._format_answer_fields(next(self.answers))

        _scripted_lm_class = ScriptedLM
    return _scripted_lm_class


# --------------------------------------------------------------------------------------------
# Argument helpers
# --------------------------------------------------------------------------------------------

_MISSING = object()


def _describe(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else ""
    if text and len(text) <= 60:
        return f"{text} ({type(value).__name__})"
    return f"a value of type {type(value).__name__}"


def _names(items: Any) -> str:
    return ", ".join(str(item) for item in items)


def _quoted(items: Any) -> str:
    return ", ".join(repr(item) for item in items)


def _check_known(command: str, args: Mapping[str, Any], allowed: Tuple[str, ...]) -> None:
    unknown = [key for key in args if key not in allowed and key != "session_id"]
    if unknown:
        raise InvalidArgument(
            f"{command}: unknown argument(s) {_quoted(unknown)}; allowed: {_names(allowed)}"
        )


def _get_str(command: str, args: Mapping[str, Any], name: str, default: Any = _MISSING) -> Any:
    value = args.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise InvalidArgument(f"{command}: args.{name} is required (a non-empty string)")
        return default
    if not isinstance(value, str) or not value:
        raise InvalidArgument(
            f"{command}: args.{name} must be a non-empty string, got {_describe(value)}"
        )
    return value


def _get_bool(command: str, args: Mapping[str, Any], name: str, default: bool) -> bool:
    value = args.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidArgument(
            f"{command}: args.{name} must be true or false, got {_describe(value)}"
        )
    return value


def _get_int(
    command: str, args: Mapping[str, Any], name: str, default: Optional[int], minimum: int = 0
) -> Optional[int]:
    value = args.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(
            f"{command}: args.{name} must be an integer >= {minimum}, got {_describe(value)}"
        )
    return value


def _get_number(command: str, args: Mapping[str, Any], name: str) -> Optional[float]:
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{command}: args.{name} must be a number, got {_describe(value)}")
    if value < 0:
        raise InvalidArgument(f"{command}: args.{name} must not be negative, got {value}")
    return float(value)


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data; non-finite floats become null, unknown objects text."""
    if value is None or type(value) in (str, bool, int):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(item) for item in value), key=repr)
    for method, kwargs in (("toDict", {}), ("model_dump", {"mode": "json"}), ("item", {})):
        convert = getattr(value, method, None)
        if callable(convert):
            try:
                return _jsonable(convert(**kwargs))
            except Exception:
                break
    return str(value)


# --------------------------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------------------------


class FieldSpec:
    """A declared signature field: name, type name (one of ``ALLOWED_TYPES``), description."""

    __slots__ = ("name", "type", "desc")

    def __init__(self, name: str, type_name: str = "str", desc: str = "") -> None:
        self.name = name
        self.type = type_name
        self.desc = desc

    def text(self) -> str:
        return self.name if self.type == "str" else f"{self.name}: {self.type}"


def _python_type(type_name: str) -> Any:
    return {
        "str": str,
        "int": int,
        "float": float,
        "bool": bool,
        "list[str]": list[str],
        "dict": dict,
    }[type_name]


def _check_type(type_text: str, field: str) -> str:
    normalized = "".join(type_text.split())
    if normalized not in ALLOWED_TYPES:
        raise UnsupportedType(
            f"field {field!r} has unsupported type {type_text.strip()!r}; "
            f"allowed types: {_names(ALLOWED_TYPES)}"
        )
    return normalized


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidSignature(
            f"{where}: field name must be a non-empty string, got {_describe(name)}"
        )
    if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
        raise InvalidSignature(
            f"{where}: field name {name!r} is not usable; names are identifiers "
            "(letters, digits, underscores; not starting with a digit or an underscore, "
            "not a Python keyword)"
        )
    return name


def _split_fields(text: str) -> List[str]:
    """Split on commas outside brackets, so ``dict[str, int]`` stays one piece."""
    parts: List[str] = []
    depth = 0
    current: List[str] = []
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _parse_side(signature: str, side: str, kind: str) -> List[FieldSpec]:
    if not side.strip():
        raise InvalidSignature(
            f"signature {signature!r} has no {kind} fields; expected e.g. 'question -> answer'"
        )
    fields: List[FieldSpec] = []
    for part in _split_fields(side):
        part = part.strip()
        if not part:
            raise InvalidSignature(f"signature {signature!r} has an empty {kind} field (stray ',')")
        name_text, colon, type_text = part.partition(":")
        name = _check_name(name_text.strip(), f"signature {signature!r}")
        if colon and not type_text.strip():
            raise InvalidSignature(
                f"signature {signature!r}: field {name!r} has ':' but no type; "
                f"write '{name}' or '{name}: TYPE' with TYPE one of {_names(ALLOWED_TYPES)}"
            )
        type_name = _check_type(type_text, name) if colon else "str"
        fields.append(FieldSpec(name, type_name))
    return fields


def parse_signature_text(signature: str) -> Tuple[List[FieldSpec], List[FieldSpec]]:
    """Parse ``"a, b: int -> c: list[str]"`` into input and output fields."""
    if signature.count("->") != 1:
        raise InvalidSignature(
            f"signature {signature!r} must contain exactly one '->' between inputs and "
            "outputs, e.g. 'question -> answer' or 'question: str -> answer: int'"
        )
    left, right = signature.split("->")
    return _parse_side(signature, left, "input"), _parse_side(signature, right, "output")


def _parse_field_dict(entry: Any, where: str) -> FieldSpec:
    if not isinstance(entry, dict):
        raise InvalidSignature(
            f"{where} must be an object {{name, type?, desc?}}, got {_describe(entry)}"
        )
    unknown = [key for key in entry if key not in ("name", "type", "desc", "description")]
    if unknown:
        raise InvalidSignature(
            f"{where} has unknown key(s) {_quoted(unknown)}; allowed: name, type, desc"
        )
    name = _check_name(entry.get("name"), where)
    type_value = entry.get("type", "str")
    if type_value is None:
        type_value = "str"
    if not isinstance(type_value, str):
        raise UnsupportedType(
            f"field {name!r} has unsupported type {_describe(type_value)}; "
            f"allowed types: {_names(ALLOWED_TYPES)}"
        )
    desc = entry.get("desc", entry.get("description", ""))
    if desc is None:
        desc = ""
    if not isinstance(desc, str):
        raise InvalidSignature(f"{where}: desc must be a string, got {_describe(desc)}")
    return FieldSpec(name, _check_type(type_value, name), desc)


def parse_signature_dict(
    signature: Dict[str, Any],
) -> Tuple[List[FieldSpec], List[FieldSpec], Optional[str]]:
    """Parse ``{instructions?, inputs: [...], outputs: [...]}``."""
    unknown = [key for key in signature if key not in ("instructions", "inputs", "outputs")]
    if unknown:
        raise InvalidSignature(
            f"signature has unknown key(s) {_quoted(unknown)}; allowed: instructions, inputs, "
            "outputs"
        )
    instructions = signature.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidSignature(
            f"signature.instructions must be a string, got {_describe(instructions)}"
        )
    sides: List[List[FieldSpec]] = []
    for kind in ("inputs", "outputs"):
        entries = signature.get(kind)
        if not isinstance(entries, list) or not entries:
            raise InvalidSignature(
                f"signature.{kind} must be a non-empty list of {{name, type?, desc?}} objects, "
                f"got {_describe(entries)}"
            )
        sides.append(
            [_parse_field_dict(entry, f"signature.{kind}[{i}]") for i, entry in enumerate(entries)]
        )
    return sides[0], sides[1], instructions or None


def _check_field_set(inputs: List[FieldSpec], outputs: List[FieldSpec], program_type: str) -> None:
    dspy = load_dspy()
    seen: Dict[str, str] = {}
    for kind, fields in (("input", inputs), ("output", outputs)):
        for field in fields:
            if field.name in seen:
                raise InvalidSignature(
                    f"field {field.name!r} is declared twice (as {seen[field.name]} and {kind})"
                )
            seen[field.name] = kind
            if hasattr(dspy.Signature, field.name):
                raise InvalidSignature(
                    f"field name {field.name!r} is reserved: it names an attribute of "
                    "dspy.Signature; choose another name"
                )
            if program_type == "chain_of_thought" and field.name == "reasoning":
                raise InvalidSignature(
                    "field name 'reasoning' is reserved in a chain_of_thought program (its "
                    "reasoning is returned separately); choose another name"
                )


def _build_signature(
    inputs: List[FieldSpec], outputs: List[FieldSpec], instructions: Optional[str]
) -> Any:
    dspy = load_dspy()
    fields: Dict[str, Any] = {}
    for field in inputs:
        extra = {"desc": field.desc} if field.desc else {}
        fields[field.name] = (_python_type(field.type), dspy.InputField(**extra))
    for field in outputs:
        extra = {"desc": field.desc} if field.desc else {}
        fields[field.name] = (_python_type(field.type), dspy.OutputField(**extra))
    try:
        return dspy.Signature(fields, instructions)
    except Exception as exc:
        raise InvalidSignature(f"DSPy rejected the signature: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Session state
# --------------------------------------------------------------------------------------------


class Program:
    """One program of a session: its declared fields and the DSPy module."""

    __slots__ = ("program_id", "type", "inputs", "outputs", "module")

    def __init__(
        self,
        program_id: str,
        program_type: str,
        inputs: List[FieldSpec],
        outputs: List[FieldSpec],
        module: Any,
    ) -> None:
        self.program_id = program_id
        self.type = program_type
        self.inputs = inputs
        self.outputs = outputs
        self.module = module

    def predictors(self) -> List[Tuple[str, Any]]:
        return list(self.module.named_predictors())

    def demo_count(self) -> int:
        return sum(len(predictor.demos) for _, predictor in self.predictors())

    def signature_text(self) -> str:
        return (
            ", ".join(field.text() for field in self.inputs)
            + " -> "
            + ", ".join(field.text() for field in self.outputs)
        )

    def instructions(self) -> str:
        predictor = self.predictors()[0][1]
        return str(predictor.signature.instructions)

    def describe_signature(self) -> Dict[str, Any]:
        """Fields as declared; instructions and descriptions as the program has them now."""
        signature = self.predictors()[0][1].signature
        live = signature.fields

        def describe(field: FieldSpec) -> Dict[str, str]:
            info = live.get(field.name)
            extra = (getattr(info, "json_schema_extra", None) or {}) if info is not None else {}
            desc = extra.get("desc", field.desc)
            if not isinstance(desc, str) or desc == f"${{{field.name}}}":
                desc = ""
            return {"name": field.name, "type": field.type, "desc": desc}

        return {
            "instructions": str(signature.instructions),
            "inputs": [describe(field) for field in self.inputs],
            "outputs": [describe(field) for field in self.outputs],
        }


class SessionState:
    """A session's language model and programs."""

    __slots__ = ("lm", "lm_info", "adapter", "programs", "counter")

    def __init__(self) -> None:
        self.lm: Any = None
        self.lm_info: Optional[Dict[str, Any]] = None
        self.adapter: Any = None
        self.programs: Dict[str, Program] = {}
        self.counter = 0

    def set_lm(self, lm: Any, info: Dict[str, Any], adapter: Any) -> None:
        self.close_lm()
        self.lm = lm
        self.lm_info = info
        self.adapter = adapter

    def close_lm(self) -> bool:
        lm = self.lm
        self.lm = self.lm_info = self.adapter = None
        if lm is None:
            return False
        close = getattr(lm, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # releasing connections must not fail a command
                pass
        return True

    def next_program_id(self) -> str:
        while True:
            self.counter += 1
            program_id = f"{_ID_PREFIX}{self.counter}"
            if program_id not in self.programs:
                return program_id

    def clear(self) -> Tuple[int, bool]:
        count = len(self.programs)
        self.programs.clear()
        had_lm = self.close_lm()
        self.counter = 0
        return count, had_lm


def _state(ctx: Context) -> SessionState:
    if ctx.session_id is None:
        raise SessionRequired(
            f"DSPy programs live in a session's worker; call through a session "
            f"({ctx.command!r} was called without args.session_id)"
        )
    session = ctx.session
    state = session.get(STATE_KEY)
    if state is None:
        state = session[STATE_KEY] = SessionState()
    return state


def _program(state: SessionState, ctx: Context, args: Mapping[str, Any]) -> Program:
    program_id = _get_str(ctx.command, args, "program_id")
    program = state.programs.get(program_id)
    if program is None:
        if state.programs:
            known = f"its programs: {_names(state.programs)}"
        else:
            known = "it has no programs; create one with create_program"
        raise ProgramNotFound(f"no program {program_id!r} in session {ctx.session_id!r} ({known})")
    return program


def _require_lm(state: SessionState, ctx: Context) -> None:
    if state.lm is None:
        raise LMNotConfigured(
            f"{ctx.command}: session {ctx.session_id!r} has no language model; call "
            'configure_lm first, e.g. {"model": "openai/gpt-4o-mini", "api_key_env": '
            '"OPENAI_API_KEY"} or {"provider": "dummy", "answers": [...]}'
        )


def _run(state: SessionState, func: Callable[[], Any]) -> Any:
    """Run ``func`` with the session's LM, usage tracking on and DSPy's history off.

    The history is off because DSPy keeps every LM call in a process-wide list (and in
    each module) that would hold one session's prompts and replies after it is cleaned up.
    """
    dspy = load_dspy()
    settings: Dict[str, Any] = {"lm": state.lm, "track_usage": True, "disable_history": True}
    if state.adapter is not None:
        settings["adapter"] = state.adapter
    try:
        with dspy.context(**settings):
            return func()
    except Exception as exc:
        # DSPy wraps errors raised inside an LM call; report a used-up script as itself.
        cause = exc.__cause__ if exc.__cause__ is not None else exc.__context__
        if isinstance(cause, DummyAnswersExhausted):
            raise DummyAnswersExhausted(str(cause)) from exc
        raise


def cleanup_session_state(session_id: str, session: Dict[str, Any]) -> None:
    """Session cleanup hook: drop the session's programs and close its LM."""
    state = session.pop(STATE_KEY, None)
    if isinstance(state, SessionState):
        state.clear()


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

_COMMANDS: List[Tuple[str, Handler, bool]] = []


def _command(name: str, mutates_session: bool = False) -> Callable[[Handler], Handler]:
    def decorator(func: Handler) -> Handler:
        _COMMANDS.append((name, func, mutates_session))
        return func

    return decorator


_LITELLM_ARGS = (
    "provider",
    "model",
    "api_base",
    "api_key_env",
    "temperature",
    "max_tokens",
    "num_retries",
    "cache",
)
_DUMMY_ARGS = ("provider", "model", "answers", "follow_examples")


def _dummy_answers(command: str, answers: Any) -> Any:
    if answers is None:
        return []
    if isinstance(answers, list):
        for i, answer in enumerate(answers):
            if not isinstance(answer, dict):
                raise InvalidArgument(
                    f"{command}: args.answers[{i}] must be an object of output field -> value, "
                    f"got {_describe(answer)}"
                )
        return copy.deepcopy(answers)
    if isinstance(answers, dict):
        for key, answer in answers.items():
            if not isinstance(answer, dict):
                raise InvalidArgument(
                    f"{command}: args.answers[{key!r}] must be an object of output field -> "
                    f"value, got {_describe(answer)}"
                )
        return copy.deepcopy(answers)
    raise InvalidArgument(
        f"{command}: args.answers must be a list of objects (one per LM call) or an object "
        f"mapping prompt text to an answer object, got {_describe(answers)}"
    )


@_command("configure_lm", mutates_session=True)
def configure_lm(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Set the session's language model: {model, api_key_env?, ...} or {provider: "dummy"}."""
    state = _state(ctx)
    command = ctx.command
    provider = _get_str(command, args, "provider", None)
    model = _get_str(command, args, "model", None)
    if provider is None:
        provider = "dummy" if model == "dummy" else "litellm"
    if provider not in PROVIDERS:
        raise InvalidArgument(
            f"{command}: unknown provider {provider!r}; allowed: {_names(PROVIDERS)}"
        )
    # Arguments are checked before DSPy is imported: a mistake costs no import.
    if provider == "dummy":
        _check_known(command, args, _DUMMY_ARGS)
        if model not in (None, "dummy"):
            raise InvalidArgument(
                f"{command}: provider 'dummy' takes no model (or model 'dummy'), got {model!r}"
            )
        answers = _dummy_answers(command, args.get("answers"))
        follow_examples = _get_bool(command, args, "follow_examples", False)
        lm = scripted_lm_class()(answers, follow_examples=follow_examples)
        # One scripted answer per LM call: no second call through the JSON adapter.
        adapter = load_dspy().ChatAdapter(use_json_adapter_fallback=False)
        info = {
            "provider": "dummy",
            "model": "dummy",
            "answers": len(answers),
            "follow_examples": follow_examples,
        }
        state.set_lm(lm, info, adapter)
        return dict(info)

    _check_known(command, args, _LITELLM_ARGS)
    if model is None:
        raise InvalidArgument(
            f'{command}: args.model is required, e.g. "openai/gpt-4o-mini" (or provider '
            '"dummy" for a scripted test model)'
        )
    api_base = _get_str(command, args, "api_base", None)
    api_key_env = _get_str(command, args, "api_key_env", None)
    temperature = _get_number(command, args, "temperature")
    max_tokens = _get_int(command, args, "max_tokens", None, minimum=1)
    num_retries = _get_int(command, args, "num_retries", DEFAULT_NUM_RETRIES)
    cache = _get_bool(command, args, "cache", False)
    kwargs: Dict[str, Any] = {"cache": cache, "num_retries": num_retries}
    if temperature is not None:
        kwargs["temperature"] = temperature
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    if api_base is not None:
        kwargs["api_base"] = api_base
    if api_key_env is not None:
        if not _ENV_NAME.match(api_key_env):
            raise InvalidArgument(
                f"{command}: args.api_key_env must name an environment variable (letters, "
                f"digits, underscores), got {api_key_env!r}"
            )
        key = os.environ.get(api_key_env)
        if not key:
            raise ApiKeyMissing(
                f"environment variable {api_key_env!r} (args.api_key_env) is "
                f"{'empty' if key == '' else 'not set'} in worker {ctx.worker_id!r} (pid "
                f"{os.getpid()}); set it in the environment the pool starts its workers with "
                "(the key itself is never sent over the wire)"
            )
        kwargs["api_key"] = key
    try:
        lm = load_dspy().LM(model, **kwargs)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"{command}: DSPy rejected the LM settings: {exc}") from exc
    info = {
        "provider": "litellm",
        "model": model,
        "api_base": api_base,
        "api_key_env": api_key_env,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "num_retries": num_retries,
        "cache": cache,
    }
    state.set_lm(lm, info, None)
    return dict(info)


def _check_record(
    command: str,
    record: Any,
    where: str,
    program_inputs: List[FieldSpec],
    program_outputs: List[FieldSpec],
    extra_allowed: Tuple[str, ...],
) -> Dict[str, Any]:
    if not isinstance(record, dict):
        raise InvalidArgument(
            f"{command}: {where} must be an object of field -> value, got {_describe(record)}"
        )
    declared = [field.name for field in program_inputs + program_outputs]
    missing = [name for name in declared if name not in record]
    unknown = [key for key in record if key not in declared and key not in extra_allowed]
    if unknown:
        raise InvalidArgument(
            f"{command}: {where} has unknown field(s) {_quoted(unknown)}; the signature's "
            f"fields are: {_names(declared)}"
        )
    if missing:
        raise InvalidArgument(
            f"{command}: {where} lacks field(s) {_quoted(missing)}; it needs every input "
            f"and output field: {_names(declared)}"
        )
    return record


def _examples(command: str, records: Any, name: str, program: Program) -> List[Any]:
    dspy = load_dspy()
    if not isinstance(records, list):
        raise InvalidArgument(
            f"{command}: args.{name} must be a list of objects holding the input and output "
            f"fields, got {_describe(records)}"
        )
    extra: Tuple[str, ...] = ("reasoning",) if program.type == "chain_of_thought" else ()
    input_names = [field.name for field in program.inputs]
    examples = []
    for i, record in enumerate(records):
        record = _check_record(
            command, record, f"args.{name}[{i}]", program.inputs, program.outputs, extra
        )
        examples.append(dspy.Example(**copy.deepcopy(record)).with_inputs(*input_names))
    return examples


def _load_state(command: str, program: Program, state: Any) -> None:
    """Load a ``dump_program_state`` state into ``program``; leave it untouched on failure."""
    if not isinstance(state, dict):
        raise InvalidState(
            f"{command}: state must be an object from dump_program_state, got {_describe(state)}"
        )
    state = copy.deepcopy(state)
    for name, predictor in program.predictors():
        part = state if name == "self" else state.get(name)
        where = "state" if name == "self" else f"state[{name!r}]"
        if not isinstance(part, dict):
            raise InvalidState(
                f"{command}: {where} is missing or not an object; program "
                f"{program.program_id!r} is a {program.type} program ({program.signature_text()})"
            )
        unknown = [key for key in part if key not in _PREDICTOR_STATE_KEYS]
        if unknown:
            raise InvalidState(
                f"{command}: {where} has unknown key(s) {_quoted(unknown)}; a predictor state "
                f"has: {_names(sorted(_PREDICTOR_STATE_KEYS))}"
            )
        # A predictor's own LM would bypass the session's LM: programs always use the latter.
        part["lm"] = None
        demos = part.get("demos", [])
        if not isinstance(demos, list) or not all(isinstance(demo, dict) for demo in demos):
            raise InvalidState(f"{command}: {where}.demos must be a list of objects")
        signature = part.get("signature")
        fields = signature.get("fields") if isinstance(signature, dict) else None
        expected = len(predictor.signature.fields)
        if not isinstance(fields, list) or len(fields) != expected:
            found = len(fields) if isinstance(fields, list) else "no"
            raise InvalidState(
                f"{command}: {where}.signature has {found} fields but program "
                f"{program.program_id!r} ({program.signature_text()}, {program.type}) has "
                f"{expected}; the state comes from a different signature"
            )
    if program.type == "chain_of_thought":
        unknown = [key for key in state if key not in dict(program.predictors())]
        if unknown:
            raise InvalidState(f"{command}: state has unknown key(s) {_quoted(unknown)}")
    try:
        program.module.load_state(state)
    except Exception as exc:
        raise InvalidState(
            f"{command}: state does not fit program {program.program_id!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _dump_state(program: Program) -> Dict[str, Any]:
    state: Dict[str, Any] = _jsonable(program.module.dump_state())
    return state


_CREATE_ARGS = (
    "signature",
    "type",
    "program_type",
    "instructions",
    "demos",
    "state",
    "program_id",
    "id",
)


@_command("create_program", mutates_session=True)
def create_program(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Create a Predict or ChainOfThought program from a signature; returns its id."""
    state = _state(ctx)
    command = ctx.command
    _check_known(command, args, _CREATE_ARGS)
    for alias, name in (("id", "program_id"), ("program_type", "type")):
        if alias in args:
            if name in args and args[name] != args[alias]:
                raise InvalidArgument(f"{command}: give args.{name} or args.{alias}, not both")
            args = {**args, name: args[alias]}
    program_type = _get_str(command, args, "type", "predict")
    if program_type not in PROGRAM_TYPES:
        raise InvalidArgument(
            f"{command}: unknown program type {program_type!r}; allowed: {_names(PROGRAM_TYPES)}"
        )
    program_id = _get_str(command, args, "program_id", None)
    if program_id is not None:
        if len(program_id) > _MAX_PROGRAM_ID_CHARS:
            raise InvalidArgument(
                f"{command}: args.program_id is longer than {_MAX_PROGRAM_ID_CHARS} characters"
            )
        if program_id in state.programs:
            raise InvalidArgument(
                f"{command}: program {program_id!r} already exists in session "
                f"{ctx.session_id!r}; delete it first or choose another id"
            )

    signature = args.get("signature")
    instructions = _get_str(command, args, "instructions", None)
    if isinstance(signature, str):
        inputs, outputs = parse_signature_text(signature)
    elif isinstance(signature, dict):
        if instructions is not None:
            raise InvalidArgument(
                f"{command}: args.instructions goes with a string signature; put it in "
                "signature.instructions"
            )
        inputs, outputs, instructions = parse_signature_dict(signature)
    elif signature is None:
        raise InvalidArgument(
            f"{command}: args.signature is required: a string such as 'question -> answer' or "
            "an object {instructions?, inputs: [{name, type?, desc?}], outputs: [...]}"
        )
    else:
        raise InvalidSignature(
            f"signature must be a string or an object, got {_describe(signature)}"
        )
    demos = args.get("demos")
    program_state = args.get("state")
    if demos is not None and program_state is not None:
        raise InvalidArgument(f"{command}: give args.demos or args.state, not both")

    dspy = load_dspy()
    _check_field_set(inputs, outputs, program_type)
    dspy_signature = _build_signature(inputs, outputs, instructions)
    if program_type == "predict":
        module = dspy.Predict(dspy_signature)
    else:
        module = dspy.ChainOfThought(dspy_signature)
    program = Program(program_id or "", program_type, inputs, outputs, module)
    if demos is not None:
        examples = _examples(command, demos, "demos", program)
        for _, predictor in program.predictors():
            predictor.demos = list(examples)
    if program_state is not None:
        _load_state(command, program, program_state)
    program.program_id = program_id or state.next_program_id()
    state.programs[program.program_id] = program
    return {
        "program_id": program.program_id,
        "type": program.type,
        "signature": program.describe_signature(),
    }


@_command("execute_program")
def execute_program(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Run a program on args.inputs with the session's LM; returns typed outputs."""
    state = _state(ctx)
    command = ctx.command
    _check_known(command, args, ("program_id", "inputs"))
    program = _program(state, ctx, args)
    inputs = args.get("inputs")
    if inputs is None:
        inputs = {}
    if not isinstance(inputs, dict):
        raise InvalidArgument(
            f"{command}: args.inputs must be an object of input field -> value, got "
            f"{_describe(inputs)}"
        )
    expected = [field.name for field in program.inputs]
    missing = [name for name in expected if name not in inputs]
    unknown = [name for name in inputs if name not in expected]
    if unknown:
        also = f"; missing: {_quoted(missing)}" if missing else ""
        raise UnknownInput(
            f"program {program.program_id!r} got unknown input(s) {_quoted(unknown)}; it "
            f"expects: {_names(expected)}{also}"
        )
    if missing:
        raise MissingInput(
            f"program {program.program_id!r} is missing input(s) {_quoted(missing)}; it "
            f"expects: {_names(expected)}"
        )
    _require_lm(state, ctx)
    prediction = _run(state, lambda: program.module(**inputs))
    outputs = {field.name: _jsonable(prediction.get(field.name)) for field in program.outputs}
    reasoning = prediction.get("reasoning") if program.type == "chain_of_thought" else None
    usage = None
    get_usage = getattr(prediction, "get_lm_usage", None)
    if callable(get_usage):
        usage = get_usage() or None
    return {
        "outputs": outputs,
        "reasoning": None if reasoning is None else str(reasoning),
        "usage": _jsonable(usage),
    }


def _text(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(_jsonable(value), sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError):
            text = str(value)
    return " ".join(text.split()).casefold()


def _make_metric(name: str, output_names: List[str]) -> Callable[..., bool]:
    def fields(example: Any, prediction: Any) -> Iterator[Tuple[str, str]]:
        for field in output_names:
            predicted = prediction.get(field) if hasattr(prediction, "get") else None
            yield _text(example[field]), "" if predicted is None else _text(predicted)

    if name == "exact_match":

        def exact_match(example: Any, prediction: Any, trace: Any = None) -> bool:
            return all(expected == got for expected, got in fields(example, prediction))

        return exact_match

    def contains(example: Any, prediction: Any, trace: Any = None) -> bool:
        return all(expected in got for expected, got in fields(example, prediction))

    return contains


class _NoProgressBars:
    """Stands in for the ``tqdm`` module: ``tqdm.tqdm(iterable)`` returns the iterable."""

    @staticmethod
    def tqdm(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
        return iterable


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Keep the optimizer's tqdm progress bar out of stderr, the worker's log channel.

    ``BootstrapFewShot`` draws one over the trainset and offers no switch (tqdm reads
    ``TQDM_DISABLE`` only when it is imported). Its module's ``tqdm`` is swapped for the
    duration of the call (a worker serves one call at a time) and restored afterwards.
    """
    load_dspy()
    import dspy.teleprompt.bootstrap as bootstrap

    original = getattr(bootstrap, "tqdm", None)
    if original is None or not callable(getattr(original, "tqdm", None)):
        yield
        return
    bootstrap.tqdm = _NoProgressBars
    try:
        yield
    finally:
        bootstrap.tqdm = original


_OPTIMIZE_ARGS = (
    "program_id",
    "trainset",
    "metric",
    "optimizer",
    "max_bootstrapped_demos",
    "max_labeled_demos",
    "k",
)


@_command("optimize_program", mutates_session=True)
def optimize_program(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Compile a program with BootstrapFewShot or LabeledFewShot on args.trainset."""
    state = _state(ctx)
    command = ctx.command
    _check_known(command, args, _OPTIMIZE_ARGS)
    program = _program(state, ctx, args)
    optimizer = _get_str(command, args, "optimizer", "bootstrap_few_shot")
    if optimizer not in OPTIMIZERS:
        raise InvalidArgument(
            f"{command}: unknown optimizer {optimizer!r}; allowed: {_names(OPTIMIZERS)}"
        )
    metric = _get_str(command, args, "metric", "exact_match")
    if metric not in METRICS:
        raise UnknownMetric(f"unknown metric {metric!r}; allowed: {_names(METRICS)}")
    if optimizer == "labeled_few_shot":
        wrong: List[str] = [
            key for key in ("max_bootstrapped_demos", "max_labeled_demos") if key in args
        ]
    else:
        wrong = ["k"] if "k" in args else []
    if wrong:
        raise InvalidArgument(
            f"{command}: argument(s) {_quoted(wrong)} do not apply to optimizer {optimizer!r}"
        )
    trainset = _examples(command, args.get("trainset"), "trainset", program)
    if not trainset:
        raise InvalidArgument(f"{command}: args.trainset is empty")
    dspy = load_dspy()
    if optimizer == "bootstrap_few_shot":
        _require_lm(state, ctx)
        teleprompter = dspy.BootstrapFewShot(
            metric=_make_metric(metric, [field.name for field in program.outputs]),
            max_bootstrapped_demos=_get_int(
                command, args, "max_bootstrapped_demos", DEFAULT_MAX_BOOTSTRAPPED_DEMOS
            ),
            max_labeled_demos=_get_int(
                command, args, "max_labeled_demos", DEFAULT_MAX_LABELED_DEMOS
            ),
        )
    else:
        teleprompter = dspy.LabeledFewShot(k=_get_int(command, args, "k", DEFAULT_LABELED_K))
    with _no_progress_bars():
        compiled = _run(state, lambda: teleprompter.compile(program.module, trainset=trainset))
    program.module = compiled
    dumped = _dump_state(program)
    ctx.journal_as("load_program_state", {"program_id": program.program_id, "state": dumped})
    return {
        "program_id": program.program_id,
        "optimizer": optimizer,
        "demos": program.demo_count(),
        "state": dumped,
    }


@_command("dump_program_state")
def dump_program_state(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Return a program's state (demos, instructions) as JSON for load_program_state."""
    state = _state(ctx)
    _check_known(ctx.command, args, ("program_id",))
    program = _program(state, ctx, args)
    return {"program_id": program.program_id, "state": _dump_state(program)}


@_command("load_program_state", mutates_session=True)
def load_program_state(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Load a state from dump_program_state (or optimize_program) into a program."""
    state = _state(ctx)
    _check_known(ctx.command, args, ("program_id", "state"))
    program = _program(state, ctx, args)
    if "state" not in args:
        raise InvalidArgument(f"{ctx.command}: args.state is required")
    _load_state(ctx.command, program, args["state"])
    return {"program_id": program.program_id, "demos": program.demo_count()}


@_command("list_programs")
def list_programs(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """The session's programs, in creation order."""
    state = _state(ctx)
    _check_known(ctx.command, args, ())
    return {
        "programs": [
            {
                "program_id": program.program_id,
                "type": program.type,
                "signature": program.signature_text(),
            }
            for program in state.programs.values()
        ]
    }


@_command("get_program_info")
def get_program_info(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """A program's type, signature, instructions and number of demos."""
    state = _state(ctx)
    _check_known(ctx.command, args, ("program_id",))
    program = _program(state, ctx, args)
    return {
        "program_id": program.program_id,
        "type": program.type,
        "signature": program.describe_signature(),
        "demos": program.demo_count(),
        "instructions": program.instructions(),
    }


@_command("delete_program", mutates_session=True)
def delete_program(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Delete a program from the session."""
    state = _state(ctx)
    _check_known(ctx.command, args, ("program_id",))
    program = _program(state, ctx, args)
    del state.programs[program.program_id]
    return {"deleted": program.program_id}


@_command("reset_state", mutates_session=True)
def reset_state(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Drop the session's programs and language model."""
    state = _state(ctx)
    _check_known(ctx.command, args, ())
    count, had_lm = state.clear()
    return {"programs_deleted": count, "lm_cleared": had_lm}


def register_commands(registry: Registry) -> None:
    """Register the DSPy commands and the session cleanup hook into ``registry``."""
    for name, func, mutates_session in _COMMANDS:
        registry.register(name, func, mutates_session=mutates_session)
    registry.on_session_cleanup(cleanup_session_state)


COMMAND_NAMES: Tuple[str, ...] = tuple(name for name, _, _ in _COMMANDS)
"""Names of the DSPy commands."""

register_commands(default_registry)
