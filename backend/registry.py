"""Model versions and server state in SQLite under TANDEM_HOME.

Every version the server has served, every candidate a job made (with its metrics, parent and dataset)
and every webhook event. A version a job made for a project carries that project's id: it is promoted
into that project's binding only, never into the server's default model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from backend.sqlite_db import SqliteDb

_SCHEMA = """
CREATE TABLE IF NOT EXISTS model_versions (
    version     TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    task        TEXT NOT NULL,
    path        TEXT,
    created_at  REAL NOT NULL,
    served_at   REAL,
    metrics     TEXT NOT NULL DEFAULT '{}',
    parent      TEXT,
    dataset     TEXT,
    status      TEXT NOT NULL DEFAULT 'served',  -- served | candidate | promoted | rejected | rolled back
    promoted_at REAL,
    project_id  INTEGER                          -- the project a job made it for; NULL: server-wide
);
CREATE TABLE IF NOT EXISTS webhook_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id  INTEGER,
    action      TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS project_versions (
    project_id    INTEGER PRIMARY KEY,
    model_version TEXT NOT NULL,
    synced_at     REAL NOT NULL
);
"""


@dataclass(frozen=True)
class ModelVersion:
    version: str
    name: str
    task: str
    path: str | None
    created_at: float
    served_at: float | None
    metrics: dict
    parent: str | None = None
    dataset: str | None = None
    status: str = "served"
    promoted_at: float | None = None
    project_id: int | None = None

    @property
    def kind(self) -> str:
        """VLM versions are recorded with task "vlm:<tasks>" (e.g. vlm:classify+detect)."""
        return "vlm" if self.task.startswith("vlm:") else "cnn"


_COLUMNS = ("version, name, task, path, created_at, served_at, metrics, parent, dataset, status, promoted_at, "
            "project_id")


def _row(row) -> ModelVersion:
    values = list(row)
    values[6] = json.loads(values[6])
    return ModelVersion(*values)


class Registry(SqliteDb):
    def __init__(self, db_path: Path) -> None:
        super().__init__(db_path, _SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(model_versions)")}
        if "project_id" not in columns:  # a TANDEM_HOME from before per-project versions
            with self._tx() as conn:
                conn.execute("ALTER TABLE model_versions ADD COLUMN project_id INTEGER")

    def record_served(self, version: str, name: str, task: str, path: str | None) -> None:
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO model_versions(version, name, task, path, created_at, served_at) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(version) DO UPDATE SET served_at=excluded.served_at",
                (version, name, task, path, now, now),
            )

    def versions(self) -> list[ModelVersion]:
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM model_versions ORDER BY created_at DESC").fetchall()
        return [_row(r) for r in rows]

    def get(self, version: str) -> ModelVersion | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM model_versions WHERE version = ?", (version,)).fetchone()
        return _row(row) if row else None

    def add_candidate(self, version: str, name: str, task: str, path: str, parent: str | None, dataset: str,
                      metrics: dict, project_id: int | None = None) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO model_versions(version, name, task, path, created_at, metrics, parent, dataset, status, "
                "project_id) VALUES (?,?,?,?,?,?,?,?, 'candidate', ?) "
                "ON CONFLICT(version) DO UPDATE SET metrics=excluded.metrics",
                (version, name, task, path, time.time(), json.dumps(metrics), parent, dataset, project_id),
            )

    def by_path(self, path: str) -> ModelVersion | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM model_versions WHERE path = ? ORDER BY created_at DESC",
                                     (str(path),)).fetchone()
        return _row(row) if row else None

    def resolve(self, spec: str | None) -> ModelVersion | None:
        """A binding's spec (a registry version or a weights path/folder) as a registry row, if it is one."""
        if not spec:
            return None
        return self.get(spec) or self.by_path(spec)

    def set_status(self, version: str, status: str, metrics: dict | None = None) -> None:
        with self._tx() as conn:
            if metrics is not None:
                conn.execute("UPDATE model_versions SET metrics = ? WHERE version = ?", (json.dumps(metrics), version))
            if status == "promoted":
                conn.execute("UPDATE model_versions SET status='promoted', promoted_at=? WHERE version=?",
                             (time.time(), version))
            else:
                conn.execute("UPDATE model_versions SET status=? WHERE version=?", (status, version))

    def current(self, kind: str = "cnn") -> ModelVersion | None:
        """The server-wide version of that kind (cnn | vlm): the most recently started or promoted one that no
        project owns (a project's retrains are served to that project only)."""
        live = [v for v in self.versions() if (v.served_at or v.promoted_at) and v.kind == kind
                and v.project_id is None]
        return max(live, key=lambda v: max(v.served_at or 0, v.promoted_at or 0)) if live else None

    def promoted(self, kind: str = "cnn", task: str | None = None) -> list[ModelVersion]:
        """What a restart without --model resumes, newest promotion first: versions promoted by a job's gate or
        `tandem models promote` (a rollback too), not since rejected, whose weights are still on disk."""
        found = [v for v in self.versions() if v.promoted_at and v.status == "promoted" and v.kind == kind
                 and v.project_id is None and v.path and Path(v.path).exists() and (task is None or v.task == task)]
        return sorted(found, key=lambda v: v.promoted_at, reverse=True)

    def trained_on(self, dataset: str, serving: str) -> ModelVersion | None:
        """A version already made from this exact dataset snapshot that `serving` is, or was fine-tuned from."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM model_versions WHERE dataset = ? "
                                      "ORDER BY created_at DESC", (dataset,)).fetchall()
        return next((v for v in map(_row, rows) if serving in (v.version, v.parent)), None)

    def last_served(self, kind: str | None = "cnn") -> ModelVersion | None:
        served = [v for v in self.versions() if v.served_at and (kind is None or v.kind == kind)]
        return max(served, key=lambda v: v.served_at) if served else None

    def record_event(self, project_id: int | None, action: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO webhook_events(project_id, action, received_at) VALUES (?,?,?)",
                (project_id, action, time.time()),
            )

    def event_counts(self, project_id: int | None = None) -> dict[str, int]:
        query = "SELECT action, COUNT(*) FROM webhook_events"
        args: tuple = ()
        if project_id is not None:
            query += " WHERE project_id = ?"
            args = (project_id,)
        with self._lock:
            return dict(self._conn.execute(query + " GROUP BY action", args).fetchall())

    def synced_version(self, project_id: int) -> str | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT model_version FROM project_versions WHERE project_id = ?", (project_id,)
            ).fetchone()
        return row[0] if row else None

    def record_synced(self, project_id: int, version: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO project_versions(project_id, model_version, synced_at) VALUES (?,?,?) "
                "ON CONFLICT(project_id) DO UPDATE SET model_version=excluded.model_version, synced_at=excluded.synced_at",
                (project_id, version, time.time()),
            )

