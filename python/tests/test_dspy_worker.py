"""The DSPy commands through real ``python -m snakepool_worker`` processes (DummyLM only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from conftest import HANDLERS_MODULE, SpawnWorker, WorkerProcess
from fake_lm_server import FakeLMServer

pytest.importorskip("dspy")

from snakepool_worker.dspy import COMMAND_NAMES  # noqa: E402

DSPY_MODULE = "snakepool_worker.dspy"
ATLANTIS = "What is the capital of Atlantis?"


def session_call(worker: WorkerProcess, command: str, **args: Any) -> Dict[str, Any]:
    return worker.call(command, {"session_id": "s1", **args})


def session_result(worker: WorkerProcess, command: str, **args: Any) -> Any:
    reply = session_call(worker, command, **args)
    assert reply["success"] is True, reply
    return reply["result"]


def imported(worker: WorkerProcess) -> Dict[str, bool]:
    result: Dict[str, bool] = worker.result("imported", {"names": ["dspy", "litellm"]})
    return result


def test_dspy_module_loads_by_default_without_importing_dspy(spawn_worker: SpawnWorker) -> None:
    worker = spawn_worker(default_modules=True)
    manifest = worker.handshake()["manifest"]
    assert manifest["modules"] == [DSPY_MODULE, HANDLERS_MODULE]
    assert manifest["preloaded"] == []
    for name in COMMAND_NAMES:
        assert name in manifest["commands"], name
    assert manifest["commands"]["optimize_program"]["mutates_session"] is True
    assert manifest["commands"]["execute_program"]["mutates_session"] is False
    assert imported(worker) == {"dspy": False, "litellm": False}

    # The first DSPy command imports DSPy; a dummy LM never needs LiteLLM.
    session_result(worker, "configure_lm", provider="dummy", answers=[{"answer": "42"}])
    assert imported(worker) == {"dspy": True, "litellm": False}
    session_result(worker, "create_program", signature="question -> answer: int")
    result = session_result(
        worker, "execute_program", program_id="prog_1", inputs={"question": "6 x 7?"}
    )
    assert result["outputs"] == {"answer": 42}
    error = worker.call("list_programs", {})["error"]
    assert error["type"] == "SessionRequired"
    assert imported(worker)["litellm"] is False


@pytest.mark.parametrize(
    "extra_args, env",
    [(("--no-default-modules",), {}), ((), {"SNAKEPOOL_DEFAULT_MODULES": "0"})],
)
def test_default_modules_can_be_disabled(
    spawn_worker: SpawnWorker, extra_args: Any, env: Dict[str, str]
) -> None:
    worker = spawn_worker(*extra_args, default_modules=True, env=env)
    manifest = worker.handshake()["manifest"]
    assert manifest["modules"] == [HANDLERS_MODULE]
    assert not set(COMMAND_NAMES) & set(manifest["commands"])
    assert worker.call("create_program", {"session_id": "s"})["error"]["type"] == ("UnknownCommand")


def test_preload_dspy_imports_dspy_but_not_litellm(spawn_worker: SpawnWorker) -> None:
    worker = spawn_worker("--preload", "dspy", default_modules=True)
    manifest = worker.handshake()["manifest"]
    assert manifest["preloaded"] == ["dspy"]
    assert manifest["modules"] == [DSPY_MODULE, HANDLERS_MODULE]
    assert imported(worker) == {"dspy": True, "litellm": False}


def test_optimized_session_rebuilt_on_a_fresh_worker_from_its_journal(
    spawn_worker: SpawnWorker,
) -> None:
    """What the host does when a session's worker dies: replay the journal elsewhere."""
    lm = {"provider": "dummy", "answers": [{"answer": "no idea"}] * 5, "follow_examples": True}
    first = spawn_worker(default_modules=True)
    first.handshake("w1")
    journal: List[Dict[str, Any]] = []

    def call(worker: WorkerProcess, command: str, **args: Any) -> Dict[str, Any]:
        reply = session_call(worker, command, **args)
        assert reply["success"] is True, reply
        if command in ("configure_lm", "create_program", "optimize_program"):
            journal.append(reply.get("journal", {"command": command, "args": args}))
        return reply

    call(first, "configure_lm", **lm)
    call(first, "create_program", signature="question -> answer")
    question = {"question": ATLANTIS}
    before = call(first, "execute_program", program_id="prog_1", inputs=question)
    assert before["result"]["outputs"] == {"answer": "no idea"}
    trainset = [{"question": ATLANTIS, "answer": "Poseidonia"}]
    optimized = call(
        first,
        "optimize_program",
        program_id="prog_1",
        trainset=trainset,
        optimizer="labeled_few_shot",
        k=4,
    )
    assert optimized["result"]["demos"] == 1
    assert optimized["journal"] == {
        "command": "load_program_state",
        "args": {"program_id": "prog_1", "state": optimized["result"]["state"]},
    }
    after = call(first, "execute_program", program_id="prog_1", inputs=question)
    assert after["result"]["outputs"] == {"answer": "Poseidonia"}
    assert [entry["command"] for entry in journal] == [
        "configure_lm",
        "create_program",
        "load_program_state",
    ]

    first.kill()
    second = spawn_worker(default_modules=True)
    second.handshake("w2")
    for entry in journal:
        reply = session_call(second, entry["command"], **entry["args"])
        assert reply["success"] is True and "journal" not in reply, reply
    rebuilt = session_call(second, "execute_program", program_id="prog_1", inputs=question)
    assert rebuilt["result"]["outputs"] == {"answer": "Poseidonia"}


