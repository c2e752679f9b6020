"""Each task's scores for one pair of model versions and one scoring setup, ready for `tandem select`."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import and_, select

from backend.storage.db import engine_for, insert_for
from backend.storage.predictions import fingerprint
from backend.storage.tables import task_scores as T

_CHUNK = 800


@dataclass(frozen=True)
class ScoreSetup:
    """Everything a score depends on besides the task: scores of another setup are never reused."""

    primary_version: str
    second_version: str  # "" without a second opinion
    fingerprint: str  # of the labeling config, label map, prompts (the plan's)
    control: str
    aggregate: str
    threshold: float

    @property
    def key(self) -> str:
        return fingerprint(self.primary_version, self.second_version, self.fingerprint, self.control,
                           self.aggregate, round(self.threshold, 6))


NO_REASON = ""  # a score stored without its sentence (a ranking pass over many tasks); built when picked


@dataclass(frozen=True)
class TaskScore:
    task_id: int
    uncertainty: float
    disagreement: float | None
    reason: str  # NO_REASON until built
    task_fingerprint: str = ""  # the stored prediction's fingerprint (config + image URLs) it was scored from


class ScoreRepo:
    def __init__(self, url: str) -> None:
        self.engine = engine_for(url)

    def put_many(self, setup: ScoreSetup, project_id: int | None, scores: Iterable[TaskScore]) -> int:
        now, key = time.time(), setup.key
        values = [{"task_id": s.task_id, "key": key, "project_id": project_id,
                   "primary_version": setup.primary_version, "second_version": setup.second_version,
                   "uncertainty": float(s.uncertainty),
                   "disagreement": None if s.disagreement is None else float(s.disagreement),
                   "reason": s.reason, "task_fingerprint": s.task_fingerprint, "created_at": now} for s in scores]
        if not values:
            return 0
        insert = insert_for(self.engine.dialect.name)
        stmt = insert(T)
        keep = {c: stmt.excluded[c] for c in ("project_id", "uncertainty", "disagreement", "reason",
                                              "task_fingerprint", "created_at")}
        with self.engine.begin() as conn:  # one statement, executemany: compiled once
            conn.execute(stmt.on_conflict_do_update(index_elements=["task_id", "key"], set_=keep), values)
        return len(values)

    def get_many(self, setup: ScoreSetup, fingerprints: Mapping[int, str]) -> dict[int, TaskScore]:
        """task id -> its stored score, for the tasks scored under `setup` from the same task fingerprint."""
        key = setup.key
        ids = list(fingerprints)
        out: dict[int, TaskScore] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), _CHUNK):
                part = ids[start : start + _CHUNK]
                query = select(T.c.task_id, T.c.uncertainty, T.c.disagreement, T.c.reason, T.c.task_fingerprint
                               ).where(and_(T.c.key == key, T.c.task_id.in_(part)))
                for row in conn.execute(query):
                    if row[4] == fingerprints[row[0]]:
                        out[row[0]] = TaskScore(row[0], row[1], row[2], row[3], row[4])
        return out
