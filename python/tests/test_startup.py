"""Start-up options: ``--preload``, ``SNAKEPOOL_PRELOAD`` and the default command modules."""

from __future__ import annotations

import sys

import pytest
from conftest import HANDLERS_MODULE, SpawnWorker

from snakepool_worker import runtime
from snakepool_worker.runtime import parse_options


def test_preload_modules_are_imported_and_listed_in_the_manifest(
    spawn_worker: SpawnWorker,
) -> None:
    process = spawn_worker(
        "--preload", "fractions", "--preload", "decimal", env={"SNAKEPOOL_PRELOAD": " decimal ,"}
    )
    manifest = process.handshake()["manifest"]
    assert manifest["preloaded"] == ["decimal", "fractions"]
    assert manifest["modules"] == [HANDLERS_MODULE]
    assert process.result("imported", {"names": ["decimal", "fractions"]}) == {
        "decimal": True,
        "fractions": True,
    }


def test_no_preload_means_an_empty_list(spawn_worker: SpawnWorker) -> None:
    process = spawn_worker()
    assert process.handshake()["manifest"]["preloaded"] == []


def test_preload_runs_after_stdout_is_moved_off_the_protocol(spawn_worker: SpawnWorker) -> None:
    process = spawn_worker("--preload", "preload_prints_for_tests")
    assert process.handshake()["manifest"]["preloaded"] == ["preload_prints_for_tests"]
    assert process.result("echo", {"framed": True}) == {"framed": True}
    assert "preload-module-says-hello" in process.stderr.wait_for("preload-module-says-hello")


@pytest.mark.parametrize(
    "module, fragment",
    [
        ("no_such_module_for_tests", "ModuleNotFoundError"),
        ("broken_module_for_tests", "RuntimeError: intentional import failure"),
    ],
)
def test_preload_failure_exits_3(spawn_worker: SpawnWorker, module: str, fragment: str) -> None:
    process = spawn_worker("--preload", module)
    assert process.wait() == 3
    text = process.stderr.wait_eof()
    summary = text.rstrip().splitlines()[-1]
    assert summary.startswith(f"snakepool_worker: failed to preload module '{module}': ")
    assert fragment in summary


def test_preload_failure_from_environment_exits_3(spawn_worker: SpawnWorker) -> None:
    process = spawn_worker(env={"SNAKEPOOL_PRELOAD": "no_such_module_for_tests"})
    assert process.wait() == 3


def test_journal_field_through_a_real_worker(spawn_worker: SpawnWorker) -> None:
    process = spawn_worker()
    process.handshake()
    reply = process.call("journaled_set", {"session_id": "s", "key": "k", "value": [1, 2]})
    assert reply == {
        "id": reply["id"],
        "success": True,
        "result": {"session_id": "s", "size": 1},
        "journal": {"command": "set_value", "args": {"key": "k", "value": [1, 2]}},
    }
    plain = process.call("set_value", {"session_id": "s", "key": "k", "value": 3})
    assert "journal" not in plain


# -- default modules (in-process: parse_options only finds them, it does not import) -----------


@pytest.fixture
def fake_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        runtime,
        "DEFAULT_MODULES",
        (
            ("default_requirement_for_tests", "default_commands_for_tests"),
            ("no_such_requirement_for_tests", "never_listed_for_tests"),
        ),
    )
    monkeypatch.delenv("SNAKEPOOL_DEFAULT_MODULES", raising=False)
    monkeypatch.delenv("SNAKEPOOL_MODULES", raising=False)
    monkeypatch.delenv("SNAKEPOOL_PRELOAD", raising=False)


@pytest.mark.usefixtures("fake_defaults")
def test_default_modules_come_first_when_their_requirement_is_found() -> None:
    options = parse_options(["--module", "mine", "--module", "default_commands_for_tests"])
    assert options.modules == ["default_commands_for_tests", "mine"]
    assert options.preload == []
    # Found, not imported (importing the stand-in would raise).
    assert "default_requirement_for_tests" not in sys.modules


@pytest.mark.usefixtures("fake_defaults")
@pytest.mark.parametrize("value", ["0", "false", "No", " off "])
def test_default_modules_disabled_by_environment(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("SNAKEPOOL_DEFAULT_MODULES", value)
    assert parse_options(["--module", "mine"]).modules == ["mine"]


@pytest.mark.usefixtures("fake_defaults")
def test_default_modules_disabled_by_flag_and_kept_for_other_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse_options(["--no-default-modules"]).modules == []
    monkeypatch.setenv("SNAKEPOOL_DEFAULT_MODULES", "1")
    assert parse_options([]).modules == ["default_commands_for_tests"]
    monkeypatch.setenv("SNAKEPOOL_MODULES", "from_env")
    monkeypatch.setenv("SNAKEPOOL_PRELOAD", "a,,b")
    options = parse_options(["--preload", "a", "--preload", "c"])
    assert options.modules == ["default_commands_for_tests", "from_env"]
    assert options.preload == ["a", "b", "c"]


def test_dspy_is_the_default_module() -> None:
    assert runtime.DEFAULT_MODULES == (("dspy", "snakepool_worker.dspy"),)


def test_default_modules_follow_what_is_installed(spawn_worker: SpawnWorker) -> None:
    import importlib.util

    worker = spawn_worker(default_modules=True)
    manifest = worker.handshake()["manifest"]
    defaults = ["snakepool_worker.dspy"] if importlib.util.find_spec("dspy") else []
    assert manifest["modules"] == defaults + [HANDLERS_MODULE]
    assert worker.result("imported", {"names": ["dspy"]}) == {"dspy": False}
