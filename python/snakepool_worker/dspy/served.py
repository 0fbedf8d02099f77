"""Served programs: saved programs every worker runs without a session.

``SNAKEPOOL_PROGRAMS`` (set by the host from ``snakepool serve --program NAME=PATH``) is
``{"NAME": {"path": "/abs/file.json", "profile": "PROFILE"}}``. Each file holds what
``dump_program_state`` returns, ``{program_id?, type?, signature, state?}`` (``signature``
as ``create_program`` takes it, ``state`` from ``dump_program_state`` or the JSON DSPy's
``program.save(path)`` writes), optionally with ``instructions`` beside a string
signature. A file must carry its signature: DSPy's own save format names neither the
fields nor their types, so such a file alone is refused with a message saying how to
wrap it.

The files are read once per process (again only if the variable changes): at import of
the DSPy package when the variable is set, so a zygote loads them once for the workers it
forks, or else on first use. Loading starts no thread and never raises: a program whose
entry or file is not usable is logged then, and every call to it fails with
``ServedProgramInvalid`` naming the program and its file. The LM is the operator's
profile, resolved through the LM policy on first use (``LMProfileNotFound`` when the
profile is not defined), and built once per process for all the programs of a profile.

Served programs are shared by every caller of the worker and read-only: callers only run
them (``execute_program {"program": NAME, "inputs"}``), with DSPy's history off and a
trace of their own, so one call leaves nothing in them for the next.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

from ..arguments import describe, names, quoted
from .configure import profile_lm
from .errors import (
    InvalidSignature,
    InvalidState,
    LMProfileInvalid,
    LMProfileNotFound,
    ProgramNotFound,
    ServedProgramInvalid,
)
from .policy import NAME_RULE, lm_profiles, profile_names
from .programs import PROGRAM_TYPES, Program, build_program, load_state
from .signatures import parse_signature_dict, parse_signature_text

PROGRAMS_ENV = "SNAKEPOOL_PROGRAMS"

ENTRY_KEYS: Tuple[str, ...] = ("path", "profile")
"""The keys of one ``SNAKEPOOL_PROGRAMS`` entry."""

FILE_KEYS: Tuple[str, ...] = ("program_id", "type", "signature", "instructions", "state")
"""The keys a served program's file may hold (``program_id`` is ignored)."""

_log = logging.getLogger(__package__)


class ServedProgram:
    """One entry of ``SNAKEPOOL_PROGRAMS``: the loaded program, or why it cannot run."""

    __slots__ = ("name", "path", "profile", "program", "error")

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = ""
        self.profile = ""
        self.program: Optional[Program] = None
        self.error: Optional[str] = None

    def where(self) -> str:
        """``served program 'NAME' (PATH)`` for messages."""
        path = f" ({self.path})" if self.path else ""
        return f"served program {self.name!r}{path}"


class ServedLM:
    """The LM a profile's served programs run with (an ``LMBinding``, see ``state``)."""

    __slots__ = ("lm", "lm_info", "adapter", "response_cache")

    def __init__(self, lm: Any, lm_info: Dict[str, Any], response_cache: Any) -> None:
        self.lm = lm
        self.lm_info = lm_info
        self.adapter = None
        self.response_cache = response_cache


_loaded: Optional[Tuple[str, Dict[str, ServedProgram], Optional[str]]] = None
_lms: Dict[Tuple[Any, ...], ServedLM] = {}


def served_programs() -> Tuple[Dict[str, ServedProgram], Optional[str]]:
    """``(programs by name, why the variable cannot be used or None)``, loaded once."""
    global _loaded
    text = os.environ.get(PROGRAMS_ENV, "")
    loaded = _loaded
    if loaded is None or loaded[0] != text:
        programs, error = _load_all(text)
        loaded = _loaded = (text, programs, error)
    return loaded[1], loaded[2]


def load_if_configured() -> None:
    """Load the served programs now if ``SNAKEPOOL_PROGRAMS`` is set (at import)."""
    if os.environ.get(PROGRAMS_ENV, "").strip():
        served_programs()


def _load_all(text: str) -> Tuple[Dict[str, ServedProgram], Optional[str]]:
    if not text.strip():
        return {}, None
    try:
        data = json.loads(text)
    except ValueError as exc:
        error = f"{PROGRAMS_ENV} is not valid JSON: {exc}"
    else:
        if isinstance(data, dict):
            return {name: _load_one(name, entry) for name, entry in data.items()}, None
        error = (
            f'{PROGRAMS_ENV} must be a JSON object {{NAME: {{"path", "profile"}}}}, got '
            f"{describe(data)}"
        )
    _log.error("no served program can be used: %s", error)
    return {}, error


def _load_one(name: str, entry: Any) -> ServedProgram:
    served = ServedProgram(name)
    try:
        _check_entry(served, entry)
        served.program = _read_program(served)
    except ServedProgramInvalid as exc:
        served.error = str(exc)
    except Exception as exc:  # nothing in a file may stop the worker: report it at use
        served.error = f"{served.where()}: {type(exc).__name__}: {exc}"
    if served.error is not None:
        _log.error("%s; calls to it will fail", served.error)
    return served


def _invalid(served: ServedProgram, message: str) -> ServedProgramInvalid:
    return ServedProgramInvalid(f"{served.where()}: {message}")


