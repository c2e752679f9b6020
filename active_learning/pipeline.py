"""`tandem select`: Label Studio tasks -> stored predictions and scores -> a selected batch -> queue.

Ranking reads what serving stored: each task's scores for the current pair of model versions, else both
models' stored predictions, scored here and stored. Only tasks with no stored prediction for the current
versions are predicted, in bounded chunks (images are fetched, predicted, embedded, stored and released
chunk by chunk), so memory does not grow with the project. The side effects (Label Studio, files, the
database) stay here; the scoring it calls is pure.
"""

from __future__ import annotations

import csv
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from active_learning.queue import LabelStudioQueue, QueueEntry
from active_learning.scoring import SELECT_AGGREGATE, ScoreTable
from active_learning.selection import SelectionConfig, select
from active_learning.stored_scores import reasons_for, score_stored_keys
from active_learning.uncertainty import NEAR
from backend.core.prediction import Role
from backend.errors import ConfigError, MediaError
from backend.labeling.label_map import build_label_map
from backend.media.fetch import MediaFetcher
from backend.predict import Predictor, image_url, plan_for, task_key
from backend.storage.db import dispose
from backend.storage.predictions import Key, PredictionRepo
from backend.storage.scores import NO_REASON, ScoreRepo, ScoreSetup, TaskScore

Progress = Callable[[str, int, int], None]  # (stage, done, total)
SCORE_CHUNK = 2000  # stored predictions decoded and scored at a time


@dataclass
class SelectOutcome:
    entries: list[QueueEntry]
    mode: str
    candidates: int
    labeled: int
    skipped: dict[int, str] = field(default_factory=dict)  # task id -> why (unreadable image)
    views: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    from_store: int = 0  # tasks ranked from stored scores or stored predictions
    second_only: int = 0  # of the others, tasks whose CNN prediction was stored: only the second opinion ran
    predicted: int = 0  # tasks predicted now because nothing was stored for the current versions


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def reason_names(primary, second) -> tuple[str, str]:
    """What reasons call the two models: the CNN as "CNN" (its file stem, often "best", says nothing), a VLM by its
    name ("grounding_dino"), a second YOLO model as "2nd CNN"."""
    from backend.models.base import BoundModel, is_promptable

    if second is None:
        return "CNN", "second"
    model = second.model if isinstance(second, BoundModel) else second  # a VLM bound to the project's labels
    return "CNN", (second.name if is_promptable(model) else "2nd CNN")


def is_labeled(task: Mapping[str, Any]) -> bool:
    return bool(task.get("total_annotations") or task.get("is_labeled"))


class MissingEmbeddings(Exception):
    """Some candidates have no stored embedding and their images cannot be read now."""


class StoredEmbeddings:
    """Embeddings of the candidates, read from the store only for the rows selection asks for (the pool);
    ones not stored are computed from the image when it can be fetched."""

    def __init__(self, store: PredictionRepo, keys: Sequence[Key], control: str,
                 compute: Callable[[list[int]], np.ndarray | None]) -> None:
        self.store, self.keys, self.control, self.compute = store, list(keys), control, compute

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index) -> np.ndarray:
        rows = np.arange(len(self.keys))[index]
        found = self.store.get_controls([self.keys[i] for i in rows], embeddings=True)
        vectors: list[np.ndarray | None] = []
        for i in rows:
            pred = found.get(self.keys[i], {}).get(self.control)
            vectors.append(None if pred is None else pred.embedding)
        missing = [int(i) for i, v in zip(rows, vectors, strict=True) if v is None]
        if missing:
            computed = self.compute(missing)
            if computed is None:
                raise MissingEmbeddings(f"{len(missing)} candidates have no stored embedding")
            fill = dict(zip(missing, computed, strict=True))
            vectors = [fill[int(i)] if v is None else v for i, v in zip(rows, vectors, strict=True)]
        return np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, 0), np.float32)

    def __array__(self, dtype=None, copy=None):
        out = self[np.arange(len(self.keys))]
        return out.astype(dtype) if dtype is not None else out


