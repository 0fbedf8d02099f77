"""Checks of a command's ``args``, for any command module: names, types and ranges.

Each getter reads one argument and returns it (or the default when it is absent or
null), or raises ``InvalidArgument`` with a message naming the command and the argument,
and showing the offending value when it is short. ``check_known`` refuses arguments a
command does not take, so a misspelt setting fails instead of being ignored;
``session_id`` is always allowed (the host adds it to session calls). Standard library
only.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping, Optional, Tuple

MISSING: Any = object()
"""Default of ``get_str``: the argument is required."""


class InvalidArgument(ValueError):
    """An argument is missing, has the wrong type, or has a value that is not allowed."""


def describe(value: Any) -> str:
    """``value`` for an error message: the JSON text and type when short, else the type."""
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else ""
    if text and len(text) <= 60:
        return f"{text} ({type(value).__name__})"
    return f"a value of type {type(value).__name__}"


def names(items: Iterable[Any]) -> str:
    """``a, b, c``."""
    return ", ".join(str(item) for item in items)


def quoted(items: Iterable[Any]) -> str:
    """``'a', 'b', 'c'``."""
    return ", ".join(repr(item) for item in items)


def check_known(command: str, args: Mapping[str, Any], allowed: Tuple[str, ...]) -> None:
    """Refuse any argument outside ``allowed`` (and ``session_id``)."""
    unknown = [key for key in args if key not in allowed and key != "session_id"]
    if unknown:
        raise InvalidArgument(
            f"{command}: unknown argument(s) {quoted(unknown)}; allowed: {names(allowed)}"
        )


def get_str(command: str, args: Mapping[str, Any], name: str, default: Any = MISSING) -> Any:
    """A non-empty string; required unless ``default`` is given."""
    value = args.get(name, MISSING)
    if value is MISSING or value is None:
        if default is MISSING:
            raise InvalidArgument(f"{command}: args.{name} is required (a non-empty string)")
        return default
    if not isinstance(value, str) or not value:
        raise InvalidArgument(
            f"{command}: args.{name} must be a non-empty string, got {describe(value)}"
        )
    return value


def get_bool(command: str, args: Mapping[str, Any], name: str, default: bool) -> bool:
    """``true`` or ``false`` (not 0, 1 or a string)."""
    value = args.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidArgument(
            f"{command}: args.{name} must be true or false, got {describe(value)}"
        )
    return value


def get_int(
    command: str, args: Mapping[str, Any], name: str, default: Optional[int], minimum: int = 0
) -> Optional[int]:
    """An integer of at least ``minimum`` (a boolean is not an integer here)."""
    value = args.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(
            f"{command}: args.{name} must be an integer >= {minimum}, got {describe(value)}"
        )
    return value


def get_number(command: str, args: Mapping[str, Any], name: str) -> Optional[float]:
    """A finite, non-negative number, as a float; ``None`` when absent."""
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{command}: args.{name} must be a number, got {describe(value)}")
    if value < 0:
        raise InvalidArgument(f"{command}: args.{name} must not be negative, got {value}")
    return float(value)
