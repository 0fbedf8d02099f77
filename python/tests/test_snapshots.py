"""Session snapshots: the manifest says which mutating commands a snapshot covers, and
snapshot_session / restore_session carry a session's state from one worker to another."""

from __future__ import annotations

from typing import Any, Dict

import pytest

from conftest import HANDLERS_MODULE, SpawnWorker, WorkerProcess
from snakepool_worker.registry import Registry
from snakepool_worker.snapshots import SessionSnapshots, SnapshotError

MODULES = (HANDLERS_MODULE, "snapshot_handlers_for_tests")


@pytest.fixture
def pair(spawn_worker: SpawnWorker) -> "tuple[WorkerProcess, WorkerProcess]":
    first, second = spawn_worker(modules=MODULES), spawn_worker(modules=MODULES)
    first.handshake()
    second.handshake()
    return first, second


def failure(reply: Dict[str, Any]) -> Dict[str, Any]:
    assert reply["success"] is False, reply
    return reply["error"]


def test_the_manifest_flags_covered_commands_and_internal_builtins(
    spawn_worker: SpawnWorker,
) -> None:
    worker = spawn_worker(modules=MODULES)
    commands = worker.handshake()["manifest"]["commands"]
    assert commands["note"]["snapshot"] is True
    assert "snapshot" not in commands["set_value"], "its module offers no snapshot"
    assert "snapshot" not in commands["notes"], "it does not mutate"
    for name in ("snapshot_session", "restore_session"):
        assert commands[name]["internal"] is True
        assert commands[name]["concurrent"] is True


def test_a_snapshot_restores_the_session_on_another_worker(pair: Any) -> None:
    first, second = pair
    for text in ("a", "b"):
        first.result("note", {"session_id": "s", "text": text})
    snapshot = first.result("snapshot_session", {"session_id": "s"})
    assert snapshot == {"parts": {"snapshot_handlers_for_tests": {"notes": ["a", "b"]}}}
    restored = second.result("restore_session", {"session_id": "s", **snapshot})
    assert restored == {"session_id": "s", "parts": ["snapshot_handlers_for_tests"]}
    assert second.result("notes", {"session_id": "s"}) == ["a", "b"]
    assert second.result("note", {"session_id": "s", "text": "c"}) == 3
    # A session with nothing of a part has no entry for it.
    assert first.result("snapshot_session", {"session_id": "empty"}) == {"parts": {}}


def test_bad_snapshot_requests_fail_clearly(pair: Any) -> None:
    first, _ = pair
    error = failure(first.call("restore_session", {"session_id": "s", "parts": {"nope": 1}}))
    assert error["type"] == "SnapshotError"
    assert "'nope'" in error["message"] and "snapshot_handlers_for_tests" in error["message"]
    assert failure(first.call("restore_session", {"session_id": "s"}))["type"] == "BadRequest"
    assert failure(first.call("snapshot_session", {}))["type"] == "BadRequest"
    error = failure(
        first.call("restore_session", {"session_id": "s", "parts": {"snapshot_handlers_for_tests": 7}})
    )
    assert error["type"] == "SnapshotError" and "restore of part" in error["message"]
    assert first.result("get_stats")["sessions"] == 0, "a failed restore leaves no session"


def test_parts_cover_their_module_and_the_modules_below() -> None:
    snapshots = SessionSnapshots()
    snapshots.add_snapshot(lambda session: session.get("x"), part="pkg")
    assert not snapshots.covers("pkg"), "a part needs both hooks"
    snapshots.add_restore(lambda session, part: session.update(x=part), part="pkg")
    assert snapshots.covers("pkg") and snapshots.covers("pkg.commands")
    assert not snapshots.covers("pkgs") and not snapshots.covers("other")
    with pytest.raises(ValueError, match="already has"):
        snapshots.add_restore(lambda session, part: None, part="pkg")
    session: Dict[str, Any] = {}
    snapshots.restore(session, {"pkg": 5})
    assert snapshots.take(session) == {"pkg": 5}


def test_a_failing_snapshot_hook_names_its_part() -> None:
    registry = Registry()

    @registry.session_snapshot(part="broken")
    def broken(session: Dict[str, Any]) -> Any:
        raise KeyError("gone")

    @registry.session_restore(part="broken")
    def restore(session: Dict[str, Any], part: Any) -> None:
        pass

    with pytest.raises(SnapshotError, match="part 'broken'"):
        registry.snapshots.take({})