class LazyReasons(Sequence[str]):
    """Each candidate's reason, built from the stored predictions only when read: a ranking pass over 100k stored
    tasks stores their scores without sentences (`NO_REASON`), and only the picked few (or, for a dry run's
    scores.csv, every candidate, a chunk at a time) pay for one."""

    def __init__(self, reasons: list[str], build: Callable[[list[int]], dict[int, str]],
                 chunk: int = SCORE_CHUNK) -> None:
        self._reasons: list[str | None] = [r if r != NO_REASON else None for r in reasons]
        self._build, self._chunk = build, chunk

    def __len__(self) -> int:
        return len(self._reasons)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]
        if self._reasons[index] is None:
            self.fill(range(index, min(index + self._chunk, len(self))))  # read in order (scores.csv): one build a chunk
        return self._reasons[index]

    def fill(self, rows) -> None:
        missing = [int(i) for i in rows if self._reasons[int(i)] is None]
        if not missing:
            return
        built = self._build(missing)
        for i in missing:
            self._reasons[i] = built.get(i, NO_REASON)  # gone from the store since: said as nothing, not retried


def run_selection(
    tasks: Sequence[Any],
    label_config: str,
    fetcher: MediaFetcher,
    primary,
    config: SelectionConfig,
    second=None,
    progress: Progress = lambda *_: None,
    max_labeled_for_diversity: int = 256,
    aggregate: str = SELECT_AGGREGATE,
    label_map: Mapping[str, str] | None = None,
    case_sensitive: bool = False,
    *,
    store: PredictionRepo | None = None,
    scores: ScoreRepo | None = None,
    project_id: int | None = None,
    threshold: float = NEAR[0],
    prompts: Mapping[str, str] | None = None,
    chunk: int = 4,
) -> tuple[SelectOutcome, ScoreTable | None, list[int]]:
    """Rank the project's unlabeled tasks on the first control the primary model fills, in its labels.

    `threshold` is the serving confidence threshold (what annotators see, and what reasons name). Without a
    `store`, predictions go to a throwaway one. Raises ConfigError, before any image is fetched, when the
    primary cannot fill the config or no class of the second model maps onto that control's labels.
    """
    if store is not None and scores is not None:
        return _run_selection(tasks, label_config, fetcher, primary, config, second, progress,
                              max_labeled_for_diversity, aggregate, label_map, case_sensitive, store, scores,
                              project_id, threshold, prompts, chunk)
    with tempfile.TemporaryDirectory(prefix="tandem-select-") as folder:  # a throwaway store, removed after
        url = f"sqlite:///{Path(folder) / 'select.db'}"
        throwaway = PredictionRepo(url)
        try:
            return _run_selection(tasks, label_config, fetcher, primary, config, second, progress,
                                  max_labeled_for_diversity, aggregate, label_map, case_sensitive,
                                  store or throwaway, scores or ScoreRepo(url), project_id, threshold, prompts, chunk)
        finally:
            throwaway.close()
            dispose(url)


