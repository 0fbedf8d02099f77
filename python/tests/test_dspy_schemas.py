"""The DSPy commands' argument schemas against what the commands accept and read.

Each schema must be a JSON Schema object (checked structurally, standard library only),
list exactly the arguments its command accepts (found by exercising the command with an
unknown argument: its ``InvalidArgument`` lists the ones it takes), include every key the
command modules read from ``args``, require what the commands require, and allow the
values (and name the defaults) the commands use.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Dict, Optional, Set

import pytest

dspy = pytest.importorskip("dspy")

from bridge_for_tests import Bridge  # noqa: E402
from conftest import LMEnv  # noqa: E402

import snakepool_worker.dspy as dspy_commands  # noqa: E402
from snakepool_worker.dspy import (  # noqa: E402
    ALLOWED_TYPES,
    COMMAND_NAMES,
    DEFAULT_NUM_RETRIES,
    METRICS,
    OPTIMIZERS,
    PROGRAM_TYPES,
    PROVIDERS,
)
from snakepool_worker.dspy.schemas import ARGS_SCHEMAS  # noqa: E402

TRAINSET = [
    {"question": "What is the capital of Atlantis?", "answer": "Poseidonia"},
    {"question": "What colour is the sky?", "answer": "blue"},
]

JSON_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


@pytest.fixture
def bridge(lm_env: LMEnv) -> Bridge:
    """A runtime whose session ``s1`` has a dummy LM (following its demos) and ``prog_1``
    (``question -> answer``); client LM settings are allowed."""
    lm_env.client_settings("allow")
    bridge = Bridge()
    bridge.ok("configure_lm", provider="dummy", answers=[{"answer": "a"}] * 20)
    bridge.ok("create_program", signature="question -> answer")
    return bridge


def properties(command: str, form: Optional[str] = None) -> Set[str]:
    """The arguments ``command`` takes, in its form titled ``form`` if given."""
    schema = ARGS_SCHEMAS[command]
    if form is not None:
        schema = next(f for f in schema["anyOf"] if f["title"] == form)
    return set(schema["properties"])


def conforms(command: str, args: Dict[str, Any]) -> None:
    """Assert that ``args`` fits the top level of ``command``'s schema: known keys, the
    required ones, and values of the declared types and allowed values."""
    schema = ARGS_SCHEMAS[command]
    props = schema["properties"]
    assert set(args) <= set(props), (command, args)
    assert set(schema.get("required", [])) <= set(args), (command, args)
    for key, value in args.items():
        prop = props[key]
        types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
        assert any(JSON_TYPES[t](value) for t in types), (command, key, value)
        if "enum" in prop:
            assert value in prop["enum"], (command, key, value)
        if "const" in prop:
            assert value == prop["const"], (command, key, value)


def test_every_command_has_a_schema_in_the_manifest(bridge: Bridge) -> None:
    assert set(ARGS_SCHEMAS) == set(COMMAND_NAMES)
    commands = bridge.runtime.manifest()["commands"]
    for name in COMMAND_NAMES:
        assert commands[name]["args_schema"] == ARGS_SCHEMAS[name], name


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_schemas_are_json_schema_objects(command: str) -> None:
    schema = ARGS_SCHEMAS[command]
    assert json.loads(json.dumps(schema)) == schema
    assert schema["type"] == "object"
    assert isinstance(schema["properties"], dict)
    assert set(schema.get("required", [])) <= set(schema["properties"])
    # Like the commands, the schemas refuse arguments they do not list.
    assert schema["additionalProperties"] is False
    for name, prop in schema["properties"].items():
        assert isinstance(prop, dict), (command, name)
        types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
        assert set(types) <= set(JSON_TYPES), (command, name)
        assert isinstance(prop["description"], str) and prop["description"], (command, name)
        if "enum" in prop:
            assert all(any(JSON_TYPES[t](v) for t in types) for v in prop["enum"])
        if "default" in prop:
            assert any(JSON_TYPES[t](prop["default"]) for t in types), (command, name)
    for form in schema.get("anyOf", []):
        assert isinstance(form["title"], str), command
        assert set(form["properties"]) <= set(schema["properties"]), (command, form["title"])
        assert set(form.get("required", [])) <= set(form["properties"]), command
        assert form["additionalProperties"] is False, command


UNKNOWN = "not_an_argument"

ACCEPTED = [
    # (command, session, arguments selecting the form, form title)
    ("configure_lm", "s1", {"profile": "mini"}, "profile"),
    ("configure_lm", "s1", {"provider": "dummy"}, "dummy"),
    ("configure_lm", "s1", {"model": "openai/test-model"}, "model"),
    ("create_program", "s1", {}, None),
    ("execute_program", "s1", {"program_id": "prog_1"}, "session"),
    ("execute_program", None, {"program": "qa"}, "served"),
    ("optimize_program", "s1", {}, None),
    ("dump_program_state", "s1", {}, None),
    ("load_program_state", "s1", {}, None),
    ("list_programs", "s1", {}, None),
    ("get_program_info", "s1", {}, None),
    ("delete_program", "s1", {}, None),
    ("reset_state", "s1", {}, None),
]


@pytest.mark.parametrize("command, session, args, form", ACCEPTED)
def test_a_schema_lists_exactly_the_arguments_its_command_accepts(
    bridge: Bridge, command: str, session: Optional[str], args: Dict[str, Any], form: Optional[str]
) -> None:
    kind, message = bridge.fail(command, session, **args, **{UNKNOWN: 1})
    assert kind == "InvalidArgument", message
    found = re.fullmatch(rf"{command}: unknown argument\(s\) '{UNKNOWN}'; allowed: (.*)", message)
    assert found is not None, message
    accepted = set(found.group(1).split(", ")) - {""}
    assert accepted == properties(command, form)


def test_every_form_and_the_top_level_agree_on_the_arguments() -> None:
    forms = {(command, form) for command, _, _, form in ACCEPTED if form is not None}
    for command in {command for command, _ in forms}:
        union: Set[str] = set()
        for title in (form for name, form in forms if name == command):
            union |= properties(command, title)
        assert union == properties(command), command


def keys_read_from_args(source: str) -> Set[str]:
    """The string keys ``source`` reads from a variable named ``args``: ``args.get("k")``,
    ``args["k"]``, ``"k" in args`` and ``get_str(command, args, "k", ...)`` (any
    ``get_*`` helper of ``snakepool_worker.arguments``)."""

    def is_args(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id == "args"

    def text(node: ast.AST) -> Optional[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return None

    keys: Set[str] = set()
    for node in ast.walk(ast.parse(source)):
        key = None
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "get" and is_args(func.value):
                key = text(node.args[0])
            elif (
                isinstance(func, ast.Name)
                and func.id in ("get_str", "get_bool", "get_int", "get_number")
                and len(node.args) >= 3
                and is_args(node.args[1])
            ):
                key = text(node.args[2])
        elif isinstance(node, ast.Subscript) and is_args(node.value):
            key = text(node.slice)
        elif isinstance(node, ast.Compare) and any(is_args(c) for c in node.comparators):
            key = text(node.left)
        if key is not None:
            keys.add(key)
    return keys


def test_every_key_the_commands_read_is_in_a_schema() -> None:
    package = Path(dspy_commands.__file__).parent
    read: Set[str] = set()
    for path in package.glob("*.py"):
        read |= keys_read_from_args(path.read_text(encoding="utf-8"))
    # The scan sees the reads (a sample of each command module's).
    assert {"profile", "answers", "signature", "demos", "inputs", "trainset", "k"} <= read
    described = set().union(*(properties(name) for name in COMMAND_NAMES))
    assert read <= described, read - described


VALID: Dict[str, Dict[str, Any]] = {
    "configure_lm": {"provider": "dummy", "answers": [{"answer": "b"}]},
    "create_program": {"signature": "question -> answer", "program_id": "other"},
    "execute_program": {"program_id": "prog_1", "inputs": {"question": "q"}},
    "optimize_program": {
        "program_id": "prog_1",
        "trainset": TRAINSET,
        "optimizer": "labeled_few_shot",
    },
    "dump_program_state": {"program_id": "prog_1"},
    "load_program_state": {"program_id": "prog_1", "state": None},
    "list_programs": {},
    "get_program_info": {"program_id": "prog_1"},
    "delete_program": {"program_id": "prog_1"},
    "reset_state": {},
}
"""A call of each command that succeeds in the ``bridge`` fixture's session (the
state to load is filled in from ``dump_program_state``)."""


def valid_args(bridge: Bridge, command: str) -> Dict[str, Any]:
    args = dict(VALID[command])
    if "state" in args:
        args["state"] = bridge.ok("dump_program_state", program_id="prog_1")["state"]
    return args


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_a_call_that_fits_the_schema_succeeds_and_lacking_a_required_argument_fails(
    lm_env: LMEnv, command: str
) -> None:
    def session() -> Bridge:
        bridge = Bridge()
        bridge.ok("configure_lm", provider="dummy", answers=[{"answer": "a"}] * 20)
        bridge.ok("create_program", signature="question -> answer")
        return bridge

    bridge = session()
    args = valid_args(bridge, command)
    conforms(command, args)
    bridge.ok(command, **args)
    for required in ARGS_SCHEMAS[command].get("required", []):
        bridge = session()
        args = valid_args(bridge, command)
        del args[required]
        reply = bridge.reply(command, **args)
        assert reply["success"] is False, (command, required, reply)


def test_allowed_values_are_the_ones_the_commands_take(bridge: Bridge) -> None:
    create = ARGS_SCHEMAS["create_program"]["properties"]
    assert create["type"]["enum"] == list(PROGRAM_TYPES) == ["predict", "chain_of_thought"]
    assert create["program_type"]["enum"] == list(PROGRAM_TYPES)
    for program_type in PROGRAM_TYPES:
        result = bridge.ok("create_program", signature="q -> a", type=program_type)
        assert result["type"] == program_type
        result = bridge.ok("create_program", signature="q -> a", program_type=program_type)
        assert result["type"] == program_type
    # The default, as the command applies it.
    assert bridge.ok("create_program", signature="q -> a")["type"] == create["type"]["default"]
    _, message = bridge.fail("create_program", signature="q -> a", type="react")
    assert "allowed: predict, chain_of_thought" in message

    for side in ("inputs", "outputs"):
        fields = create["signature"]["properties"][side]
        assert fields["items"] == {"$ref": "#/$defs/field"}
    field = ARGS_SCHEMAS["create_program"]["$defs"]["field"]["properties"]
    assert field["type"]["enum"] == list(ALLOWED_TYPES)
    for type_name in ALLOWED_TYPES:
        signature = {"inputs": [{"name": "q", "type": type_name}], "outputs": [{"name": "a"}]}
        bridge.ok("create_program", signature=signature)

    optimize = ARGS_SCHEMAS["optimize_program"]["properties"]
    # The names on the wire, not DSPy's class names.
    assert optimize["optimizer"]["enum"] == ["bootstrap_few_shot", "labeled_few_shot"]
    assert optimize["optimizer"]["enum"] == list(OPTIMIZERS)
    assert optimize["metric"]["enum"] == list(METRICS)
    for optimizer in OPTIMIZERS:
        for metric in METRICS:
            result = bridge.ok(
                "optimize_program",
                program_id="prog_1",
                trainset=TRAINSET,
                optimizer=optimizer,
                metric=metric,
            )
            assert result["optimizer"] == optimizer
    result = bridge.ok("optimize_program", program_id="prog_1", trainset=TRAINSET)
    assert result["optimizer"] == optimize["optimizer"]["default"]
    _, message = bridge.fail(
        "optimize_program", program_id="prog_1", trainset=TRAINSET, optimizer="BootstrapFewShot"
    )
    assert "allowed: bootstrap_few_shot, labeled_few_shot" in message

    configure = ARGS_SCHEMAS["configure_lm"]["properties"]
    assert configure["provider"]["enum"] == list(PROVIDERS)
    dummy = bridge.ok("configure_lm", provider="dummy")
    assert dummy["follow_examples"] is configure["follow_examples"]["default"]
    direct = bridge.ok("configure_lm", provider="litellm", model="openai/test-model")
    assert direct["num_retries"] == configure["num_retries"]["default"] == DEFAULT_NUM_RETRIES
    assert direct["cache"] is configure["cache"]["const"]
