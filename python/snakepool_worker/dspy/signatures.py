"""Signatures: the fields a program declares, parsed from text or JSON and checked.

``"a, b: int -> c: list[str]"`` or ``{instructions?, inputs: [{name, type?, desc?}],
outputs: [...]}``; types are ``ALLOWED_TYPES``. Field names are identifiers that do not
start with ``_``, are not Python keywords, do not name an attribute of
``dspy.Signature`` and are not ``RESERVED_FIELD_NAMES``; each is declared once.
"""

from __future__ import annotations

import keyword
import sys
from typing import Any, Dict, List, Optional, Tuple

from ..arguments import describe, names, quoted
from .errors import InvalidSignature, ReservedFieldName, UnsupportedType
from .loader import load_dspy

ALLOWED_TYPES: Tuple[str, ...] = ("str", "int", "float", "bool", "list[str]", "dict")

RESERVED_FIELD_NAMES: Tuple[str, ...] = (
    "config",
    "demos",
    "lm",
    "new_signature",
    "prediction",
    "signature",
    "_trace",
)
"""Keyword arguments ``dspy.Predict`` takes from a call's inputs as options, not as fields.

``Predict._forward_preprocess`` pops ``signature``, ``demos``, ``config`` (merged into
the LM call's settings), ``lm`` and ``prediction`` (sent to the provider), refuses
``new_signature``, and ``_forward_postprocess`` pops ``_trace``. An input under one of
these names would reach DSPy as that option, so no field may have one.
"""


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
            f"allowed types: {names(ALLOWED_TYPES)}"
        )
    return normalized


def reserved_error(fields: List[str], where: str) -> ReservedFieldName:
    """``ReservedFieldName`` for ``fields`` found at ``where``, listing the reserved names."""
    plural = "s" if len(fields) > 1 else ""
    return ReservedFieldName(
        f"{where}: field name{plural} {quoted(fields)} {'are' if plural else 'is'} reserved: "
        "DSPy takes an input of that name as a call option, not as a field; reserved names: "
        f"{names(RESERVED_FIELD_NAMES)}"
    )


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidSignature(
            f"{where}: field name must be a non-empty string, got {describe(name)}"
        )
    if name in RESERVED_FIELD_NAMES:
        raise reserved_error([name], where)
    if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
        raise InvalidSignature(
            f"{where}: field name {name!r} is not usable; names are identifiers "
            "(letters, digits, underscores; not starting with a digit or an underscore, "
            "not a Python keyword)"
        )
    # Interned, as Python interns attribute names. Field names are looked up on classes
    # (here, and in DSPy and pydantic), and the interpreter's type attribute cache keeps
    # the name strings it was last asked for: a new copy from each request would be kept
    # there, amid memory of the sessions, and keep that memory from the system after the
    # sessions are dropped.
    return sys.intern(name)


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
                f"write '{name}' or '{name}: TYPE' with TYPE one of {names(ALLOWED_TYPES)}"
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
            f"{where} must be an object {{name, type?, desc?}}, got {describe(entry)}"
        )
    unknown = [key for key in entry if key not in ("name", "type", "desc", "description")]
    if unknown:
        raise InvalidSignature(
            f"{where} has unknown key(s) {quoted(unknown)}; allowed: name, type, desc"
        )
    name = _check_name(entry.get("name"), where)
    type_value = entry.get("type", "str")
    if type_value is None:
        type_value = "str"
    if not isinstance(type_value, str):
        raise UnsupportedType(
            f"field {name!r} has unsupported type {describe(type_value)}; "
            f"allowed types: {names(ALLOWED_TYPES)}"
        )
    desc = entry.get("desc", entry.get("description", ""))
    if desc is None:
        desc = ""
    if not isinstance(desc, str):
        raise InvalidSignature(f"{where}: desc must be a string, got {describe(desc)}")
    return FieldSpec(name, _check_type(type_value, name), desc)


def parse_signature_dict(
    signature: Dict[str, Any],
) -> Tuple[List[FieldSpec], List[FieldSpec], Optional[str]]:
    """Parse ``{instructions?, inputs: [...], outputs: [...]}``."""
    unknown = [key for key in signature if key not in ("instructions", "inputs", "outputs")]
    if unknown:
        raise InvalidSignature(
            f"signature has unknown key(s) {quoted(unknown)}; allowed: instructions, inputs, "
            "outputs"
        )
    instructions = signature.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidSignature(
            f"signature.instructions must be a string, got {describe(instructions)}"
        )
    sides: List[List[FieldSpec]] = []
    for kind in ("inputs", "outputs"):
        entries = signature.get(kind)
        if not isinstance(entries, list) or not entries:
            raise InvalidSignature(
                f"signature.{kind} must be a non-empty list of {{name, type?, desc?}} objects, "
                f"got {describe(entries)}"
            )
        sides.append(
            [_parse_field_dict(entry, f"signature.{kind}[{i}]") for i, entry in enumerate(entries)]
        )
    return sides[0], sides[1], instructions or None


def check_field_set(inputs: List[FieldSpec], outputs: List[FieldSpec], program_type: str) -> None:
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


def build_signature(
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