def _run_selection(tasks, label_config, fetcher, primary, config, second, progress, max_labeled_for_diversity,
                   aggregate, label_map, case_sensitive, store: PredictionRepo, scores: ScoreRepo, project_id,
                   threshold, prompts, chunk) -> tuple[SelectOutcome, ScoreTable | None, list[int]]:
    t0 = time.perf_counter()
    plan1 = plan_for(primary, label_config, label_map, case_sensitive, prompts, min_confidence=threshold)
    control = plan1.controls[0].control
    plan2 = None
    if second is not None:
        build_label_map(control, second.class_names, label_map, case_sensitive)  # its clear error, first
        plan2 = plan_for(second, label_config, label_map, case_sensitive, prompts, min_confidence=threshold)
        if control.name not in {c.control.name for c in plan2.controls}:
            raise ConfigError(f"the second opinion {second.name} cannot fill '{control.name}', the control "
                              f"{primary.name} is ranked on")
    names = reason_names(primary, second)
    setup = ScoreSetup(plan1.version, plan2.version if plan2 else "", plan1.fingerprint, control.name, aggregate,
                       threshold)

    candidates = [t for t in tasks if not is_labeled(t)]
    labeled = [t for t in tasks if is_labeled(t)]
    keys1: dict[int, Key] = {}
    keys2: dict[int, Key] = {}
    # task_key fingerprints (plan fingerprint, image URLs): the second plan's equals the first's when both ask
    # the same of the same images, so it is hashed once per task, not twice
    same_ask = plan2 is not None and (plan2.fingerprint, plan2.image_keys) == (plan1.fingerprint, plan1.image_keys)
    for task in candidates:
        k1 = task_key(task, plan1)
        if k1 is not None:
            keys1[k1[0]] = k1
            if plan2 is not None:
                keys2[k1[0]] = (k1[0], plan2.version, k1[2]) if same_ask else task_key(task, plan2)
    by_id = {t["id"]: t for t in candidates if t.get("id") in keys1}
    skipped: dict[int, str] = {}

    # 1. scores stored at serve time (or by an earlier select)
    found: dict[int, TaskScore] = scores.get_many(setup, {tid: k[2] for tid, k in keys1.items()})
    # the bar counts tasks looked up, found or not, so that it ends full; what was missing is the next bar's
    checked = len(found)
    progress("looked up in the store", checked, len(keys1))
    # 2. both models' stored predictions, scored now (and stored); reasons only for what is picked (below)
    todo = [tid for tid in keys1 if tid not in found]
    for part in _chunks(todo, SCORE_CHUNK):
        got = score_stored_keys(store, scores, setup, project_id, {t: keys1[t] for t in part},
                                {t: keys2[t] for t in part} if plan2 else None, names, reasons=False)
        found.update((s.task_id, s) for s in got)
        checked += len(part)
        progress("looked up in the store", checked, len(keys1))
    from_store = len(found)
    # 3. what is missing is predicted, a chunk at a time, and stored like a /predict would
    todo = [tid for tid in keys1 if tid not in found]
    # tasks whose CNN prediction is stored but whose second opinion is not (a new second model): said, not hidden
    half_ids = {k[0] for k in store.stored_keys([keys1[t] for t in todo])} if plan2 is not None and todo else set()
    half = len(half_ids)
    label = (f"predict {len(todo)} not stored ({from_store} from the store"
             + (f"; {half} of them lack only the second opinion" if half else "") + ")")
    predictor = Predictor(fetcher, workers=min(8, max(chunk, 1)), store=store, max_chunk=chunk)
    done = 0
    for part in _chunks(todo, chunk):
        part_tasks = [by_id[t] for t in part]
        items = predictor.predict(part_tasks, plan1, project_id=project_id, role=Role.PRE_ANNOTATION, embed=True)
        ok = [t for t, item in zip(part, items, strict=True) if "result" in item]
        skipped.update((t, item["error"]) for t, item in zip(part, items, strict=True) if "result" not in item)
        if plan2 is not None and ok:
            items2 = predictor.predict([by_id[t] for t in ok], plan2, project_id=project_id, role=Role.SECOND_OPINION)
            skipped.update((t, item["error"]) for t, item in zip(ok, items2, strict=True) if "result" not in item)
        store.flush()
        got = score_stored_keys(store, scores, setup, project_id, {t: keys1[t] for t in ok},
                                {t: keys2[t] for t in ok} if plan2 else None, names)
        found.update((s.task_id, s) for s in got)
        done += len(part)
        progress(label, done, len(todo))
    predictor.close()
    skipped.update((t["id"], "no usable task id") for t in candidates if t.get("id") not in keys1)

    ids = [tid for tid in keys1 if tid in found]
    outcome = SelectOutcome([], "empty", len(ids), len(labeled), skipped, from_store=from_store,
                            predicted=len(ids) - from_store, second_only=sum(t in found for t in half_ids))
    if not ids:
        outcome.seconds = time.perf_counter() - t0
        return outcome, None, ids

    def build_reasons(rows: list[int]) -> dict[int, str]:
        part = [ids[i] for i in rows]
        got = reasons_for(store, scores, setup, project_id, {t: keys1[t] for t in part},
                          {t: keys2[t] for t in part} if plan2 else None, names)
        return {i: got[t] for i, t in zip(rows, part, strict=True) if t in got}

    table = ScoreTable(
        uncertainty=np.array([found[t].uncertainty for t in ids]),
        disagreement=np.array([found[t].disagreement for t in ids], dtype=float) if plan2 else None,
        reasons=LazyReasons([found[t].reason for t in ids], build_reasons),
    )

    def compute(rows: list[int]) -> np.ndarray | None:
        """Embeddings from the images of a few tasks (the pool), or None when one cannot be read."""
        key = control.image_key
        try:
            images = [fetcher.load(image_url(by_id[ids[i]], key) or "", task_id=ids[i]).image for i in rows]
        except MediaError:
            return None
        return _embed_all(primary, images)

    from backend.models.base import Capability

    embeddings = StoredEmbeddings(store, [keys1[t] for t in ids], control.name, compute) \
        if Capability.EMBED in getattr(primary, "capabilities", ()) else None
    labeled_emb = None
    if embeddings is not None and labeled:
        images = []
        for task in labeled[:max_labeled_for_diversity]:
            try:
                images.append(fetcher.load(image_url(task, control.image_key) or "", task_id=task.get("id")).image)
            except MediaError:
                continue
        labeled_emb = _embed_all(primary, images) if images else None
        progress("embed labeled", len(images), len(images))
    try:
        selection = select(config, table.uncertainty, table.disagreement, embeddings, labeled_emb,
                           num_labeled=len(labeled))
    except MissingEmbeddings:
        selection = select(config, table.uncertainty, table.disagreement, None, None, num_labeled=len(labeled))
        selection = type(selection)(selection.indices, selection.acquisition, selection.control,
                                    selection.mode + " (no diversity: images unavailable for embeddings)")
    table.reasons.fill(selection.indices)
    entries = []
    for rank, (idx, is_control) in enumerate(zip(selection.indices, selection.control, strict=True), start=1):
        entries.append(
            QueueEntry(
                task_id=int(ids[idx]),
                rank=rank,
                score=float(selection.acquisition[idx]),
                uncertainty=float(table.uncertainty[idx]),
                disagreement=None if table.disagreement is None else float(table.disagreement[idx]),
                reason=("control: random pick; " if is_control else "") + table.reasons[idx],
                control=bool(is_control),
            )
        )
    outcome.entries, outcome.mode = entries, selection.mode
    outcome.seconds = time.perf_counter() - t0
    return outcome, table, ids


