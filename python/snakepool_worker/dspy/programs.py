"""Programs: a DSPy module with its declared fields, plus the data that goes in and out.

``program_from_args`` builds a program from ``create_program``'s arguments, and
``program_record`` is what ``dump_program_state`` returns for it (such arguments again);
``examples`` turns demos and trainsets (objects holding every input and output field)
into ``dspy.Example``; ``load_state`` checks a ``dump_program_state`` state against the
program before loading it (a state never gives a program its own LM, and its fields
always come from the program's signature); ``jsonable`` makes DSPy's values plain JSON.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..arguments import InvalidArgument, describe, get_str, names, quoted
from .errors import InvalidSignature, InvalidState
from .loader import load_dspy
from .signatures import (
    FieldSpec,
    build_signature,
    check_field_set,
    parse_signature_dict,
    parse_signature_text,
)

PROGRAM_TYPES: Tuple[str, ...] = ("predict", "chain_of_thought")

MAX_PROGRAM_ID_CHARS = 200
"""Longest program id a client may choose."""

PREDICTOR_STATE_KEYS = frozenset({"traces", "train", "demos", "signature", "lm", "fields"})
"""The keys of one predictor's state in ``dump_program_state``."""


_PLAIN_TYPES = frozenset({str, int, bool, type(None)})
"""The types ``jsonable`` returns values of as they are."""


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data; non-finite floats become null, unknown objects text."""
    kind = type(value)
    if kind in _PLAIN_TYPES:
        return value
    if kind is dict:
        return {
            str(key): item if type(item) in _PLAIN_TYPES else jsonable(item)
            for key, item in value.items()
        }
    if kind is list:
        return [item if type(item) in _PLAIN_TYPES else jsonable(item) for item in value]
    return _converted(value)


def _converted(value: Any) -> Any:
    """``jsonable`` for a value that is not exactly ``None``, a string, an integer, a
    boolean, a dict or a list."""
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(item) for item in value), key=repr)
    for method, kwargs in (("toDict", {}), ("model_dump", {"mode": "json"}), ("item", {})):
        convert = getattr(value, method, None)
        if callable(convert):
            try:
                return jsonable(convert(**kwargs))
            except Exception:
                break
    return str(value)


class Program:
    """One program of a session: its declared fields and the DSPy module.

    ``input_names`` holds the names of ``inputs``, which never change.
    """

    __slots__ = ("program_id", "type", "inputs", "input_names", "outputs", "module")

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
        self.input_names = frozenset(field.name for field in inputs)
        self.outputs = outputs
        self.module = module

    def predictors(self) -> List[Tuple[str, Any]]:
        """The module's ``(name, dspy.Predict)`` pairs as DSPy's ``named_predictors()``
        gives them: ``self`` for a predict program, ``predict`` for a chain of thought.

        Not ``named_predictors()`` itself: it leaves the list it returns in a reference
        cycle (a recursive closure), which keeps the module in memory, after its session
        is dropped, until the cyclic collector next runs on it.
        """
        module = self.module
        if self.type == "predict":
            return [("self", module)]
        return [("predict", module.predict)]

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

        def entry(field: FieldSpec) -> Dict[str, str]:
            info = live.get(field.name)
            extra = (getattr(info, "json_schema_extra", None) or {}) if info is not None else {}
            desc = extra.get("desc", field.desc)
            if not isinstance(desc, str) or desc == f"${{{field.name}}}":
                desc = ""
            return {"name": field.name, "type": field.type, "desc": desc}

        return {
            "instructions": str(signature.instructions),
            "inputs": [entry(field) for field in self.inputs],
            "outputs": [entry(field) for field in self.outputs],
        }


PROTOTYPES = 128
"""Most modules kept, one per program type and signature, to copy new programs from."""

_prototypes: "OrderedDict[Tuple[Any, ...], Any]" = OrderedDict()


def _fields_key(fields: List[FieldSpec]) -> Tuple[Tuple[str, str, str], ...]:
    return tuple((field.name, field.type, field.desc) for field in fields)


def new_module(
    program_type: str, inputs: List[FieldSpec], outputs: List[FieldSpec], instructions: Any
) -> Any:
    """A new ``dspy.Predict`` or ``dspy.ChainOfThought`` for checked fields, copied from
    the prototype of that type and signature (made on first use; the least recently used
    of more than ``PROTOTYPES`` are dropped).

    Building a module from fields makes a new pydantic ``Signature`` class (a chain of
    thought makes a second one with its reasoning field): about 10 KiB each, and a class
    refers to itself (``__mro__``), so it would outlive its dropped session until the
    next full run of the cyclic collector. Copies of a prototype share its classes, as
    the copies DSPy's optimizers make (``deepcopy``, ``reset_copy``) do: neither these
    commands nor DSPy's modules and the optimizers run here change a signature class in
    place (``load_state``, ``with_instructions`` ... make new ones). A program's module
    is then freed by reference counting with its session.
    """
    key = (program_type, _fields_key(inputs), _fields_key(outputs), instructions)
    prototype = _prototypes.get(key)
    if prototype is None:
        dspy = load_dspy()
        signature = build_signature(inputs, outputs, instructions)
        if program_type == "predict":
            prototype = dspy.Predict(signature)
        else:
            prototype = dspy.ChainOfThought(signature)
        _prototypes[key] = prototype
        while len(_prototypes) > PROTOTYPES:
            _prototypes.popitem(last=False)
    else:
        _prototypes.move_to_end(key)
    return prototype.deepcopy()


def build_program(
    program_type: str,
    inputs: List[FieldSpec],
    outputs: List[FieldSpec],
    instructions: Any,
    program_id: str = "",
) -> Program:
    """A new Predict or ChainOfThought program for checked fields (no demos yet)."""
    check_field_set(inputs, outputs, program_type)
    module = new_module(program_type, inputs, outputs, instructions)
    return Program(program_id, program_type, inputs, outputs, module)


def _signature_of(
    command: str, args: Mapping[str, Any]
) -> Tuple[List[FieldSpec], List[FieldSpec], Optional[str]]:
    """``(inputs, outputs, instructions)`` from ``args.signature`` and ``args.instructions``."""
    signature = args.get("signature")
    instructions = get_str(command, args, "instructions", None)
    if isinstance(signature, str):
        inputs, outputs = parse_signature_text(signature)
        return inputs, outputs, instructions
    if isinstance(signature, dict):
        if instructions is not None:
            raise InvalidArgument(
                f"{command}: args.instructions goes with a string signature; put it in "
                "signature.instructions"
            )
        return parse_signature_dict(signature)
    if signature is None:
        raise InvalidArgument(
            f"{command}: args.signature is required: a string such as 'question -> answer' or "
            "an object {instructions?, inputs: [{name, type?, desc?}], outputs: [...]}"
        )
    raise InvalidSignature(f"signature must be a string or an object, got {describe(signature)}")


def program_from_args(command: str, args: Mapping[str, Any], program_id: str = "") -> Program:
    """A program from ``create_program``'s ``type``, ``signature``, ``instructions`` and
    ``demos`` or ``state`` (the other arguments are the caller's); ``program_id`` names it."""
    program_type = get_str(command, args, "type", "predict")
    if program_type not in PROGRAM_TYPES:
        raise InvalidArgument(
            f"{command}: unknown program type {program_type!r}; allowed: {names(PROGRAM_TYPES)}"
        )
    inputs, outputs, instructions = _signature_of(command, args)
    demos = args.get("demos")
    program_state = args.get("state")
    if demos is not None and program_state is not None:
        raise InvalidArgument(f"{command}: give args.demos or args.state, not both")
    program = build_program(program_type, inputs, outputs, instructions, program_id)
    if demos is not None:
        demo_examples = examples(command, demos, "demos", program)
        for _, predictor in program.predictors():
            predictor.demos = list(demo_examples)
    if program_state is not None:
        load_state(command, program, program_state)
    return program


def program_record(program: Program) -> Dict[str, Any]:
    """``{program_id, type, signature, state}``: what ``dump_program_state`` returns, and
    ``create_program`` arguments that make the same program again."""
    return {
        "program_id": program.program_id,
        "type": program.type,
        "signature": program.describe_signature(),
        "state": dump_state(program),
    }


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
            f"{command}: {where} must be an object of field -> value, got {describe(record)}"
        )
    declared = [field.name for field in program_inputs + program_outputs]
    missing = [name for name in declared if name not in record]
    unknown = [key for key in record if key not in declared and key not in extra_allowed]
    if unknown:
        raise InvalidArgument(
            f"{command}: {where} has unknown field(s) {quoted(unknown)}; the signature's "
            f"fields are: {names(declared)}"
        )
    if missing:
        raise InvalidArgument(
            f"{command}: {where} lacks field(s) {quoted(missing)}; it needs every input "
            f"and output field: {names(declared)}"
        )
    return record


