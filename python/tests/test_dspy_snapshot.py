"""Session snapshots of the DSPy commands, through real ``python -m snakepool_worker``
processes: a session snapshotted on one worker and restored on another is the same
session (LM, programs, ids, a dummy LM's place in its script), and holds no key."""

from __future__ import annotations

import json
from typing import Any, Dict, Iterator, List

import pytest
from conftest import SpawnWorker, WorkerProcess
from fake_lm_server import FakeLMServer

pytest.importorskip("dspy")

from bridge_for_tests import Bridge  # noqa: E402

from snakepool_worker.dspy import COMMANDS, SNAPSHOT_PART  # noqa: E402

SESSION = "s1"
ATLANTIS = "What is the capital of Atlantis?"
KEY_VARIABLE = "SP_TEST_SNAPSHOT_KEY"
FIRST_KEY = "sk-first-worker-0123"
SECOND_KEY = "sk-second-worker-4567"


@pytest.fixture
def server() -> Iterator[FakeLMServer]:
    fake = FakeLMServer()
    yield fake
    fake.close()


def start(spawn_worker: SpawnWorker, worker_id: str, **env: str) -> WorkerProcess:
    """A worker with the default modules (the DSPy commands), after its handshake."""
    worker = spawn_worker(default_modules=True, env=env)
    worker.handshake(worker_id)
    return worker


def call(worker: WorkerProcess, command: str, **args: Any) -> Dict[str, Any]:
    return worker.call(command, {"session_id": SESSION, **args})


def result(worker: WorkerProcess, command: str, **args: Any) -> Any:
    reply = call(worker, command, **args)
    assert reply["success"] is True, reply
    return reply["result"]


def move(source: WorkerProcess, target: WorkerProcess) -> Dict[str, Any]:
    """Snapshot the session on ``source`` and restore it on ``target``; the snapshot."""
    snapshot: Dict[str, Any] = result(source, "snapshot_session")
    restored = result(target, "restore_session", **snapshot)
    assert restored == {"session_id": SESSION, "parts": [SNAPSHOT_PART]}
    return snapshot


def profile_env(server: FakeLMServer, key: str, **profiles: str) -> Dict[str, str]:
    """Profiles named after the fake server's endpoints (``name=prefix``), keyed by ``key``."""
    settings = {
        name: {
            "model": "openai/test-model",
            "api_base": server.base(prefix),
            "api_key_env": KEY_VARIABLE,
            "num_retries": 0,
        }
        for name, prefix in profiles.items()
    }
    return {"SNAKEPOOL_LM_PROFILES": json.dumps(settings), KEY_VARIABLE: key}


def test_the_manifest_flags_every_mutating_dspy_command_as_snapshot_covered(
    spawn_worker: SpawnWorker,
) -> None:
    manifests = {
        "worker": start(spawn_worker, "w1").result("ping", {"manifest": True})["manifest"],
        "bridge": Bridge().runtime.manifest(),
    }
    for where, manifest in manifests.items():
        commands = manifest["commands"]
        for name, _, mutates_session in COMMANDS:
            assert commands[name]["mutates_session"] is mutates_session, (where, name)
            assert commands[name].get("snapshot", False) is mutates_session, (where, name)


def build_session(worker: WorkerProcess, lm: Dict[str, Any]) -> None:
    """A dummy LM and three programs: predict, chain of thought with a structured
    signature, and ``tagged`` with a demo loaded by load_program_state; ``prog_3`` was
    deleted, so the counter is ahead of the ids in use."""
    result(worker, "configure_lm", **lm)
    result(worker, "create_program", signature="question -> answer")
    structured = {
        "instructions": "Count the things in the question.",
        "inputs": [{"name": "question", "desc": "what to count"}],
        "outputs": [{"name": "answer", "type": "int", "desc": "how many"}],
    }
    result(worker, "create_program", signature=structured, type="chain_of_thought")
    result(
        worker,
        "create_program",
        signature="question -> answer",
        instructions="Answer in one word.",
        program_id="tagged",
    )
    assert result(worker, "create_program", signature="question -> answer")["program_id"] == (
        "prog_3"
    )
    result(worker, "delete_program", program_id="prog_3")
    state = result(worker, "dump_program_state", program_id="tagged")["state"]
    state["demos"] = [{"question": ATLANTIS, "answer": "Poseidonia"}]
    assert result(worker, "load_program_state", program_id="tagged", state=state)["demos"] == 1


def described(worker: WorkerProcess) -> List[Any]:
    """Everything the session says about its programs."""
    programs = result(worker, "list_programs")["programs"]
    views: List[Any] = [programs]
    for program in programs:
        for command in ("get_program_info", "dump_program_state"):
            views.append(result(worker, command, program_id=program["program_id"]))
    return views


def run_each(worker: WorkerProcess) -> List[Any]:
    """One run of each program (``tagged`` twice: from its demo, then from the script)."""
    runs = [
        ("prog_1", "What is two?"),
        ("prog_2", "How many moons has Mars?"),
        ("tagged", ATLANTIS),
        ("tagged", "What is the capital of Lemuria?"),
    ]
    return [
        result(worker, "execute_program", program_id=program_id, inputs={"question": question})
        for program_id, question in runs
    ]