def _embed_all(adapter, images, size: int = 16) -> np.ndarray:
    return np.concatenate([adapter.embed(part) for part in _chunks(images, size)]).astype(np.float32)


def write_dry_run(outcome: SelectOutcome, table: ScoreTable | None, ids: Sequence[int], out_dir: Path) -> list[Path]:
    """Write the picks (CSV + JSON) and every candidate's scores (CSV) instead of touching Label Studio."""
    out_dir.mkdir(parents=True, exist_ok=True)
    picks_csv = out_dir / "selection.csv"
    with picks_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(outcome.entries[0]).keys()) if outcome.entries else ["task_id"])
        writer.writeheader()
        for e in outcome.entries:
            writer.writerow(asdict(e))
    picks_json = out_dir / "selection.json"
    picks_json.write_text(json.dumps({
        "mode": outcome.mode, "candidates": outcome.candidates, "labeled": outcome.labeled,
        "skipped": outcome.skipped, "entries": [asdict(e) for e in outcome.entries]}, indent=2))
    files = [picks_csv, picks_json]
    if table is not None:
        scores_csv = out_dir / "scores.csv"
        with scores_csv.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["task_id", "uncertainty", "disagreement", "reason"])
            for i, task_id in enumerate(ids):
                d = "" if table.disagreement is None else f"{table.disagreement[i]:.6f}"
                writer.writerow([task_id, f"{table.uncertainty[i]:.6f}", d, table.reasons[i]])
        files.append(scores_csv)
    return files


def write_queue(queue: LabelStudioQueue, outcome: SelectOutcome, tasks: Sequence[Any], run: str) -> None:
    data = {t["id"]: t.get("data") or {} for t in tasks}
    queue.write(outcome.entries, data, run)
    with_disagreement = any(e.disagreement is not None for e in outcome.entries)
    outcome.views = queue.ensure_views(with_disagreement)


__all__ = ["SelectOutcome", "run_selection", "write_dry_run", "write_queue"]