def _check_entry(served: ServedProgram, entry: Any) -> None:
    if not NAME_RULE.match(served.name):
        raise _invalid(
            served,
            "the name is not usable; names are 1-128 letters, digits, '_', '.' or '-', "
            "other than '.' and '..'",
        )
    if not isinstance(entry, dict):
        raise _invalid(
            served, f'{PROGRAMS_ENV} must give it {{"path", "profile"}}, got {describe(entry)}'
        )
    unknown = [key for key in entry if key not in ENTRY_KEYS]
    if unknown:
        raise _invalid(
            served,
            f"{PROGRAMS_ENV} gives it unknown key(s) {quoted(unknown)}; allowed: "
            f"{names(ENTRY_KEYS)}",
        )
    path = entry.get("path")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise _invalid(served, f"'path' must be an absolute file path, got {describe(path)}")
    served.path = path
    profile = entry.get("profile")
    if not isinstance(profile, str) or not profile:
        raise _invalid(served, f"it names no LM profile ('profile' is {describe(profile)})")
    served.profile = profile


def _read_program(served: ServedProgram) -> Program:
    path = served.path
    # Checked first: opening a FIFO or a device would block the process.
    if not os.path.isfile(path):
        problem = "is not a regular file" if os.path.exists(path) else "does not exist"
        raise _invalid(served, f"the file {problem}")
    try:
        with open(path, "rb") as file:
            data = json.loads(file.read())
    except (OSError, ValueError) as exc:
        raise _invalid(served, f"the file cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _invalid(
            served,
            f"the file must hold a JSON object {{type?, signature, state?}}, got {describe(data)}",
        )
    signature = data.get("signature")
    dspy_state = isinstance(signature, dict) and "fields" in signature
    if signature is None or dspy_state or "metadata" in data:
        raise _invalid(
            served,
            "the file carries no signature (DSPy's program.save() JSON, like a bare state, names "
            "neither the fields nor their types); save what dump_program_state returns, or "
            'wrap the file as {"signature": "question -> answer", "type": "predict", '
            '"state": <its JSON>}',
        )
    unknown = [key for key in data if key not in FILE_KEYS]
    if unknown:
        raise _invalid(
            served,
            f"the file has unknown key(s) {quoted(unknown)}; allowed: {names(FILE_KEYS)}",
        )
    program_type = data.get("type") or "predict"
    if program_type not in PROGRAM_TYPES:
        raise _invalid(
            served, f"unknown program type {program_type!r}; allowed: {names(PROGRAM_TYPES)}"
        )
    instructions = data.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _invalid(served, f"'instructions' must be a string, got {describe(instructions)}")
    try:
        if isinstance(signature, str):
            inputs, outputs = parse_signature_text(signature)
        elif isinstance(signature, dict):
            if instructions is not None:
                raise _invalid(
                    served, "'instructions' goes with a string signature; put it in the signature"
                )
            inputs, outputs, instructions = parse_signature_dict(signature)
        else:
            raise _invalid(
                served, f"'signature' must be a string or an object, got {describe(signature)}"
            )
        program = build_program(program_type, inputs, outputs, instructions, served.name)
        state = data.get("state")
        if state is not None:
            load_state("the file", program, state)
    except (InvalidSignature, InvalidState) as exc:
        raise _invalid(served, str(exc)) from None
    return program


def find_served(name: str) -> Tuple[ServedProgram, Program]:
    """The served program ``name``, with its program.

    ``ProgramNotFound`` (listing the served programs) for an unknown name,
    ``ServedProgramInvalid`` when its entry or its file is not usable.
    """
    programs, error = served_programs()
    if error is not None:
        raise ServedProgramInvalid(f"served programs cannot be used: {error}")
    served = programs.get(name)
    if served is None:
        if programs:
            known = f"served programs: {names(sorted(programs))}"
        else:
            known = (
                "this worker serves none (the operator serves saved programs with "
                "`snakepool serve --program NAME=PATH`); a session's programs are run with "
                "args.program_id"
            )
        raise ProgramNotFound(f"no served program {name!r} ({known})")
    if served.error is not None or served.program is None:
        raise ServedProgramInvalid(served.error or f"{served.where()} is not loaded")
    return served, served.program


def served_lm(served: ServedProgram, worker_id: str, command: str) -> ServedLM:
    """The LM of ``served``'s profile (built on first use, shared by its programs).

    ``LMProfileNotFound`` when the profile is not defined, ``LMProfileInvalid`` when the
    profiles are malformed, ``ApiKeyMissing`` when its key variable is unset.
    """
    where = served.where()
    try:
        profile = lm_profiles().get(served.profile)
    except LMProfileInvalid as exc:
        raise LMProfileInvalid(f"{where}: {exc}") from None
    if profile is None:
        raise LMProfileNotFound(
            f"{where} runs with LM profile {served.profile!r}, which is not defined; "
            f"profiles: {profile_names()}"
        )
    key = profile.identity()
    binding = _lms.get(key)
    if binding is None:
        lm, info, cache = profile_lm(
            command, profile, worker_id, f"{where}, profile {profile.name!r}"
        )
        binding = _lms[key] = ServedLM(lm, info, cache)
    return binding