def test_sessions_on_one_worker_and_their_cleanup(spawn_worker: SpawnWorker) -> None:
    worker = spawn_worker(default_modules=True)
    worker.handshake()
    for session, answer in (("one", "from one"), ("two", "from two")):
        args = {"session_id": session, "provider": "dummy", "answers": [{"answer": answer}] * 2}
        assert worker.result("configure_lm", args)["provider"] == "dummy"
        assert worker.result(
            "create_program", {"session_id": session, "signature": "question -> answer"}
        ) == {
            "program_id": "prog_1",
            "type": "predict",
            "signature": {
                "instructions": "Given the fields `question`, produce the fields `answer`.",
                "inputs": [{"name": "question", "type": "str", "desc": ""}],
                "outputs": [{"name": "answer", "type": "str", "desc": ""}],
            },
        }
    for session, answer in (("two", "from two"), ("one", "from one")):
        result = worker.result(
            "execute_program",
            {"session_id": session, "program_id": "prog_1", "inputs": {"question": "who?"}},
        )
        assert result["outputs"] == {"answer": answer}
    assert worker.result("cleanup_session", {"session_id": "one"})["existed"] is True
    error = worker.call("execute_program", {"session_id": "one", "program_id": "prog_1"})["error"]
    assert error["type"] == "ProgramNotFound"
    result = worker.result(
        "execute_program",
        {"session_id": "two", "program_id": "prog_1", "inputs": {"question": "again?"}},
    )
    assert result["outputs"] == {"answer": "from two"}
    assert worker.result("get_stats")["sessions"] == 2  # "two", and the new empty "one"


@pytest.fixture
def server() -> Iterator[FakeLMServer]:
    fake = FakeLMServer()
    yield fake
    fake.close()


