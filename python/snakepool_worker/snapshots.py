"""Session snapshots: each command module's part of a session's state, as JSON.

The host keeps a journal of every call that changed a session, to rebuild the session on
another worker. A module that can say what its part of a session is (a snapshot) and
rebuild it from that (a restore) lets the host replace the journal so far by one
snapshot, so the journal stays short however long the session lives::

    from snakepool_worker import session_restore, session_snapshot

    @session_snapshot
    def notes_snapshot(session):
        return {"notes": session.get("notes", [])}

    @session_restore
    def notes_restore(session, part):
        session["notes"] = list(part["notes"])

A part is named after a module or package (by default the module of the snapshot
function) and covers the commands defined in it and below it: a command that mutates
session state is snapshot-able when some part with both hooks covers it (the manifest
says ``"snapshot": true``). A snapshot is JSON only, never pickle; a snapshot function
returns ``None`` when the session has nothing of its part.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

SnapshotHook = Callable[[Dict[str, Any]], Any]
RestoreHook = Callable[[Dict[str, Any], Any], None]


class SnapshotError(Exception):
    """A session's part could not be snapshotted or restored."""


class SessionSnapshots:
    """The snapshot and restore hooks of a registry, by part name."""

    def __init__(self) -> None:
        self._snapshot: Dict[str, SnapshotHook] = {}
        self._restore: Dict[str, RestoreHook] = {}

    @staticmethod
    def _part(func: Callable[..., Any], part: Optional[str]) -> str:
        name = part if part is not None else getattr(func, "__module__", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"the part of snapshot hook {func!r} must be a non-empty string")
        return name

    def add_snapshot(self, func: SnapshotHook, part: Optional[str] = None) -> str:
        """Register ``func(session) -> JSON`` for ``part``; returns the part's name."""
        return self._add(self._snapshot, "snapshot", func, part)

    def add_restore(self, func: RestoreHook, part: Optional[str] = None) -> str:
        """Register ``func(session, snapshot)`` for ``part``; returns the part's name."""
        return self._add(self._restore, "restore", func, part)

    def _add(self, hooks: Dict[str, Any], what: str, func: Any, part: Optional[str]) -> str:
        if not callable(func):
            raise TypeError(f"session {what} hook {func!r} is not callable")
        name = self._part(func, part)
        if name in hooks:
            raise ValueError(f"part {name!r} already has a session {what} hook")
        hooks[name] = func
        return name

    def complete_parts(self) -> Tuple[str, ...]:
        """Parts with both hooks, sorted."""
        return tuple(sorted(set(self._snapshot) & set(self._restore)))

    def covers(self, module: str) -> bool:
        """Whether a complete part covers commands defined in ``module``."""
        return any(module == part or module.startswith(part + ".") for part in self.complete_parts())

    def take(self, session: Dict[str, Any]) -> Dict[str, Any]:
        """Every complete part's snapshot of ``session`` that is not ``None``."""
        parts: Dict[str, Any] = {}
        for name in self.complete_parts():
            try:
                value = self._snapshot[name](session)
            except Exception as exc:
                raise SnapshotError(f"snapshot of part {name!r} failed: {exc}") from exc
            if value is not None:
                parts[name] = value
        return parts

    def restore(self, session: Dict[str, Any], parts: Dict[str, Any]) -> None:
        """Restore each part of ``parts`` into ``session``; an unknown part is an error."""
        unknown = sorted(name for name in parts if name not in self._restore)
        if unknown:
            raise SnapshotError(
                f"no restore hook for part(s) {', '.join(map(repr, unknown))} on this worker "
                f"(known: {', '.join(map(repr, sorted(self._restore))) or 'none'})"
            )
        for name, value in parts.items():
            try:
                self._restore[name](session, value)
            except Exception as exc:
                raise SnapshotError(f"restore of part {name!r} failed: {exc}") from exc
