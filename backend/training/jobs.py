"""Training job records in SQLite (TANDEM_HOME/tandem.sqlite3), shared by the server, the worker
process and the CLI. WAL mode lets all three read and write at once."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id  INTEGER NOT NULL,
    model_kind  TEXT NOT NULL,
    runner      TEXT NOT NULL,
    status      TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    params      TEXT NOT NULL DEFAULT '{}',
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    pid         INTEGER,
    remote_id   TEXT,
    error       TEXT,
    version     TEXT,
    promoted    INTEGER,
    metrics     TEXT NOT NULL DEFAULT '{}'
);
"""


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass(frozen=True)
class Job:
    id: int
    project_id: int
    model_kind: str
    runner: str
    status: JobStatus
    reason: str
    params: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    pid: int | None
    remote_id: str | None
    error: str | None
    version: str | None
    promoted: bool | None
    metrics: dict[str, Any]

    def public(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["status"] = self.status.value
        return out


_COLS = ("id, project_id, model_kind, runner, status, reason, params, created_at, started_at, finished_at, pid, "
         "remote_id, error, version, promoted, metrics")


def _job(row) -> Job:
    v = list(row)
    v[4] = JobStatus(v[4])
    v[6] = json.loads(v[6])
    v[14] = None if v[14] is None else bool(v[14])
    v[15] = json.loads(v[15])
    return Job(*v)


class JobStore:
    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)

    def create(self, project_id: int, model_kind: str, runner: str, reason: str, params: dict | None = None) -> Job:
        cur = self._conn.execute(
            "INSERT INTO jobs(project_id, model_kind, runner, status, reason, params, created_at) VALUES (?,?,?,?,?,?,?)",
            (project_id, model_kind, runner, JobStatus.QUEUED.value, reason, json.dumps(params or {}), time.time()),
        )
        return self.get(cur.lastrowid)

    def get(self, job_id: int) -> Job | None:
        row = self._conn.execute(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, project_id: int | None = None, limit: int = 50) -> list[Job]:
        where, args = ("WHERE project_id = ?", (project_id,)) if project_id is not None else ("", ())
        rows = self._conn.execute(f"SELECT {_COLS} FROM jobs {where} ORDER BY id DESC LIMIT ?", (*args, limit))
        return [_job(r) for r in rows.fetchall()]

    def active(self, project_id: int) -> list[Job]:
        rows = self._conn.execute(
            f"SELECT {_COLS} FROM jobs WHERE project_id = ? AND status IN ('queued', 'running') ORDER BY id",
            (project_id,),
        ).fetchall()
        return [_job(r) for r in rows]

    def update(self, job_id: int, **fields: Any) -> None:
        if "status" in fields:
            fields["status"] = JobStatus(fields["status"]).value
        for key in ("params", "metrics"):
            if key in fields:
                fields[key] = json.dumps(fields[key])
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))

    def finish(self, job_id: int, status: JobStatus, error: str | None = None, **fields: Any) -> None:
        """Terminal states are final: a cancelled job is not turned into a failed one by its dying process."""
        job = self.get(job_id)
        if job is None or not job.status.active:
            return
        self.update(job_id, status=status, error=error, finished_at=time.time(), **fields)

    def counts(self) -> dict[str, int]:
        return dict(self._conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
