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
-- which process a job's pid is: the pid alone may be reused by another process after a restart
CREATE TABLE IF NOT EXISTS job_process (
    job_id      INTEGER PRIMARY KEY,
    pid         INTEGER,
    identity    TEXT,           -- boot id and start time of the worker process
    holder      TEXT            -- identity of the server process holding the job in its queue (no pid yet)
);
-- annotation webhooks counted toward auto-retrain, kept across restarts
CREATE TABLE IF NOT EXISTS corrections (
    project_id  INTEGER PRIMARY KEY,
    count       INTEGER NOT NULL DEFAULT 0,
    updated_at  REAL NOT NULL
);
-- recent webhook deliveries already counted (Label Studio retries and repeats them); bounded
CREATE TABLE IF NOT EXISTS correction_events (
    key         TEXT PRIMARY KEY,
    at          REAL NOT NULL
);
"""
MAX_ID = 2**63 - 1
MAX_CORRECTION_EVENTS = 10_000


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
        if not _in_range(job_id):
            return None
        row = self._conn.execute(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, project_id: int | None = None, limit: int = 50) -> list[Job]:
        if project_id is not None and not _in_range(project_id):
            return []
        where, args = ("WHERE project_id = ?", (project_id,)) if project_id is not None else ("", ())
        rows = self._conn.execute(f"SELECT {_COLS} FROM jobs {where} ORDER BY id DESC LIMIT ?", (*args, limit))
        return [_job(r) for r in rows.fetchall()]

    def active(self, project_id: int) -> list[Job]:
        if not _in_range(project_id):
            return []
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

    def with_process(self) -> list[tuple[Job, str | None]]:
        """Active jobs that have a worker pid, each with the identity recorded for that pid (None if unknown)."""
        rows = self._conn.execute(
            f"SELECT {', '.join('j.' + c.strip() for c in _COLS.split(','))}, p.identity FROM jobs j "
            "LEFT JOIN job_process p ON p.job_id = j.id AND p.pid = j.pid "
            "WHERE j.status IN ('queued', 'running') AND j.pid IS NOT NULL ORDER BY j.id").fetchall()
        return [(_job(r[:-1]), r[-1]) for r in rows]

    # -- worker processes ---------------------------------------------------------------------------
    def record_process(self, job_id: int, pid: int, identity: str | None) -> None:
        """Before the pid is written on the job: whoever reads the pid can tell a reused pid from the worker."""
        self._conn.execute("INSERT INTO job_process(job_id, pid, identity, holder) VALUES (?,?,?,NULL) "
                           "ON CONFLICT(job_id) DO UPDATE SET pid = excluded.pid, identity = excluded.identity",
                           (job_id, pid, identity))

    def hold(self, job_id: int, holder: str) -> None:
        """A queued job waiting for a free training slot in the server process `holder`."""
        self._conn.execute("INSERT INTO job_process(job_id, holder) VALUES (?,?) "
                           "ON CONFLICT(job_id) DO UPDATE SET holder = excluded.holder", (job_id, holder))

    def held(self) -> list[tuple[Job, str | None]]:
        """Queued jobs without a worker yet, each with the server process holding it (None: not recorded)."""
        rows = self._conn.execute(
            f"SELECT {', '.join('j.' + c.strip() for c in _COLS.split(','))}, p.holder FROM jobs j "
            "LEFT JOIN job_process p ON p.job_id = j.id WHERE j.status = 'queued' AND j.pid IS NULL "
            "ORDER BY j.id").fetchall()
        return [(_job(r[:-1]), r[-1]) for r in rows]

    # -- corrections toward auto-retrain ------------------------------------------------------------
    def add_correction(self, project_id: int, key: str | None = None) -> int:
        """Count one annotation event for the project and return the count; a delivery already counted (same
        `key`: annotation id and its update time) is not counted twice."""
        now = time.time()
        with self._conn:  # one transaction: the event key and the count together
            self._conn.execute("BEGIN IMMEDIATE")
            if key is not None:
                key = key[:200]
                if self._conn.execute("SELECT 1 FROM correction_events WHERE key = ?", (key,)).fetchone():
                    row = self._conn.execute("SELECT count FROM corrections WHERE project_id = ?",
                                             (project_id,)).fetchone()
                    return row[0] if row else 0
                self._conn.execute("INSERT INTO correction_events(key, at) VALUES (?, ?)", (key, now))
                self._conn.execute("DELETE FROM correction_events WHERE key IN (SELECT key FROM correction_events "
                                   "ORDER BY at DESC LIMIT -1 OFFSET ?)", (MAX_CORRECTION_EVENTS,))
            self._conn.execute("INSERT INTO corrections(project_id, count, updated_at) VALUES (?, 1, ?) "
                               "ON CONFLICT(project_id) DO UPDATE SET count = count + 1, updated_at = excluded.updated_at",
                               (project_id, now))
            return self._conn.execute("SELECT count FROM corrections WHERE project_id = ?", (project_id,)).fetchone()[0]

    def corrections(self, project_id: int) -> int:
        row = self._conn.execute("SELECT count FROM corrections WHERE project_id = ?", (project_id,)).fetchone()
        return row[0] if row else 0

    def reset_corrections(self, project_id: int) -> None:
        self._conn.execute("UPDATE corrections SET count = 0, updated_at = ? WHERE project_id = ?",
                           (time.time(), project_id))

    def projects_with_corrections(self) -> list[int]:
        return [r[0] for r in self._conn.execute("SELECT project_id FROM corrections WHERE count > 0 ORDER BY project_id")]


def _in_range(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -MAX_ID - 1 <= value <= MAX_ID