def lm_worker_env(home: Path, server: FakeLMServer, **extra: str) -> Dict[str, str]:
    """A worker environment with HOME (and the XDG directories) in an empty directory."""
    home.mkdir()
    profiles = {
        "cached": {
            "model": "openai/test-model",
            "api_base": server.base("a"),
            "api_key_env": "SP_TEST_PROFILE_KEY",
            "num_retries": 0,
            "cache": True,
        },
        "plain": {
            "model": "openai/test-model",
            "api_base": server.base("a"),
            "api_key_env": "SP_TEST_PROFILE_KEY",
            "num_retries": 0,
        },
    }
    env = {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "SP_TEST_PROFILE_KEY": "sk-profile",
        "SNAKEPOOL_LM_PROFILES": json.dumps(profiles),
    }
    env.update(extra)
    return env


def run_lm_calls(worker: WorkerProcess, server: FakeLMServer) -> None:
    """A cached profile twice, an uncached one, a dummy, and an optimizer run."""
    question = {"question": ATLANTIS}
    session_result(worker, "configure_lm", profile="cached")
    session_result(worker, "create_program", signature="question -> answer")
    for _ in range(2):
        result = session_result(worker, "execute_program", program_id="prog_1", inputs=question)
        assert result["outputs"] == {"answer": "Poseidonia"}
    assert server.count("a") == 1, "the second call was answered from the profile's cache"
    session_result(worker, "configure_lm", profile="plain")
    session_result(worker, "execute_program", program_id="prog_1", inputs=question)
    assert server.count("a") == 2
    session_result(worker, "configure_lm", provider="dummy", answers=[{"answer": "d"}] * 3)
    session_result(worker, "execute_program", program_id="prog_1", inputs=question)
    trainset = [{"question": ATLANTIS, "answer": "d"}]
    session_result(worker, "optimize_program", program_id="prog_1", trainset=trainset)


def test_workers_never_write_to_the_home_directory(
    spawn_worker: SpawnWorker, server: FakeLMServer, tmp_path: Path
) -> None:
    server.answer("a", answer="Poseidonia")
    home = tmp_path / "home"
    env = lm_worker_env(home, server)
    worker = spawn_worker("--preload", "dspy", default_modules=True, env=env)
    worker.handshake()
    run_lm_calls(worker, server)
    worker.close_stdin()
    assert worker.wait() == 0
    assert sorted(path.name for path in home.rglob("*")) == []


def test_a_cache_dir_takes_the_disk_caches_instead_of_home(
    spawn_worker: SpawnWorker, server: FakeLMServer, tmp_path: Path
) -> None:
    server.answer("a", answer="Poseidonia")
    home = tmp_path / "home"
    caches = tmp_path / "caches"
    env = lm_worker_env(home, server, SNAKEPOOL_LM_CACHE_DIR=str(caches))
    worker = spawn_worker(default_modules=True, env=env)
    worker.handshake()
    run_lm_calls(worker, server)
    worker.close_stdin()
    assert worker.wait() == 0
    assert sorted(path.name for path in home.rglob("*")) == []
    assert sorted(path.name for path in caches.iterdir()) == ["cached"]

    # A new worker finds the answer on disk: no request reaches the provider.
    again = spawn_worker(default_modules=True, env=env)
    again.handshake("t2")
    session_result(again, "configure_lm", profile="cached")
    session_result(again, "create_program", signature="question -> answer")
    result = session_result(
        again, "execute_program", program_id="prog_1", inputs={"question": ATLANTIS}
    )
    assert result["outputs"] == {"answer": "Poseidonia"}
    assert server.count("a") == 2


def test_malformed_profiles_do_not_stop_a_worker(spawn_worker: SpawnWorker) -> None:
    env = {"SNAKEPOOL_LM_PROFILES": '{"fast": {"model": 5}}'}
    worker = spawn_worker(default_modules=True, env=env)
    worker.handshake()
    error = session_call(worker, "configure_lm", profile="fast")["error"]
    assert error["type"] == "LMProfileInvalid"
    assert error["message"] == (
        "SNAKEPOOL_LM_PROFILES: profile 'fast': 'model' must be a non-empty string, got 5 (int)"
    )
    assert session_result(worker, "configure_lm", provider="dummy")["provider"] == "dummy"

