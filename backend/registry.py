"""Model versions and server state in the shared database (SQLite under TANDEM_HOME, or PostgreSQL).

Every version the server has served, every candidate a job made (with its metrics, parent and dataset)
and every webhook event. A version a job made for a project carries that project's id: it is promoted
into that project's binding only, never into the server's default model. `path` is where the weights are:
an artifact URI (`backend.storage.artifacts`) or a local path.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, insert, select, update

from backend.storage.db import engine_for, insert_for
from backend.storage.tables import model_versions as mv
from backend.storage.tables import project_versions, webhook_events


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
        """VLM versions are recorded with task "vlm:<tasks>" (e.g. vlm:classify+detect); YOLO weights served as
        the second opinion with "second:<task>", so no promotion or rollback of the CNN ever picks them."""
        if self.task.startswith("vlm:"):
            return "vlm"
        return "second" if self.task.startswith("second:") else "cnn"


def _row(row) -> ModelVersion:
    values = dict(row._mapping)
    values["metrics"] = json.loads(values["metrics"] or "{}")
    return ModelVersion(**values)


def _upsert(conn, values: dict, on_conflict: dict):
    stmt = insert_for(conn.dialect.name)(mv).values(**values)
    return stmt.on_conflict_do_update(index_elements=[mv.c.version],
                                      set_={k: getattr(stmt.excluded, k) for k in on_conflict})


class Registry:
    def __init__(self, db: str | Path) -> None:
        """`db`: a database URL (TANDEM_DATABASE_URL) or the path of a SQLite file."""
        self.engine = engine_for(db)

    def _select(self, *where, order=None) -> list[ModelVersion]:
        query = select(mv).where(*where).order_by(order if order is not None else mv.c.created_at.desc())
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(query)]

    def record_served(self, version: str, name: str, task: str, path: str | None) -> None:
        """A version started serving. `task` "second:<task>" marks YOLO weights served as the second opinion.
        A CNN (or VLM) version also serving as a second opinion keeps its role and its served_at (what
        `current` and a restart go by); weights first seen as a second opinion take the CNN's role once served as
        the CNN."""
        existing = self.get(version)
        as_second = task.startswith("second:")
        if existing is not None and as_second and existing.kind != "second":
            return
        now = time.time()
        update = ["served_at"] + (["task"] if existing is not None and existing.kind == "second" and not as_second
                                  else [])
        with self.engine.begin() as conn:
            conn.execute(_upsert(conn, dict(version=version, name=name, task=task, path=path, created_at=now,
                                            served_at=now), update))

    def versions(self) -> list[ModelVersion]:
        return self._select()

    def get(self, version: str) -> ModelVersion | None:
        found = self._select(mv.c.version == version)
        return found[0] if found else None

    def add_candidate(self, version: str, name: str, task: str, path: str, parent: str | None, dataset: str,
                      metrics: dict, project_id: int | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(_upsert(conn, dict(version=version, name=name, task=task, path=str(path),
                                            created_at=time.time(), metrics=json.dumps(metrics), parent=parent,
                                            dataset=dataset, status="candidate", project_id=project_id),
                                 ["metrics"]))

    def by_path(self, path: str) -> ModelVersion | None:
        found = self._select(mv.c.path == str(path))
        return found[0] if found else None

    def resolve(self, spec: str | None) -> ModelVersion | None:
        """A binding's spec (a registry version or a weights path/folder) as a registry row, if it is one."""
        if not spec:
            return None
        return self.get(spec) or self.by_path(spec)

    def set_status(self, version: str, status: str, metrics: dict | None = None) -> None:
        values: dict = {"status": status}
        if metrics is not None:
            values["metrics"] = json.dumps(metrics)
        if status == "promoted":
            values["promoted_at"] = time.time()
        with self.engine.begin() as conn:
            conn.execute(update(mv).where(mv.c.version == version).values(**values))

    def current(self, kind: str = "cnn") -> ModelVersion | None:
        """The server-wide version of that kind (cnn | vlm): the most recently started or promoted one that no
        project owns (a project's retrains are served to that project only)."""
        live = [v for v in self.versions() if (v.served_at or v.promoted_at) and v.kind == kind
                and v.project_id is None]
        return max(live, key=lambda v: max(v.served_at or 0, v.promoted_at or 0)) if live else None

    def latest_promotion(self) -> float:
        """When anything was last promoted (or rolled back to): what a replica polls to notice a promotion."""
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(mv.c.promoted_at))).scalar() or 0.0

    def promoted(self, kind: str = "cnn", task: str | None = None) -> list[ModelVersion]:
        """What a restart without --model resumes, newest promotion first: versions promoted by a job's gate or
        `tandem models promote` (a rollback too), not since rejected, whose weights are still there."""
        from backend.storage.artifacts import exists

        found = [v for v in self.versions() if v.promoted_at and v.status == "promoted" and v.kind == kind
                 and v.project_id is None and v.path and exists(v.path) and (task is None or v.task == task)]
        return sorted(found, key=lambda v: v.promoted_at, reverse=True)

    def trained_on(self, dataset: str, serving: str) -> ModelVersion | None:
        """A version already made from this exact dataset snapshot that `serving` is, or was fine-tuned from."""
        return next((v for v in self._select(mv.c.dataset == dataset) if serving in (v.version, v.parent)), None)

    def last_served(self, kind: str | None = "cnn") -> ModelVersion | None:
        served = [v for v in self.versions() if v.served_at and (kind is None or v.kind == kind)]
        return max(served, key=lambda v: v.served_at) if served else None

    def record_event(self, project_id: int | None, action: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(webhook_events).values(project_id=project_id, action=action, received_at=time.time()))

    def event_counts(self, project_id: int | None = None) -> dict[str, int]:
        query = select(webhook_events.c.action, func.count()).group_by(webhook_events.c.action)
        if project_id is not None:
            query = query.where(webhook_events.c.project_id == project_id)
        with self.engine.connect() as conn:
            return {action: n for action, n in conn.execute(query)}

    def synced_version(self, project_id: int) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(project_versions.c.model_version).where(
                project_versions.c.project_id == project_id)).scalar()

    def record_synced(self, project_id: int, version: str) -> None:
        now = time.time()
        with self.engine.begin() as conn:
            stmt = insert_for(conn.dialect.name)(project_versions).values(project_id=project_id, model_version=version, synced_at=now)
            conn.execute(stmt.on_conflict_do_update(index_elements=[project_versions.c.project_id],
                                                    set_={"model_version": version, "synced_at": now}))

    def close(self) -> None:
        """The engine is shared per URL and process (`backend.storage.db`): nothing to close per registry."""