def examples(command: str, records: Any, name: str, program: Program) -> List[Any]:
    """``args.<name>`` (demos or a trainset) as ``dspy.Example`` objects for ``program``."""
    dspy = load_dspy()
    if not isinstance(records, list):
        raise InvalidArgument(
            f"{command}: args.{name} must be a list of objects holding the input and output "
            f"fields, got {describe(records)}"
        )
    extra: Tuple[str, ...] = ("reasoning",) if program.type == "chain_of_thought" else ()
    input_names = [field.name for field in program.inputs]
    result = []
    for i, record in enumerate(records):
        record = _check_record(
            command, record, f"args.{name}[{i}]", program.inputs, program.outputs, extra
        )
        result.append(dspy.Example(**copy.deepcopy(record)).with_inputs(*input_names))
    return result


def load_state(command: str, program: Program, state: Any) -> None:
    """Load a ``dump_program_state`` state into ``program``; leave it untouched on failure.

    The JSON DSPy's ``program.save(path)`` writes is such a state plus a ``metadata``
    object (the versions it was saved with), which is set aside.
    """
    if not isinstance(state, dict):
        raise InvalidState(
            f"{command}: state must be an object from dump_program_state, got {describe(state)}"
        )
    state = copy.deepcopy(state)
    if isinstance(state.get("metadata"), dict):
        del state["metadata"]
    for name, predictor in program.predictors():
        part = state if name == "self" else state.get(name)
        where = "state" if name == "self" else f"state[{name!r}]"
        if not isinstance(part, dict):
            raise InvalidState(
                f"{command}: {where} is missing or not an object; program "
                f"{program.program_id!r} is a {program.type} program ({program.signature_text()})"
            )
        unknown = [key for key in part if key not in PREDICTOR_STATE_KEYS]
        if unknown:
            raise InvalidState(
                f"{command}: {where} has unknown key(s) {quoted(unknown)}; a predictor state "
                f"has: {names(sorted(PREDICTOR_STATE_KEYS))}"
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
            raise InvalidState(f"{command}: state has unknown key(s) {quoted(unknown)}")
    unchanged = _unchanged_signatures(program, state)
    try:
        # What the module's ``load_state`` does, one predictor at a time (see
        # ``Program.predictors``). A predictor checks the whole of its part before it
        # changes anything, and every program has one predictor.
        for name, predictor in program.predictors():
            predictor.load_state(state if name == "self" else state[name])
    except Exception as exc:
        raise InvalidState(
            f"{command}: state does not fit program {program.program_id!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    predictors = dict(program.predictors())
    for name, signature in unchanged.items():
        predictors[name].signature = signature


def _unchanged_signatures(program: Program, state: Dict[str, Any]) -> Dict[str, Any]:
    """The predictors (by name) whose signature ``state`` leaves as it is, with that
    signature class.

    DSPy's ``load_state`` always makes a new signature class, even for the instructions
    and field prefixes and descriptions the predictor's class already has (as in every
    rebuilt session). Such a class is equal to the one it replaces in every respect but
    identity, so the predictor keeps its own, which it shares (see ``new_module``).
    """
    unchanged = {}
    for name, predictor in program.predictors():
        part = state if name == "self" else state[name]
        signature = predictor.signature
        if part.get("signature") == signature.dump_state():
            unchanged[name] = signature
    return unchanged


def dump_state(program: Program) -> Dict[str, Any]:
    """The program's state (demos, instructions) as JSON data: the module's
    ``dump_state``, one predictor at a time (see ``Program.predictors``)."""
    parts = {name: predictor.dump_state() for name, predictor in program.predictors()}
    state: Dict[str, Any] = jsonable(parts["self"] if program.type == "predict" else parts)
    return state
