"""Scores from stored predictions: both models' `Prediction`s of a task, already in the control's labels.

Used at serve time (as soon as the second of the two models has answered a task) and by `tandem select`
for tasks whose scores were not stored yet. Every score here is per image, so scoring in chunks gives
the same numbers as scoring everything at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from active_learning.scoring import score_outputs
from backend.core.prediction import Prediction
from backend.storage.predictions import Key, PredictionRepo
from backend.storage.scores import ScoreRepo, ScoreSetup, TaskScore


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
    d = table.disagreement
    fps = task_fingerprints or [""] * len(task_ids)
    return [TaskScore(int(t), float(table.uncertainty[i]), None if d is None else float(d[i]), table.reasons[i], fps[i])
            for i, t in enumerate(task_ids)]


def score_stored_keys(
    predictions: PredictionRepo,
    scores: ScoreRepo,
    setup: ScoreSetup,
    project_id: int | None,
    first_keys: Mapping[int, Key],
    second_keys: Mapping[int, Key] | None,
    model_names: tuple[str, str],
) -> list[TaskScore]:
    """Score (and store) the tasks whose stored predictions from both models exist; the rest are left out."""
    firsts = predictions.get_controls(list(first_keys.values()))
    seconds = predictions.get_controls(list(second_keys.values())) if second_keys is not None else {}
    ids, fps, a, b = [], [], [], []
    for task_id, key in first_keys.items():
        mine = firsts.get(key, {}).get(setup.control)
        if mine is None:
            continue
        if second_keys is not None:
            other = seconds.get(second_keys.get(task_id), {}).get(setup.control)
            if other is None:
                continue
            b.append(other)
        ids.append(task_id)
        fps.append(key[2])
        a.append(mine)
    found = score_pairs(ids, a, b if second_keys is not None else None, model_names, setup.aggregate, setup.threshold,
                        fps)
    scores.put_many(setup, project_id, found)
    return found
