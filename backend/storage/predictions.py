"""Stored predictions: one row per task, model version and fingerprint of what was asked.

Each row holds what Label Studio was (or would be) answered — the cache behind /predict's time budget —
and the typed `Prediction` per control, in the control's labels, which scoring, `tandem select` and
reports read back instead of predicting again.

/predict hands its rows to a writer thread (`put_many_later`) and answers without waiting for the
database; every read here waits for the writes handed over before it, so a process reads its own writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select

from backend.core.prediction import Prediction
from backend.storage.db import engine_for, insert_for
from backend.storage.outage import OutageLog, is_unavailable
from backend.storage.tables import predictions as T

log = logging.getLogger("tandem.store")

Key = tuple[int, str, str]  # (task_id, model_version, fingerprint)
_CHUNK = 400


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PredictionRow:
    task_id: int
    model_version: str
    fingerprint: str
    project_id: int | None
    model_name: str
    role: str
    item: Mapping[str, Any]  # the Label Studio prediction: result, score, model_version
    controls: Mapping[str, Prediction] = field(default_factory=dict)  # control name -> prediction in its labels
    made_with: str | None = None  # the thresholds it was made under (backend.predict.made_with)
    created_at: float = 0.0  # when it was stored (epoch seconds; set on rows read back, ignored on writes)

    @property
    def key(self) -> Key:
        return (self.task_id, self.model_version, self.fingerprint)


def _record(controls: Mapping[str, Prediction]) -> str | None:
    if not controls:
        return None
    return json.dumps({name: p.to_record() for name, p in controls.items()})


def decode_controls(record: str | None, embedding: bool = True) -> dict[str, Prediction]:
    if not record:
        return {}
    return {name: Prediction.from_record(rec, embedding) for name, rec in json.loads(record).items()}


def _upsert(dialect: str):
    """One statement executed for many rows (executemany): compiled once, not once per chunk of values."""
    stmt = insert_for(dialect)(T)
    keep = {c: stmt.excluded[c] for c in ("project_id", "role", "model_name", "item", "record", "created_at",
                                          "made_with")}
    return stmt.on_conflict_do_update(index_elements=["task_id", "model_version", "fingerprint"], set_=keep)


class PredictionRepo:
    def __init__(self, url: str) -> None:
        self.engine = engine_for(url)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tandem-store")
        self._outage = OutageLog(log, "storing predictions (they are served all the same)")
        self._last_write: Future | None = None
        self._writer_ident: int | None = None

    # -- writes ---------------------------------------------------------------------------------------
    def put_many(self, rows: Iterable[PredictionRow]) -> int:
        """Last write wins per key."""
        now = time.time()
        values = [
            {"task_id": r.task_id, "model_version": r.model_version, "fingerprint": r.fingerprint,
             "project_id": r.project_id, "role": r.role, "model_name": r.model_name,
             "item": json.dumps(r.item), "record": _record(r.controls), "created_at": now, "made_with": r.made_with}
            for r in rows
        ]
        if not values:
            return 0
        dedup = list({(v["task_id"], v["model_version"], v["fingerprint"]): v for v in values}.values())
        with self.engine.begin() as conn:
            conn.execute(_upsert(self.engine.dialect.name), dedup)
        return len(dedup)

    def put_many_later(self, rows: Iterable[PredictionRow], then=None) -> None:
        """`put_many` on the writer thread, then `then(rows)` there; a failure is logged, never raised to the
        caller (this is a cache). The rows must not be changed afterwards."""
        rows = list(rows)

        def write() -> None:
            self._writer_ident = threading.get_ident()
            try:
                self.put_many(rows)
                self._outage.ok()
            except Exception as exc:  # noqa: BLE001 - a cache: serving goes on without it
                if is_unavailable(exc):  # one line per outage, not a traceback per write
                    self._outage.failed(exc)
                else:
                    log.exception("could not store %d predictions", len(rows))
                return
            if then is not None:
                try:
                    then(rows)
                except Exception as exc:  # noqa: BLE001 - scoring them: done again from the store later
                    if not is_unavailable(exc):
                        log.exception("after storing %d predictions", len(rows))
                    else:
                        self._outage.failed(exc)

        self._last_write = self._writer.submit(write)

    def flush(self) -> None:
        """Wait for the writes handed over so far (one thread, in order: waiting for the last is enough). On the
        writer thread itself (a `then` callback reading back) everything before is already written."""
        if threading.get_ident() == self._writer_ident:
            return
        last = self._last_write
        if last is not None and not last.done():
            last.result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    # -- reads ----------------------------------------------------------------------------------------
    def get_items(self, keys: Sequence[Key], made_with: str | None = None) -> dict[Key, dict[str, Any]]:
        """key -> the stored Label Studio item, for the keys that exist; with `made_with`, only items made under
        those thresholds (or before they were recorded): others are predicted again and overwritten."""
        if made_with is None:
            return {k: json.loads(item) for k, item in self.get_item_texts(keys).items()}
        return {k: json.loads(item) for k, (item, stamp) in self._rows(keys, T.c.item, T.c.made_with)
                if item and stamp in (None, made_with)}

    def stored_keys(self, keys: Sequence[Key], made_with: str | None = None) -> set[Key]:
        """The keys that have a stored prediction, reading none of them (a job's ledger check); with
        `made_with`, only those made under those thresholds (or before they were recorded)."""
        stamps = self.stored_stamps(keys)
        return {k for k, stamp in stamps.items() if made_with is None or stamp in (None, made_with)}

    def stored_stamps(self, keys: Sequence[Key]) -> dict[Key, str | None]:
        """key -> the `made_with` stamp, for the keys that have a stored prediction (one read per call)."""
        return dict(self._rows(keys, T.c.made_with))

    def get_item_texts(self, keys: Sequence[Key]) -> dict[Key, str]:
        """key -> the stored Label Studio item's JSON text, undecoded: what a bulk writer sizes its requests by."""
        return {k: item for k, item in self._rows(keys, T.c.item) if item}

    def get_controls(self, keys: Sequence[Key], embeddings: bool = False) -> dict[Key, dict[str, Prediction]]:
        """key -> {control: Prediction}, for the keys that exist and hold typed predictions. Stored embeddings
        are decoded only when asked for (scoring never reads them)."""
        return {k: decode_controls(rec, embeddings) for k, rec in self._rows(keys, T.c.record) if rec}

    def get_record_texts(self, keys: Sequence[Key]) -> dict[Key, str]:
        """key -> the stored typed-predictions JSON text, undecoded, for the keys that hold one: what bulk decoders
        (`detection_columns`) parse a row at a time, keeping no parsed dict alive (100k parsed records kept
        at once made Python's garbage collector, not the parsing, the cost)."""
        return {k: rec for k, rec in self._rows(keys, T.c.record) if rec}

    def _rows(self, keys: Sequence[Key], column, also=None) -> Iterator[tuple[Key, Any]]:
        """By version, then task ids through the primary key's index (a row-value IN makes SQLite scan the
        table once per chunk); the fingerprint is checked here. With `also`, values are (column, also) pairs."""
        self.flush()
        cols = [T.c.task_id, T.c.fingerprint, column, *([also] if also is not None else [])]
        wanted: dict[str, dict[int, set[str]]] = {}
        for task_id, version, fp in keys:
            wanted.setdefault(version, {}).setdefault(task_id, set()).add(fp)
        with self.engine.connect() as conn:
            for version, tasks in wanted.items():
                ids = list(tasks)
                for start in range(0, len(ids), _CHUNK):
                    query = select(*cols).where(T.c.task_id.in_(ids[start : start + _CHUNK]),
                                                T.c.model_version == version)
                    for row in conn.execute(query):
                        if row[1] in tasks[row[0]]:
                            yield (row[0], version, row[1]), (row[2] if also is None else (row[2], row[3]))

    def for_project(self, project_id: int, role: str | None = None, model_version: str | None = None
                    ) -> list[PredictionRow]:
        """Every stored row of a project (newest last); for reports and tests, not for large projects."""
        self.flush()
        query = select(T).where(T.c.project_id == project_id).order_by(T.c.created_at)
        if role:
            query = query.where(T.c.role == role)
        if model_version:
            query = query.where(T.c.model_version == model_version)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [PredictionRow(r["task_id"], r["model_version"], r["fingerprint"], r["project_id"], r["model_name"],
                              r["role"], json.loads(r["item"]), decode_controls(r["record"]), r["made_with"],
                              r["created_at"])
                for r in rows]

    def count(self, project_id: int | None = None) -> int:
        from sqlalchemy import func

        self.flush()
        query = select(func.count()).select_from(T)
        if project_id is not None:
            query = query.where(T.c.project_id == project_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def delete_project(self, project_id: int) -> None:
        self.flush()
        with self.engine.begin() as conn:
            conn.execute(delete(T).where(T.c.project_id == project_id))
