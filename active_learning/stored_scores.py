"""Scores from stored predictions: both models' `Prediction`s of a task, already in the control's labels.

Used at serve time (as soon as the second of the two models has answered a task) and by `tandem select`
for tasks whose scores were not stored yet. Every score here is per image, so scoring in chunks gives
the same numbers as scoring everything at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace

from active_learning.scoring import score_columns, score_outputs
from backend.core.prediction import ColumnsBuilder, Prediction
from backend.storage.predictions import Key, PredictionRepo
from backend.storage.scores import NO_REASON, ScoreRepo, ScoreSetup, TaskScore


def score_pairs(
    task_ids: Sequence[int],
    first: Sequence[Prediction],
    second: Sequence[Prediction] | None,
    model_names: tuple[str, str],
    aggregate: str,
    threshold: float,
    task_fingerprints: Sequence[str] | None = None,
) -> list[TaskScore]:
    """One TaskScore per task; `first[i]` and `second[i]` are task i's predictions in the same labels."""
    if not task_ids:
        return []
    names = list(first[0].class_names)
    table = score_outputs(first, names, second, names if second is not None else None, model_names=model_names,
                          aggregate=aggregate, threshold=threshold)
    return _task_scores(task_ids, table, task_fingerprints or [""] * len(task_ids))


def score_stored_keys(
    predictions: PredictionRepo,
    scores: ScoreRepo,
    setup: ScoreSetup,
    project_id: int | None,
    first_keys: Mapping[int, Key],
    second_keys: Mapping[int, Key] | None,
    model_names: tuple[str, str],
    reasons: bool = True,
) -> list[TaskScore]:
    """Score (and store) the tasks whose stored predictions from both models exist; the rest are left out.

    Detections are decoded column-wise (`ColumnsBuilder`), never as a Prediction per task. With
    `reasons=False` the scores are stored with the reason "" (`NO_REASON`): `reasons_for` builds it later, for
    the few tasks a selection picks."""
    firsts = predictions.get_record_texts(list(first_keys.values()))
    seconds = predictions.get_record_texts(list(second_keys.values())) if second_keys is not None else {}
    control, paired = setup.control, second_keys is not None
    ids, fps = [], []
    cols_a, cols_b = ColumnsBuilder(), ColumnsBuilder()
    preds_a: list[Prediction] = []
    preds_b: list[Prediction] = []
    classify = decoded = None
    for task_id, key in first_keys.items():
        mine = _control(firsts.get(key), control)
        if mine is None:
            continue
        other = _control(seconds.get(second_keys.get(task_id)), control) if paired else None
        if paired and other is None:
            continue
        if classify is None:
            classify, names = "probabilities" in mine, mine.get("class_names", [])
            decoded = classify or (paired and _masked(mine, other))  # masks compare by mask IoU (masks.py)
        if decoded:  # a probability vector each (small), or masks: decoded one by one
            preds_a.append(Prediction.from_record(mine, embedding=False))
            if paired:
                preds_b.append(Prediction.from_record(other, embedding=False))
        else:  # parsed, added as bytes and strings, and dropped: no parsed dict outlives its row
            cols_a.add(mine)
            if paired:
                cols_b.add(other)
        ids.append(task_id)
        fps.append(key[2])
    if not ids:
        return []
    if decoded:
        found = score_pairs(ids, preds_a, preds_b if paired else None, model_names, setup.aggregate, setup.threshold,
                            fps)
        if not reasons:
            found = [replace(s, reason=NO_REASON) for s in found]
    else:
        table = score_columns(cols_a.build(), names, cols_b.build() if paired else None, model_names=model_names,
                              aggregate=setup.aggregate, threshold=setup.threshold, reasons=reasons)
        found = _task_scores(ids, table, fps)
    scores.put_many(setup, project_id, found)
    return found


def reasons_for(
    predictions: PredictionRepo,
    scores: ScoreRepo,
    setup: ScoreSetup,
    project_id: int | None,
    first_keys: Mapping[int, Key],
    second_keys: Mapping[int, Key] | None,
    model_names: tuple[str, str],
) -> dict[int, str]:
    """task id -> its reason, built from the stored predictions (and stored with its scores, which are the same
    numbers: each image is scored on its own)."""
    found = score_stored_keys(predictions, scores, setup, project_id, first_keys, second_keys, model_names)
    return {s.task_id: s.reason for s in found}


def _masked(*records: dict) -> bool:
    return any("mask" in (r.get("detections") or {}) for r in records)


def _control(text: str | None, control: str) -> dict | None:
    return None if text is None else json.loads(text).get(control)


def _task_scores(task_ids: Sequence[int], table, fps: Sequence[str]) -> list[TaskScore]:
    d = table.disagreement
    return [TaskScore(int(t), float(table.uncertainty[i]), None if d is None else float(d[i]), table.reasons[i], fps[i])
            for i, t in enumerate(task_ids)]
