"""`tandem select`: Label Studio tasks -> images -> both models -> scores -> a selected batch -> queue.

The side effects (Label Studio, files) stay here; the scoring it calls is pure.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from active_learning.label_view import in_labels
from active_learning.queue import LabelStudioQueue, QueueEntry
from active_learning.scoring import SELECT_AGGREGATE, ScoreTable, score_outputs
from active_learning.selection import SelectionConfig, select
from backend.errors import MediaError
from backend.labeling.label_map import build_label_map
from backend.media.fetch import MediaFetcher
from backend.predict import image_url, plan_for

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class SelectOutcome:
    entries: list[QueueEntry]
    mode: str
    candidates: int
    labeled: int
    skipped: dict[int, str] = field(default_factory=dict)  # task id -> why (unreadable image)
    written: dict[str, int] = field(default_factory=dict)
    views: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _run_model(adapter, images, progress: Progress, stage: str, chunk: int = 32):
    outputs = []
    for start, part in _chunks(images, chunk):
        outputs.extend(adapter.predict(part))
        progress(stage, start + len(part), len(images))
    return outputs


def _embed(adapter, images, progress: Progress, stage: str, chunk: int = 32) -> np.ndarray | None:
    if not hasattr(adapter, "embed") or not images:
        return None
    parts = []
    for start, part in _chunks(images, chunk):
        parts.append(adapter.embed(part))
        progress(stage, start + len(part), len(images))
    return np.concatenate(parts)


def reason_names(primary, second) -> tuple[str, str]:
    """What reasons call the two models: the CNN as "CNN" (its file stem, often "best", says nothing), a VLM by its
    name ("grounding_dino"), a second YOLO model as "2nd CNN"."""
    from backend.models.yolo import YoloAdapter

    if second is None:
        return "CNN", "second"
    return "CNN", ("2nd CNN" if isinstance(second, YoloAdapter) else second.name)


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
) -> tuple[SelectOutcome, ScoreTable | None, list[int]]:
    """Rank the project's unlabeled tasks on the first control the primary model fills, in its labels.

    Raises ConfigError, before any image is fetched, when the primary cannot fill the config or no class
    of the second model maps onto that control's labels.
    """
    t0 = time.perf_counter()
    planned = plan_for(primary, label_config, label_map, case_sensitive).controls[0]
    control, key = planned.control, planned.control.image_key
    label_names = [label.result_value for label in control.labels]
    second_labels = build_label_map(control, second.class_names, label_map, case_sensitive) if second else None
    unlabeled = [t for t in tasks if not t.get("total_annotations") and not t.get("is_labeled")]
    labeled = [t for t in tasks if t.get("total_annotations") or t.get("is_labeled")]

    def load(task_list, stage):
        images, ids, skipped = [], [], {}
        for i, task in enumerate(task_list):
            try:
                images.append(fetcher.load(image_url(task, key) or "", task_id=task["id"]).image)
                ids.append(task["id"])
            except MediaError as exc:
                skipped[task["id"]] = str(exc)
            progress(stage, i + 1, len(task_list))
        return images, ids, skipped

    images, ids, skipped = load(unlabeled, "fetch images")
    outcome = SelectOutcome([], "empty", len(ids), len(labeled), skipped)
    if not images:
        outcome.seconds = time.perf_counter() - t0
        return outcome, None, ids

    first = in_labels(_run_model(primary, images, progress, f"predict {primary.name}"), primary.class_names,
                      planned.labels, label_names)
    other = None
    if second is not None:
        other = in_labels(_run_model(second, images, progress, f"predict {second.name}"), second.class_names,
                          second_labels, label_names)
    table = score_outputs(first, label_names, other, label_names if second else None,
                          model_names=reason_names(primary, second), aggregate=aggregate)
    embeddings = _embed(primary, images, progress, "embed")
    labeled_emb = None
    if embeddings is not None and labeled:
        sample = labeled[:max_labeled_for_diversity]
        lab_images, _, _ = load(sample, "fetch labeled images")
        labeled_emb = _embed(primary, lab_images, progress, "embed labeled") if lab_images else None

    selection = select(config, table.uncertainty, table.disagreement, embeddings, labeled_emb, num_labeled=len(labeled))
    entries = []
    for rank, (idx, control) in enumerate(zip(selection.indices, selection.control, strict=True), start=1):
        entries.append(
            QueueEntry(
                task_id=int(ids[idx]),
                rank=rank,
                score=float(selection.acquisition[idx]),
                uncertainty=float(table.uncertainty[idx]),
                disagreement=None if table.disagreement is None else float(table.disagreement[idx]),
                reason=("control: random pick; " if control else "") + table.reasons[idx],
                control=bool(control),
            )
        )
    outcome.entries, outcome.mode = entries, selection.mode
    outcome.seconds = time.perf_counter() - t0
    return outcome, table, ids


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
    outcome.written = queue.write(outcome.entries, data, run)
    with_disagreement = any(e.disagreement is not None for e in outcome.entries)
    outcome.views = queue.ensure_views(with_disagreement)


__all__ = ["SelectOutcome", "run_selection", "write_dry_run", "write_queue"]
