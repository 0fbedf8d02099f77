"""The command registry, the decorator forms and the per-call Context."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Tuple

import pytest

import snakepool_worker
from snakepool_worker import Context, command, on_session_cleanup
from snakepool_worker.registry import Registry, default_registry, first_doc_line


def test_public_api() -> None:
    assert snakepool_worker.PROTOCOL_VERSION == 1
    assert snakepool_worker.__version__ == "0.1.0"
    assert set(snakepool_worker.__all__) == {
        "command",
        "Context",
        "Final",
        "on_session_cleanup",
        "session_restore",
        "session_snapshot",
        "PROTOCOL_VERSION",
        "__version__",
    }
    assert callable(command) and callable(on_session_cleanup)


def test_decorator_forms_register_under_the_right_names() -> None:
    registry = Registry()

    @registry.command("plus")
    def add(args: Dict[str, Any], ctx: Context) -> int:
        return 1

    @registry.command()
    def minus(args: Dict[str, Any], ctx: Context) -> int:
        return 2

    @registry.command
    def bare(args: Dict[str, Any], ctx: Context) -> int:
        return 3

    @registry.command(name="named", mutates_session=True)
    def other(args: Dict[str, Any], ctx: Context) -> int:
        return 4

    assert registry.names() == ["bare", "minus", "named", "plus"]
    # The decorator returns the function unchanged.
    assert add({}, Context("w")) == 1 and bare({}, Context("w")) == 3
    assert registry.get("plus").func is add  # type: ignore[union-attr]
    assert registry.get("named").mutates_session is True  # type: ignore[union-attr]
    assert registry.get("minus").mutates_session is False  # type: ignore[union-attr]
    assert registry.get("missing") is None
    assert "plus" in registry and len(registry) == 4


def test_duplicate_name_raises_value_error_naming_both_functions() -> None:
    registry = Registry()

    @registry.command("same")
    def first(args: Dict[str, Any], ctx: Context) -> None:
        return None

    with pytest.raises(ValueError) as info:

        @registry.command("same")
        def second(args: Dict[str, Any], ctx: Context) -> None:
            return None

    message = str(info.value)
    assert "'same'" in message
    assert "first" in message and "second" in message
    assert registry.get("same").func is first  # type: ignore[union-attr]


def test_invalid_names_and_handlers_are_rejected() -> None:
    registry = Registry()
    with pytest.raises(ValueError):
        registry.register("", lambda args, ctx: None)
    with pytest.raises(TypeError):
        registry.register("x", "not callable")  # type: ignore[arg-type]


def test_version_changes_with_the_command_set() -> None:
    registry = Registry()
    before = registry.version
    registry.register("a", lambda args, ctx: None)
    assert registry.version == before + 1


def test_manifest_description_uses_first_docstring_line() -> None:
    def documented(args: Dict[str, Any], ctx: Context) -> None:
        """

        First real line.

        More text.
        """

    def undocumented(args: Dict[str, Any], ctx: Context) -> None:
        pass

    assert first_doc_line(documented) == "First real line."
    assert first_doc_line(undocumented) == ""
    registry = Registry()
    registry.register("d", documented, mutates_session=True)
    assert registry.get("d").describe() == {  # type: ignore[union-attr]
        "mutates_session": True,
        "doc": "First real line.",
    }


def test_internal_commands_are_flagged_in_the_manifest_entry() -> None:
    registry = Registry()

    def handler(args: Dict[str, Any], ctx: Context) -> None:
        """Host only."""

    registry.register("host_only", handler, internal=True)

    @registry.command("public")
    def public(args: Dict[str, Any], ctx: Context) -> None:
        pass

    @registry.command("internal_journaled", mutates_session=True, internal=True)
    def internal_journaled(args: Dict[str, Any], ctx: Context) -> None:
        pass

    @registry.command(internal=True)
    def bare_internal(args: Dict[str, Any], ctx: Context) -> None:
        pass

    assert registry.get("host_only").describe() == {  # type: ignore[union-attr]
        "mutates_session": False,
        "doc": "Host only.",
        "internal": True,
    }
    # Public commands keep the entry they always had: no "internal" key means public.
    assert registry.get("public").describe() == {  # type: ignore[union-attr]
        "mutates_session": False,
        "doc": "",
    }
    assert registry.get("internal_journaled").describe() == {  # type: ignore[union-attr]
        "mutates_session": True,
        "doc": "",
        "internal": True,
    }
    assert registry.get("bare_internal").internal is True  # type: ignore[union-attr]
    assert registry.get("public").internal is False  # type: ignore[union-attr]


def test_module_level_decorator_takes_the_internal_flag() -> None:
    @command("registry_test_internal_command", internal=True)
    def handler(args: Dict[str, Any], ctx: Context) -> str:
        return "ok"

    spec = default_registry.get("registry_test_internal_command")
    assert spec is not None and spec.internal is True
    assert spec.describe()["internal"] is True


def test_module_level_decorator_uses_the_default_registry() -> None:
    @command("registry_test_default_command")
    def handler(args: Dict[str, Any], ctx: Context) -> str:
        """Registered by the registry tests."""
        return "ok"

    spec = default_registry.get("registry_test_default_command")
    assert spec is not None and spec.func is handler
    assert spec.log.name == __name__


def test_cleanup_hooks_run_in_order_and_failures_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = Registry()
    calls: List[Tuple[str, str, Dict[str, Any]]] = []

    @registry.on_session_cleanup
    def first(session_id: str, session: Dict[str, Any]) -> None:
        calls.append(("first", session_id, session))

    @registry.on_session_cleanup
    def broken(session_id: str, session: Dict[str, Any]) -> None:
        raise RuntimeError("hook failed")

    @registry.on_session_cleanup
    def last(session_id: str, session: Dict[str, Any]) -> None:
        calls.append(("last", session_id, session))

    with caplog.at_level(logging.ERROR):
        failures = registry.run_cleanup_hooks("s1", {"k": 1})
    assert failures == 1
    assert calls == [("first", "s1", {"k": 1}), ("last", "s1", {"k": 1})]
    assert "broken" in caplog.text and "hook failed" in caplog.text


def test_context_session_is_created_on_first_use_and_kept() -> None:
    sessions: Dict[str, Dict[str, Any]] = {}
    ctx = Context("w1", "s1", request_id=5, command="cmd", sessions=sessions)
    assert sessions == {}  # nothing is stored until the session is used
    ctx.session["key"] = "value"
    assert sessions == {"s1": {"key": "value"}}
    again = Context("w1", "s1", sessions=sessions)
    assert again.session is sessions["s1"]
    other = Context("w1", "s2", sessions=sessions)
    assert other.session == {}
    assert sessions["s1"] == {"key": "value"} and sessions["s2"] == {}
    assert (ctx.worker_id, ctx.session_id, ctx.request_id, ctx.command) == ("w1", "s1", 5, "cmd")


def test_context_without_session_id_gets_a_fresh_unstored_dict() -> None:
    sessions: Dict[str, Dict[str, Any]] = {}
    ctx = Context("w1", None, sessions=sessions)
    ctx.session["scratch"] = 1
    assert ctx.session == {"scratch": 1}
    assert Context("w1", None, sessions=sessions).session == {}
    assert sessions == {}


def test_context_has_slots_and_a_logger() -> None:
    ctx = Context("w1")
    assert isinstance(ctx.log, logging.Logger)
    with pytest.raises(AttributeError):
        ctx.unexpected = 1  # type: ignore[attr-defined]
    assert "w1" in repr(ctx)