def test_a_dummy_session_moves_to_another_worker_unchanged(spawn_worker: SpawnWorker) -> None:
    answers = [{"reasoning": f"step {n}", "answer": str(n)} for n in range(1, 6)]
    lm = {"provider": "dummy", "answers": answers, "follow_examples": True}
    first, second = start(spawn_worker, "w1"), start(spawn_worker, "w2")
    build_session(first, lm)
    question = {"question": "What is one?"}
    assert result(first, "execute_program", program_id="prog_1", inputs=question)["outputs"] == {
        "answer": "1"
    }

    snapshot = move(first, second)
    part = snapshot["parts"][SNAPSHOT_PART]
    assert part["lm"] == {"settings": lm, "answers_used": 1}
    assert [program["program_id"] for program in part["programs"]] == ["prog_1", "prog_2", "tagged"]
    assert part["counter"] == 3
    assert described(second) == described(first)

    # Both go on from the script's second answer; the demo's question takes none.
    runs = run_each(first)
    assert run_each(second) == runs
    assert [run["outputs"] for run in runs] == [
        {"answer": "2"},
        {"answer": 3},
        {"answer": "Poseidonia"},
        {"answer": "4"},
    ]
    assert runs[1]["reasoning"] == "step 3"
    for worker in (first, second):
        last = result(worker, "execute_program", program_id="prog_1", inputs=question)
        assert last["outputs"] == {"answer": "5"}
        error = call(worker, "execute_program", program_id="prog_1", inputs=question)["error"]
        assert error["type"] == "DummyAnswersExhausted"
        created = result(worker, "create_program", signature="question -> answer")
        assert created["program_id"] == "prog_4"


def test_an_optimized_program_is_optimized_again_alike_on_both_workers(
    spawn_worker: SpawnWorker,
) -> None:
    lm = {"provider": "dummy", "answers": [{"answer": "Poseidonia"}] * 6, "follow_examples": True}
    first, second = start(spawn_worker, "w1"), start(spawn_worker, "w2")
    result(first, "configure_lm", **lm)
    result(first, "create_program", signature="question -> answer")
    trainset = [
        {"question": ATLANTIS, "answer": "Poseidonia"},
        {"question": "What is the capital of Lemuria?", "answer": "Poseidonia"},
    ]
    optimize = {"program_id": "prog_1", "trainset": trainset}
    assert result(first, "optimize_program", **optimize)["demos"] == 2
    move(first, second)
    again = [result(worker, "optimize_program", **optimize) for worker in (first, second)]
    assert again[0] == again[1]
    assert again[0]["demos"] == 2
    assert described(second) == described(first)


def test_a_profile_lm_is_snapshotted_by_name_and_restored_with_the_workers_key(
    spawn_worker: SpawnWorker, server: FakeLMServer
) -> None:
    server.answer("a", answer="Poseidonia")
    first_env = profile_env(server, FIRST_KEY, fast="a")
    first = start(spawn_worker, "w1", **first_env)
    second = start(spawn_worker, "w2", **profile_env(server, SECOND_KEY, fast="a"))
    result(first, "configure_lm", profile="fast", temperature=0.3)
    result(first, "create_program", signature="question -> answer")

    snapshot = move(first, second)
    assert snapshot["parts"][SNAPSHOT_PART]["lm"] == {
        "settings": {"profile": "fast", "temperature": 0.3}
    }
    text = json.dumps(snapshot)
    for secret in (
        FIRST_KEY,
        SECOND_KEY,
        KEY_VARIABLE,
        server.base("a"),
        "127.0.0.1",
        first_env["SNAKEPOOL_LM_PROFILES"],
    ):
        assert secret not in text, secret

    run = result(second, "execute_program", program_id="prog_1", inputs={"question": ATLANTIS})
    assert run["outputs"] == {"answer": "Poseidonia"}
    requests = server.wait_for(1)
    assert [request.path for request in requests] == ["/a/v1/chat/completions"]
    assert requests[0].authorization == f"Bearer {SECOND_KEY}"


def test_restoring_a_profile_the_worker_does_not_define_fails_clearly(
    spawn_worker: SpawnWorker, server: FakeLMServer
) -> None:
    first = start(spawn_worker, "w1", **profile_env(server, FIRST_KEY, fast="a"))
    second = start(spawn_worker, "w2", **profile_env(server, FIRST_KEY, slow="b"))
    result(first, "configure_lm", profile="fast")
    result(first, "create_program", signature="question -> answer")
    snapshot = result(first, "snapshot_session")

    error = call(second, "restore_session", **snapshot)["error"]
    assert error["type"] == "SnapshotError"
    assert error["message"] == (
        f"restore of part {SNAPSHOT_PART!r} failed: configure_lm: no LM profile 'fast'; "
        "profiles: slow"
    )
    # Nothing of the snapshot was restored.
    assert result(second, "list_programs") == {"programs": []}
    assert server.count() == 0


def test_a_session_without_dspy_state_has_no_dspy_part(spawn_worker: SpawnWorker) -> None:
    worker = start(spawn_worker, "w1")
    assert result(worker, "snapshot_session") == {"parts": {}}
    assert result(worker, "list_programs") == {"programs": []}
    assert result(worker, "snapshot_session") == {"parts": {}}
    result(worker, "configure_lm", provider="dummy")
    result(worker, "create_program", signature="question -> answer")
    assert SNAPSHOT_PART in result(worker, "snapshot_session")["parts"]
    result(worker, "reset_state")
    assert result(worker, "snapshot_session") == {"parts": {}}
