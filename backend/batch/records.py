"""Predict jobs as rows of the shared job store (`kind="predict"`): status, lease and progress.

The prediction store is the ledger of *what* is done (a task with a stored prediction is never predicted
again); the job row says *who* works on a project and how far it got, and `GET /jobs/{id}` shows it like a
training job. The database allows one active predict job per project. A runner claims its job with a lease
and renews it with every progress write (`heartbeat`); a job whose runner was killed is taken over by the
next runner for that project — at once when that runner's process on this host is gone, otherwise when its
lease runs out (or, after the lease, a replica's reaper fails it and the next run starts a new job, which
the store's ledger makes just as safe).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import update

from backend.storage.tables import jobs as jobs_table
from backend.training.jobs import ActiveJobExists, Job, JobStatus, JobStore, new_holder_id

LEASE_S = 60.0  # renewed at every chunk (twice a second at most); a chunk taking longer than this is a dead runner
KIND = "predict"

__all__ = ["ActiveJobExists", "Job", "LEASE_S", "PredictJobs", "Progress", "dead_here", "new_holder_id"]


@dataclass(frozen=True)
class Progress:
    """Per-job counts; `remaining` is what is still to predict (failed tasks are not remaining: they are
    retried by the next run)."""

    total: int = 0
    done: int = 0  # has a stored prediction of this version (Label Studio gets it with the next bulk import)
    failed: int = 0
    remaining: int = 0
    predicted: int = 0  # predicted by this run (done also counts what an earlier run or /predict stored)
    written: int = 0  # predictions this run wrote into Label Studio
    redone: int = 0  # of `predicted`: stored under other thresholds (TANDEM_CONF, --vlm-threshold), made again
    unstamped: int = 0  # of `done`: stored by a Tandem before thresholds were recorded (0004), kept as they are
    failures: dict[str, str] = field(default_factory=dict)  # task id -> reason (the first 100)
    model_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def dead_here(holder: str | None) -> bool:
    """A holder (host:pid:random) on this host whose process no longer runs (a zombie counts as gone)."""
    parts = (holder or "").split(":")
    if len(parts) < 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        return False


class PredictJobs:
    """The predict-job view of the shared `JobStore`."""

    def __init__(self, url: str) -> None:
        self.store = JobStore(url)

    def create(self, project_id: int, runner: str, params: dict[str, Any], holder: str | None = None) -> Job:
        """Raises ActiveJobExists when the project has one already. With `holder` the job is born claimed."""
        model_kind = "vlm" if params.get("model_kind") == "vlm" else "yolo"
        return self.store.create(project_id, model_kind, runner, "predict", params, kind=KIND, holder=holder,
                                 lease_s=LEASE_S)

    def get(self, job_id: int) -> Job | None:
        job = self.store.get(job_id)
        return job if job is not None and job.kind == KIND else None

    def list(self, project_id: int | None = None, limit: int = 50) -> list[Job]:
        return self.store.list(project_id, limit, kind=KIND)

    def active(self, project_id: int) -> Job | None:
        found = self.store.active(project_id, KIND)
        return found[0] if found else None

    def resumable(self, project_id: int) -> Job | None:
        """The project's active job when its runner is gone (no holder, lease over, or a dead process here)."""
        job = self.active(project_id)
        if job is not None and (job.holder is None or (job.lease_until or 0) < time.time() or dead_here(job.holder)):
            return job
        return None

    def claim(self, job_id: int, holder: str, handed_by: str | None = None) -> bool:
        """Take the job under `holder`: free, or held by a dead process on this host, or handed over by its
        current holder (`handed_by`: the server that created it for this process). Exactly one claimer wins."""
        job = self.get(job_id)
        if job is None or not job.status.active:
            return False
        previous = job.holder if job.holder and (job.holder == handed_by or dead_here(job.holder)) else None
        if previous is not None:  # conditional on the holder still being that one: two takers cannot both win
            with self.store.engine.begin() as conn:
                moved = conn.execute(update(jobs_table).where(
                    jobs_table.c.id == job_id, jobs_table.c.holder == previous,
                    jobs_table.c.status.in_(("queued", "running"))).values(
                    holder=holder, lease_until=time.time() + LEASE_S)).rowcount == 1
            if not moved:
                return False
        elif not self.store.claim(job_id, holder, LEASE_S):
            return False
        self.store.start(job_id)  # queued -> running (already running when taken over)
        return True

    def set_progress(self, job_id: int, holder: str, progress: dict[str, Any]) -> bool:
        """Writes the counts and renews the lease; False when the job was cancelled or taken by another."""
        return self.store.heartbeat(job_id, holder, LEASE_S, progress=progress)

    def finish(self, job_id: int, status: str, error: str | None = None) -> bool:
        return self.store.finish(job_id, JobStatus(status), error=error)

    def cancel(self, job_id: int) -> bool:
        return self.get(job_id) is not None and self.store.finish(job_id, JobStatus.CANCELLED)

    def recent(self, limit: int = 20) -> list[Job]:
        """The newest jobs, active or not (for /metrics: a finished job's final counts stay visible)."""
        return self.list(limit=limit)
