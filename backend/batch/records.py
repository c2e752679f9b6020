"""Predict-job records: status, lease and progress of each `tandem predict` / `POST /predict-jobs` run.

The prediction store is the ledger of *what* is done (a task with a stored prediction is never predicted
again); these rows say *who* is working on a project and how far it got. A runner claims a job and renews
its lease with every progress write; a job whose lease ran out (its process was killed) is taken over by
the next runner started for that project, which continues where the store says it stopped.

Kept in a table of its own until the shared JobStore accepts kind="predict" with a progress column; the
interface (`create`, `claim`, `set_progress`, `finish`, `get`) is what the engine and the router use.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table, Text, insert, select, update

from backend.storage.db import engine_for

LEASE_S = 60.0  # a runner renews its lease at every chunk; a chunk taking longer than this is a dead runner
ACTIVE = ("queued", "running")

metadata = MetaData()
predict_jobs = Table(
    "predict_jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project_id", BigInteger, nullable=False, index=True),
    Column("runner", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("params", Text, nullable=False, default="{}"),
    Column("progress", Text, nullable=False, default="{}"),
    Column("holder", String(200), nullable=True),  # host:pid of the runner holding the lease
    Column("lease_until", Float, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
)


@dataclass(frozen=True)
class Progress:
    """Per-job counts; `remaining` is what is still to predict (failed tasks are not remaining: they are
    retried by the next run)."""

    total: int = 0
    done: int = 0  # predicted (or found stored) and written to Label Studio
    failed: int = 0
    remaining: int = 0
    predicted: int = 0  # predicted by this job (done minus what an earlier run or /predict had stored)
    written: int = 0  # predictions this job wrote into Label Studio
    failures: dict[str, str] = field(default_factory=dict)  # task id -> reason (the first 100)
    model_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PredictJobRecord:
    id: int
    project_id: int
    runner: str
    status: str
    params: dict[str, Any]
    progress: dict[str, Any]
    holder: str | None
    lease_until: float | None
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def public(self) -> dict[str, Any]:
        return {**asdict(self), "kind": "predict"}


def holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_here(holder: str | None) -> bool:
    """A holder on this host whose process no longer runs (a zombie counts as gone)."""
    if not holder or ":" not in holder:
        return False
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        return False


class PredictJobs:
    def __init__(self, url: str) -> None:
        self.engine = engine_for(url)
        metadata.create_all(self.engine)

    def create(self, project_id: int, runner: str = "local", params: dict | None = None) -> PredictJobRecord:
        with self.engine.begin() as conn:
            job_id = conn.execute(insert(predict_jobs).values(  # its runner has a lease's time to claim it
                project_id=project_id, runner=runner, status="queued", params=json.dumps(params or {}),
                progress="{}", created_at=time.time(), lease_until=time.time() + LEASE_S)).inserted_primary_key[0]
        return self.get(job_id)

    def get(self, job_id: int) -> PredictJobRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(predict_jobs).where(predict_jobs.c.id == job_id)).mappings().first()
        return _record(row) if row else None

    def list(self, project_id: int | None = None, limit: int = 50) -> list[PredictJobRecord]:
        query = select(predict_jobs).order_by(predict_jobs.c.id.desc()).limit(limit)
        if project_id is not None:
            query = query.where(predict_jobs.c.project_id == project_id)
        with self.engine.connect() as conn:
            return [_record(r) for r in conn.execute(query).mappings().all()]

    def resumable(self, project_id: int) -> PredictJobRecord | None:
        """The project's active job whose runner is gone (lease ran out, or a dead process on this host): the
        next runner takes it over."""
        now = time.time()
        for job in self.list(project_id):
            if job.active and (job.lease_until is None or job.lease_until < now or dead_here(job.holder)):
                return job
        return None

    def claim(self, job_id: int, holder: str | None = None, lease_s: float = LEASE_S) -> bool:
        """One conditional statement: the job is ours if it is queued (not yet claimed), or running with nobody
        holding a live lease on it (a holder on this host whose process is gone holds none: a kill -9 is taken
        over at once)."""
        now = time.time()
        c = predict_jobs.c
        job = self.get(job_id)
        free = (c.status == "queued") | (c.lease_until.is_(None)) | (c.lease_until < now)
        if job is not None and job.holder and dead_here(job.holder):
            free = free | (c.holder == job.holder)
        stmt = (update(predict_jobs)
                .where(c.id == job_id, c.status.in_(ACTIVE), free)
                .values(status="running", holder=holder or holder_id(), lease_until=now + lease_s,
                        started_at=now, error=None))
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def set_progress(self, job_id: int, progress: dict[str, Any], lease_s: float = LEASE_S) -> None:
        """Writes the counts and renews the lease."""
        with self.engine.begin() as conn:
            conn.execute(update(predict_jobs).where(predict_jobs.c.id == job_id)
                         .values(progress=json.dumps(progress), lease_until=time.time() + lease_s))

    def finish(self, job_id: int, status: str, error: str | None = None) -> None:
        """Terminal states are final: a cancelled job stays cancelled."""
        c = predict_jobs.c
        with self.engine.begin() as conn:
            conn.execute(update(predict_jobs).where(c.id == job_id, c.status.in_(ACTIVE))
                         .values(status=status, error=error, finished_at=time.time(), lease_until=None))

    def cancel(self, job_id: int) -> bool:
        c = predict_jobs.c
        with self.engine.begin() as conn:
            return conn.execute(update(predict_jobs).where(c.id == job_id, c.status.in_(ACTIVE))
                                .values(status="cancelled", finished_at=time.time())).rowcount == 1

    def recent(self, limit: int = 20) -> list[PredictJobRecord]:
        """The newest jobs, active or not (for /metrics: a finished job's final counts stay visible)."""
        return self.list(limit=limit)


def _record(row) -> PredictJobRecord:
    return PredictJobRecord(
        id=row["id"], project_id=row["project_id"], runner=row["runner"], status=row["status"],
        params=json.loads(row["params"] or "{}"), progress=json.loads(row["progress"] or "{}"), holder=row["holder"],
        lease_until=row["lease_until"], error=row["error"], created_at=row["created_at"],
        started_at=row["started_at"], finished_at=row["finished_at"])
