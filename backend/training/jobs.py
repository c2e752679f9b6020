"""Job records (training and predict jobs) in the shared database, held by runners through leases.

Every state change is one conditional statement whose row count says whether it happened, so two replicas,
a server and a CLI, or a worker and a cancel can race without either overwriting the other:

- `create(project_id, model_kind, runner, reason, params=None, kind="train", holder=None, lease_s=...)`
  inserts a queued job. The partial unique index `one_active_job` allows one queued-or-running job per
  (project, kind): a second `create` raises `ActiveJobExists` carrying the active job. With `holder` the
  job is born claimed (no window in which another replica could take it).
- `start(job_id, pid=None) -> bool`: queued -> running.
- `finish(job_id, status, error=None, **fields) -> bool`: to a terminal state, only from an active one (a
  cancelled job is not turned into a failed one by its dying worker).
- `update(job_id, **fields)`, `set_progress(job_id, dict)`: plain field writes (no state change).

Leases (all times are `time.time()` seconds; `holder` is `new_holder_id()`: host, pid and a random part):

- `claim(job_id, holder, lease_s) -> bool`: take an active job that nobody holds, that `holder` already
  holds, or whose lease expired. Exactly one of many concurrent claimers wins.
- `heartbeat(job_id, holder, lease_s) -> bool`: extend the lease. False when the job was cancelled or
  finished meanwhile, or another holder took it: the caller must stop its worker now.
- `release(job_id, holder)`: give a job back without finishing it (a queued job another runner may take).
- `expire_leases(now=None) -> list[Job]`: fail every *running* job whose lease ran out ("lease expired:
  <holder> stopped heartbeating") and return them; any replica or CLI may call it, each job is failed once.
  Queued jobs whose holder vanished before starting them are not failed: `claimable()` lists them and a
  runner with a free slot claims them (safe: no worker ran yet).

Corrections toward auto-retrain are counted here too (`add_correction`, `take_corrections`), so every
replica sees one count per project.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from backend.storage.db import engine_for, insert_for
from backend.storage.tables import ACTIVE_STATUSES, correction_events, corrections
from backend.storage.tables import jobs as jobs_table

MAX_ID = 2**63 - 1
MAX_CORRECTION_EVENTS = 10_000
DEFAULT_LEASE_S = 30.0
KINDS = ("train", "predict")


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
    kind: str = "train"
    progress: dict[str, Any] | None = None
    holder: str | None = None
    lease_until: float | None = None
    follow_up: str | None = None
    follow_up_spec: dict[str, Any] | None = None  # the coalesced trigger's runner, model_kind and params

    def public(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["status"] = self.status.value
        return out


class ActiveJobExists(ValueError):
    """The project already has an active job of that kind (the database's unique index said so)."""

    def __init__(self, active: Job) -> None:
        super().__init__(f"project {active.project_id} already has {active.kind} job {active.id} "
                         f"({active.status.value})")
        self.active = active


_JSON = ("params", "metrics", "progress")
_ACTIVE = jobs_table.c.status.in_(ACTIVE_STATUSES)


def totals_by_status(per_project: dict[tuple[int, str], int]) -> dict[str, int]:
    """`counts_by_project`'s counts summed over projects."""
    totals: dict[str, int] = {}
    for (_, status), n in per_project.items():
        totals[status] = totals.get(status, 0) + n
    return totals


def new_holder_id() -> str:
    """Who holds a lease: readable (host and pid) and unique (a pid is reused; a random part is not)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def holder_host(holder: str | None) -> str | None:
    return holder.split(":", 1)[0] if holder and holder.count(":") >= 2 else None


def _job(row) -> Job:
    v = dict(row._mapping)
    v["status"] = JobStatus(v["status"])
    for key in _JSON:
        v[key] = json.loads(v[key]) if v.get(key) else {}
    v["promoted"] = None if v["promoted"] is None else bool(v["promoted"])
    v["follow_up_spec"] = json.loads(v["follow_up_spec"]) if v.get("follow_up_spec") else None
    return Job(**v)


class JobStore:
    def __init__(self, db: str | Path) -> None:
        """`db`: a database URL (TANDEM_DATABASE_URL) or the path of a SQLite file."""
        self.engine = engine_for(db)

    # -- records ------------------------------------------------------------------------------------
    def create(self, project_id: int, model_kind: str, runner: str, reason: str, params: dict | None = None,
               kind: str = "train", holder: str | None = None, lease_s: float = DEFAULT_LEASE_S) -> Job:
        if kind not in KINDS:
            raise ValueError(f"job kind must be one of {KINDS}, not {kind!r}")
        now = time.time()
        values = dict(project_id=project_id, model_kind=model_kind, runner=runner, status=JobStatus.QUEUED.value,
                      reason=reason, params=json.dumps(params or {}), created_at=now, kind=kind,
                      holder=holder, lease_until=now + lease_s if holder else None)
        try:
            with self.engine.begin() as conn:
                job_id = conn.execute(insert(jobs_table).values(**values).returning(jobs_table.c.id)).scalar_one()
        except IntegrityError:
            active = self.active(project_id, kind)
            if not active:  # finished between the insert and this read: try once more
                return self.create(project_id, model_kind, runner, reason, params, kind, holder, lease_s)
            raise ActiveJobExists(active[0]) from None
        return self.get(job_id)

    def get(self, job_id: int) -> Job | None:
        if not _in_range(job_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
        return _job(row) if row else None

    def list(self, project_id: int | None = None, limit: int = 50, kind: str | None = None) -> list[Job]:
        if project_id is not None and not _in_range(project_id):
            return []
        query = select(jobs_table).order_by(jobs_table.c.id.desc()).limit(limit)
        if project_id is not None:
            query = query.where(jobs_table.c.project_id == project_id)
        if kind is not None:
            query = query.where(jobs_table.c.kind == kind)
        with self.engine.connect() as conn:
            return [_job(r) for r in conn.execute(query)]

    def active(self, project_id: int, kind: str | None = None) -> list[Job]:
        if not _in_range(project_id):
            return []
        query = select(jobs_table).where(jobs_table.c.project_id == project_id, _ACTIVE).order_by(jobs_table.c.id)
        if kind is not None:
            query = query.where(jobs_table.c.kind == kind)
        with self.engine.connect() as conn:
            return [_job(r) for r in conn.execute(query)]

    def all_active(self) -> list[Job]:
        with self.engine.connect() as conn:
            return [_job(r) for r in conn.execute(select(jobs_table).where(_ACTIVE).order_by(jobs_table.c.id))]

    def _set(self, job_id: int, *where, **fields: Any) -> bool:
        if not _in_range(job_id):
            return False
        if "status" in fields:
            fields["status"] = JobStatus(fields["status"]).value
        for key in _JSON:
            if key in fields:
                fields[key] = json.dumps(fields[key] or {})
        with self.engine.begin() as conn:
            result = conn.execute(update(jobs_table).where(jobs_table.c.id == job_id, *where).values(**fields))
        return result.rowcount == 1

    def update(self, job_id: int, **fields: Any) -> None:
        self._set(job_id, **fields)

    def set_progress(self, job_id: int, progress: dict[str, Any]) -> None:
        self._set(job_id, progress=progress)

    def start(self, job_id: int, pid: int | None = None) -> bool:
        """queued -> running; False when it is no longer queued (cancelled, or another worker started it)."""
        return self._set(job_id, jobs_table.c.status == JobStatus.QUEUED.value, status=JobStatus.RUNNING,
                         started_at=time.time(), pid=pid)

    def finish(self, job_id: int, status: JobStatus, error: str | None = None, **fields: Any) -> bool:
        """Terminal states are final: a cancelled job is not turned into a failed one by its dying process."""
        return self._set(job_id, _ACTIVE, status=status, error=error, finished_at=time.time(), **fields)

    def counts(self, kind: str | None = None) -> dict[str, int]:
        """Jobs per status, of one kind (train | predict) or all."""
        return totals_by_status(self.counts_by_project(kind))

    def counts_by_project(self, kind: str | None = None) -> dict[tuple[int, str], int]:
        """Jobs per (project, status), of one kind or all: which project's retrains queue or fail."""
        query = select(jobs_table.c.project_id, jobs_table.c.status, func.count()).group_by(
            jobs_table.c.project_id, jobs_table.c.status)
        if kind is not None:
            query = query.where(jobs_table.c.kind == kind)
        with self.engine.connect() as conn:
            return {(pid, status): n for pid, status, n in conn.execute(query)}

    def set_follow_up(self, job_id: int, reason: str, spec: dict[str, Any] | None = None,
                      keep_existing: bool = False) -> bool:
        """Fold a trigger into the successor of an active job (run when it ends, unless it was cancelled); True
        while the job is active. `spec`: the trigger's runner, model_kind and params; the last trigger folded in
        is the one run, except that with `keep_existing` (automatic triggers) one already folded in is kept."""
        values = dict(follow_up=reason, follow_up_spec=json.dumps(spec) if spec else None)
        if not keep_existing:
            return self._set(job_id, _ACTIVE, **values)
        if self._set(job_id, _ACTIVE, jobs_table.c.follow_up.is_(None), **values):
            return True
        job = self.get(job_id)
        return bool(job and job.status.active and job.follow_up)

    def take_follow_up(self, job_id: int) -> str | None:
        """The follow-up reason of an ended job, once: whoever takes it (one replica) queues the successor."""
        job = self.get(job_id)
        if job is None or not job.follow_up or job.status.active:
            return None
        taken = self._set(job_id, jobs_table.c.follow_up == job.follow_up, follow_up=None, follow_up_spec=None)
        return job.follow_up if taken else None

    # -- leases -------------------------------------------------------------------------------------
    def claim(self, job_id: int, holder: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
        now = time.time()
        free = or_(jobs_table.c.holder.is_(None), jobs_table.c.holder == holder, jobs_table.c.lease_until < now)
        return self._set(job_id, _ACTIVE, free, holder=holder, lease_until=now + lease_s)

    def heartbeat(self, job_id: int, holder: str, lease_s: float = DEFAULT_LEASE_S, **fields: Any) -> bool:
        """Renew the lease, and write `fields` (progress) in the same statement: nothing is written by a holder
        that lost the job (cancelled, expired, taken over)."""
        return self._set(job_id, _ACTIVE, jobs_table.c.holder == holder, lease_until=time.time() + lease_s, **fields)

    def release(self, job_id: int, holder: str) -> bool:
        return self._set(job_id, jobs_table.c.holder == holder, holder=None, lease_until=None)

    def held_by(self, holder: str) -> list[Job]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs_table).where(jobs_table.c.holder == holder, _ACTIVE))
            return [_job(r) for r in rows]

    def expire_leases(self, now: float | None = None) -> list[Job]:
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs_table).where(
                jobs_table.c.status == JobStatus.RUNNING.value, jobs_table.c.lease_until < now)).all()
        failed = []
        for job in map(_job, rows):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.lease_until or 0))
            again = (f"`tandem predict --project {job.project_id}` goes on where it stopped" if job.kind == "predict"
                     else f"`tandem train --project {job.project_id}` starts it again")
            error = (f"lease expired: {job.holder or 'its runner'} stopped heartbeating (lease ran out {when}): its "
                     f"server stopped, or could not reach the database for longer than the lease; {again}")
            if self._set(job.id, jobs_table.c.status == JobStatus.RUNNING.value, jobs_table.c.lease_until < now,
                         jobs_table.c.holder == job.holder if job.holder else jobs_table.c.holder.is_(None),
                         status=JobStatus.FAILED, error=error, finished_at=now):
                failed.append(self.get(job.id))
        return failed

    def claimable(self, now: float | None = None, kind: str | None = None) -> list[Job]:
        """Queued jobs whose holder's lease ran out before it started them: safe to claim and run."""
        now = time.time() if now is None else now
        query = select(jobs_table).where(jobs_table.c.status == JobStatus.QUEUED.value,
                                         and_(jobs_table.c.lease_until.is_not(None), jobs_table.c.lease_until < now))
        if kind is not None:
            query = query.where(jobs_table.c.kind == kind)
        with self.engine.connect() as conn:
            return [_job(r) for r in conn.execute(query.order_by(jobs_table.c.id))]

    # -- corrections toward auto-retrain ------------------------------------------------------------
    def add_correction(self, project_id: int, key: str | None = None) -> int:
        """Count one annotation event for the project and return the count; a delivery already counted (same
        `key`: annotation id and its update time) is not counted twice."""
        now = time.time()
        with self.engine.begin() as conn:  # one transaction, write first: the event key and the count together
            if key is not None:
                key = key[:200]
                # RETURNING, not rowcount: psycopg's INSERT rowcount is -1 (truthy) once SQLAlchemy closed the cursor
                fresh = conn.execute(_insert_ignore(conn, correction_events, {"key": key, "at": now})
                                     .returning(correction_events.c.key)).first() is not None
                if not fresh:
                    return conn.execute(select(corrections.c.count).where(
                        corrections.c.project_id == project_id)).scalar() or 0
            conn.execute(_upsert_increment(conn, project_id, now))
            if key is not None:
                oldest = select(correction_events.c.key).order_by(correction_events.c.at.desc()) \
                    .offset(MAX_CORRECTION_EVENTS).limit(1_000_000).scalar_subquery()
                conn.execute(delete(correction_events).where(correction_events.c.key.in_(oldest)))
            return conn.execute(select(corrections.c.count).where(corrections.c.project_id == project_id)).scalar_one()

    def expect_delivery(self, key: str) -> None:
        """A webhook delivery Tandem causes itself (`tandem accept --undo` deleting its own annotations): recorded
        as if counted, so that when Label Studio delivers it, it is not counted as a person's correction."""
        with self.engine.begin() as conn:
            conn.execute(_insert_ignore(conn, correction_events, {"key": key[:200], "at": time.time()}))

    def corrections(self, project_id: int) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(corrections.c.count).where(corrections.c.project_id == project_id)).scalar() or 0

    def take_corrections(self, project_id: int, at_least: int) -> bool:
        """Reset the project's count if it reached `at_least`; True for exactly one of concurrent callers (the
        one that queues the job the count asked for)."""
        with self.engine.begin() as conn:
            result = conn.execute(update(corrections).where(
                corrections.c.project_id == project_id, corrections.c.count >= at_least).values(
                count=0, updated_at=time.time()))
        return result.rowcount == 1

    def reset_corrections(self, project_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(corrections).where(corrections.c.project_id == project_id).values(
                count=0, updated_at=time.time()))

    def projects_with_corrections(self) -> list[int]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(corrections.c.project_id).where(corrections.c.count > 0)
                                     .order_by(corrections.c.project_id)).scalars())


def _insert_ignore(conn, table, values: dict):
    return insert_for(conn.dialect.name)(table).values(**values).on_conflict_do_nothing()


def _upsert_increment(conn, project_id: int, now: float):
    stmt = insert_for(conn.dialect.name)(corrections).values(project_id=project_id, count=1, updated_at=now)
    return stmt.on_conflict_do_update(index_elements=[corrections.c.project_id],
                                      set_={"count": corrections.c.count + 1, "updated_at": now})


def _in_range(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -MAX_ID - 1 <= value <= MAX_ID
