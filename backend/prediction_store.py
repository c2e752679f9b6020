"""Predictions kept under TANDEM_HOME (SQLite): the answer cache behind the /predict time budget, and the
second model's opinions that active learning scores disagreement against.

A row is keyed by task, model version and a fingerprint of what was asked (labeling config, label map,
prompts and the task's image URLs), so a changed image or config is never answered from the cache.

/predict hands its rows to a writer thread (`put_many_later`) and answers without waiting for SQLite;
every read here waits for the writes handed over before it, so this process always reads its own writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.sqlite_db import SqliteDb

log = logging.getLogger("tandem.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    task_id       INTEGER NOT NULL,
    model_version TEXT NOT NULL,
    fingerprint   TEXT NOT NULL,
    project_id    INTEGER,
    model_name    TEXT NOT NULL,
    role          TEXT NOT NULL,        -- pre-annotation | second-opinion
    item          TEXT NOT NULL,        -- the Label Studio prediction: result, score, model_version
    created_at    REAL NOT NULL,
    PRIMARY KEY (task_id, model_version, fingerprint)
);
CREATE INDEX IF NOT EXISTS predictions_by_project ON predictions(project_id, role);
"""


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StoredPrediction:
    task_id: int
    model_version: str
    model_name: str
    role: str
    project_id: int | None
    item: dict[str, Any]
    created_at: float


class PredictionStore(SqliteDb):
    def __init__(self, db_path: Path) -> None:
        super().__init__(db_path, _SCHEMA)
        # /predict writes here on every call: a cache may lose its last rows on power loss, not fsync each one
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tandem-store")
        self._last_write: Future | None = None

    def put_many_later(self, rows: Iterable[tuple[int, str, str, int | None, str, str, Mapping[str, Any]]]) -> None:
        """`put_many` on the writer thread; a failure is logged (this is a cache), never raised to the caller.
        The items must not be changed afterwards."""
        rows = list(rows)

        def write() -> None:
            try:
                self.put_many(rows)
            except Exception:
                log.exception("could not store %d predictions", len(rows))

        self._last_write = self._writer.submit(write)

    def flush(self) -> None:
        """Wait for the writes handed over so far (one thread, in order: waiting for the last is enough)."""
        last = self._last_write
        if last is not None and not last.done():
            last.result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        super().close()

    def get_many(self, keys: Sequence[tuple[int, str, str]]) -> dict[tuple[int, str, str], dict[str, Any]]:
        """(task_id, version, fingerprint) -> stored item, for the keys that exist."""
        self.flush()
        found: dict[tuple[int, str, str], dict[str, Any]] = {}
        with self._lock:
            for start in range(0, len(keys), 300):
                part = keys[start : start + 300]
                where = " OR ".join(["(task_id=? AND model_version=? AND fingerprint=?)"] * len(part))
                args = [v for key in part for v in key]
                for task_id, version, fp, item in self._conn.execute(
                    f"SELECT task_id, model_version, fingerprint, item FROM predictions WHERE {where}", args
                ):
                    found[(task_id, version, fp)] = json.loads(item)
        return found

    def put_many(self, rows: Iterable[tuple[int, str, str, int | None, str, str, Mapping[str, Any]]]) -> int:
        """Rows of (task_id, version, fingerprint, project_id, model_name, role, item); last write wins."""
        now = time.time()
        values = [(t, v, f, p, n, r, json.dumps(item), now) for t, v, f, p, n, r, item in rows]
        with self._tx() as conn:
            conn.executemany("INSERT OR REPLACE INTO predictions VALUES (?,?,?,?,?,?,?,?)", values)
        return len(values)

    def for_project(self, project_id: int, role: str | None = None, model_version: str | None = None
                    ) -> list[StoredPrediction]:
        """The newest stored prediction per (task, model version) of a project."""
        sql = ("SELECT task_id, model_version, model_name, role, project_id, item, created_at FROM predictions "
               "WHERE project_id=?")
        args: list[Any] = [project_id]
        if role:
            sql, args = sql + " AND role=?", [*args, role]
        if model_version:
            sql, args = sql + " AND model_version=?", [*args, model_version]
        self.flush()
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY created_at", args).fetchall()
        latest = {(r[0], r[1]): r for r in rows}
        return [StoredPrediction(t, v, n, role_, p, json.loads(item), c)
                for t, v, n, role_, p, item, c in latest.values()]
