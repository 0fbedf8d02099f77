"""Argument schemas: ``@command(..., args_schema=...)``, checked at registration, carried
in the manifest, never applied to a call."""

from __future__ import annotations

import json
from typing import Any, Dict

import pytest

from snakepool_worker import Context, command
from snakepool_worker.builtins import (
    BUILTIN_ARGS_SCHEMAS,
    BUILTIN_COMMANDS,
    INTERNAL_BUILTINS,
    register_builtins,
)
from snakepool_worker.registry import Registry, checked_args_schema, default_registry
from snakepool_worker.runtime import Runtime

ADD_SCHEMA: Dict[str, Any] = {
    "type": "object",
    "properties": {
        "a": {"type": "number", "description": "First term."},
        "b": {"type": "number", "description": "Second term."},
    },
    "required": ["a", "b"],
}


def handler(args: Dict[str, Any], ctx: Context) -> Any:
    """Add args.a and args.b."""
    return args["a"] + args["b"]


def test_the_manifest_entry_carries_the_schema_only_when_given() -> None:
    registry = Registry()
    registry.register("add", handler, args_schema=ADD_SCHEMA)
    registry.register("plain", handler)
    assert registry.get("add").describe() == {  # type: ignore[union-attr]
        "mutates_session": False,
        "doc": "Add args.a and args.b.",
        "args_schema": ADD_SCHEMA,
    }
    assert "args_schema" not in registry.get("plain").describe()  # type: ignore[union-attr]
    assert registry.get("plain").args_schema is None  # type: ignore[union-attr]


def test_every_decorator_form_takes_a_schema() -> None:
    registry = Registry()
    registry.command("named", args_schema=ADD_SCHEMA)(handler)
    registry.command(args_schema=ADD_SCHEMA, mutates_session=True)(handler)

    @command("args_schema_test_module_level", args_schema=ADD_SCHEMA)
    def module_level(args: Dict[str, Any], ctx: Context) -> Any:
        return None

    assert registry.get("named").args_schema == ADD_SCHEMA  # type: ignore[union-attr]
    spec = registry.get("handler")
    assert spec is not None and spec.args_schema == ADD_SCHEMA and spec.mutates_session
    spec = default_registry.get("args_schema_test_module_level")
    assert spec is not None and spec.describe()["args_schema"] == ADD_SCHEMA


def test_the_schema_is_a_json_copy_taken_at_registration() -> None:
    schema: Dict[str, Any] = {
        "type": "object",
        "properties": {"kind": {"type": "string", "enum": ("a", "b")}},
    }
    registry = Registry()
    spec = registry.register("kinds", handler, args_schema=schema)
    schema["properties"]["kind"]["enum"] = ("changed",)
    # Tuples become JSON arrays; a later change to the caller's dict changes nothing.
    assert spec.args_schema == {
        "type": "object",
        "properties": {"kind": {"type": "string", "enum": ["a", "b"]}},
    }
    assert json.loads(json.dumps(spec.describe()))["args_schema"] == spec.args_schema


BAD_SCHEMAS = [
    ([], TypeError, "command 'bad': args_schema must be a dict (a JSON Schema object), got list"),
    (
        {},
        ValueError,
        'command \'bad\': args_schema must describe the args object: "type" must be '
        '"object", got None',
    ),
    ({"type": "array"}, ValueError, '"type" must be "object", got \'array\''),
    (
        {"type": "object", "properties": []},
        ValueError,
        'command \'bad\': args_schema: "properties" must be an object of property schemas',
    ),
    (
        {"type": "object", "properties": {"a": "string"}},
        ValueError,
        "command 'bad': args_schema: properties['a'] must be a schema (an object or a "
        "boolean), got str",
    ),
    (
        {"type": "object", "required": "a"},
        ValueError,
        'command \'bad\': args_schema: "required" must be a list of distinct property names',
    ),
    (
        {"type": "object", "required": ["a", "a"]},
        ValueError,
        '"required" must be a list of distinct property names',
    ),
    (
        {"type": "object", "properties": {"a": {"default": float("nan")}}},
        ValueError,
        "command 'bad': args_schema.properties.a.default holds nan, which JSON cannot carry",
    ),
    (
        {"type": "object", "properties": {"a": {"enum": {1, 2}}}},
        ValueError,
        "command 'bad': args_schema.properties.a.enum holds a set, which is not JSON data",
    ),
    (
        {"type": "object", 1: "x"},
        ValueError,
        "command 'bad': args_schema has the key 1: JSON object keys are strings",
    ),
]


@pytest.mark.parametrize("schema, error, message", BAD_SCHEMAS)
def test_a_bad_schema_fails_registration_naming_the_command(
    schema: Any, error: type, message: str
) -> None:
    registry = Registry()
    with pytest.raises(error) as caught:
        registry.register("bad", handler, args_schema=schema)
    assert message in str(caught.value)
    assert "bad" not in registry
    with pytest.raises(error):
        registry.command("bad", args_schema=schema)(handler)


def test_checked_args_schema_accepts_boolean_property_schemas() -> None:
    schema = {"type": "object", "properties": {"anything": True}, "required": ["anything"]}
    assert checked_args_schema("c", schema) == schema


def test_calls_are_not_checked_against_the_schema() -> None:
    registry = Registry()

    @registry.command("echo", args_schema={**ADD_SCHEMA, "additionalProperties": False})
    def echo(args: Dict[str, Any], ctx: Context) -> Any:
        return args

    runtime = Runtime(registry, worker_id="unit")
    request = {"id": 1, "command": "echo", "args": {"a": "not a number", "c": 3}}
    reply = json.loads(runtime.handle_frame(json.dumps(request).encode()))  # type: ignore[arg-type]
    assert reply == {"id": 1, "success": True, "result": {"a": "not a number", "c": 3}}


def test_every_builtin_has_a_schema_in_the_manifest() -> None:
    registry = Registry()
    register_builtins(registry)
    commands = Runtime(registry, worker_id="unit").manifest()["commands"]
    assert set(BUILTIN_ARGS_SCHEMAS) == set(BUILTIN_COMMANDS)
    for name in BUILTIN_COMMANDS:
        schema = commands[name]["args_schema"]
        assert schema == BUILTIN_ARGS_SCHEMAS[name], name
        assert schema["type"] == "object" and isinstance(schema["properties"], dict), name
        assert set(schema.get("required", [])) <= set(schema["properties"]), name
    assert set(commands["ping"]["args_schema"]["properties"]) == {
        "manifest",
        "initialization",
        "worker_id",
    }
    for name in INTERNAL_BUILTINS - {"shutdown"}:
        assert "session_id" in commands[name]["args_schema"]["required"], name
    assert commands["restore_session"]["args_schema"]["required"] == ["session_id", "parts"]
