"""What happened to each pre-annotated region once a human was done: the edit counts behind `tandem report`.

A task's stored pre-annotation (what the annotator was shown) is matched one-to-one to its final human
annotation, class-agnostic, by IoU ≥ `match_iou` (Hungarian): a matched pair with the same class and IoU ≥
`moved_iou` was *accepted unchanged*; a matched pair that is not was *modified* — *moved* (same class, lower
IoU) or *relabelled* (another class); a predicted region with no partner was *deleted*; a human region with
no partner was *missed*. Choices are *accepted* when the human chose the predicted top class. Everything is
counted per model version and per class (the predicted class; a missed region counts under the human's), and
`EffortModel` turns the counts into seconds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from active_learning.agreement import _names, _top, region_iou
from active_learning.calibration import by_threshold
from active_learning.effort import EffortModel
from backend.core.prediction import Prediction

KINDS = ("unchanged", "moved", "relabelled", "deleted", "missed")


@dataclass
class Counts:
    unchanged: int = 0
    moved: int = 0
    relabelled: int = 0
    deleted: int = 0
    missed: int = 0
    choices: int = 0
    choices_accepted: int = 0

    def add(self, other: Counts) -> None:
        for k in (*KINDS, "choices", "choices_accepted"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @property
    def modified(self) -> int:
        return self.moved + self.relabelled

    @property
    def predicted(self) -> int:
        return self.unchanged + self.modified + self.deleted

    @property
    def final(self) -> int:
        return self.unchanged + self.modified + self.missed

    def rate(self, kind: str) -> float:
        """Share of predicted regions (or, for "missed", of final regions); NaN when there are none."""
        if kind == "missed":
            return self.missed / self.final if self.final else float("nan")
        if kind == "modified":
            return self.modified / self.predicted if self.predicted else float("nan")
        if kind == "choice_accept":
            return self.choices_accepted / self.choices if self.choices else float("nan")
        return getattr(self, kind) / self.predicted if self.predicted else float("nan")


@dataclass(frozen=True)
class TaskEdits:
    """One task's edits of one model version's pre-annotation."""

    task_id: int
    model_version: str
    counts: Counts
    per_class: dict[str, Counts]
    confidence: np.ndarray  # (K,) each predicted region's (or the choice's) confidence
    kept: np.ndarray  # (K,) whether it was accepted unchanged
    when: float = 0.0  # when the annotation was made (epoch seconds), for trends over time
    polygons: bool = False


def edits(pred: Prediction, human: Prediction, task_id: int = 0, model_version: str = "", when: float = 0.0,
          match_iou: float = 0.5, moved_iou: float = 0.9) -> TaskEdits:
    """Compare one pre-annotation with the human's final annotation (both in the control's labels)."""
    if pred.is_classification or human.is_classification:
        (pc, pp), (hc, _) = _top(pred), _top(human)
        c = Counts(choices=int(pc is not None), choices_accepted=int(pc is not None and pc == hc))
        per = {pc: Counts(choices=c.choices, choices_accepted=c.choices_accepted)} if pc is not None else {}
        return TaskEdits(task_id, model_version, c, per, np.array([pp] if pc is not None else []),
                         np.array([bool(c.choices_accepted)] if pc is not None else [], bool), when)
    pn, hn = _names(pred), _names(human)
    conf = (np.ones(len(pn)) if pred.detections is None or pred.detections.confidence is None
            else np.asarray(pred.detections.confidence, float))
    rows = cols = np.zeros(0, int)
    kind = "boxes"
    ious = np.zeros((len(pn), len(hn)))
    if len(pn) and len(hn):
        ious, kind = region_iou(pred, human)
        allowed = ious >= match_iou
        if allowed.any():
            # prefer same-class partners, then overlap: a relabel is only counted where no same-class box fits
            weights = np.where(allowed, ious + (pn[:, None] == hn[None, :]), -1.0)
            rows, cols = linear_sum_assignment(weights, maximize=True)
            keep = allowed[rows, cols]
            rows, cols = rows[keep], cols[keep]
    per: dict[str, Counts] = defaultdict(Counts)
    kept = np.zeros(len(pn), bool)
    for r, c in zip(rows, cols, strict=True):
        if pn[r] != hn[c]:
            per[pn[r]].relabelled += 1
        elif ious[r, c] >= moved_iou:
            per[pn[r]].unchanged += 1
            kept[r] = True
        else:
            per[pn[r]].moved += 1
    for r in np.setdiff1d(np.arange(len(pn)), rows):
        per[pn[r]].deleted += 1
    for c in np.setdiff1d(np.arange(len(hn)), cols):
        per[hn[c]].missed += 1
    total = Counts()
    for v in per.values():
        total.add(v)
    return TaskEdits(task_id, model_version, total, dict(per), conf, kept, when, kind == "masks")


@dataclass
class VersionSummary:
    """Every reviewed task of one model version, summed."""

    model_version: str
    tasks: int = 0
    counts: Counts = field(default_factory=Counts)
    per_class: dict[str, Counts] = field(default_factory=dict)
    scratch_seconds: float = 0.0
    assisted_seconds: float = 0.0
    first: float = float("inf")
    last: float = 0.0

    @property
    def saved_minutes(self) -> float:
        return (self.scratch_seconds - self.assisted_seconds) / 60


def summarise(items: Iterable[TaskEdits], effort: EffortModel | None = None) -> dict[str, VersionSummary]:
    """model version -> its summed counts, per-class counts and the seconds from scratch vs assisted."""
    effort = effort or EffortModel()
    out: dict[str, VersionSummary] = {}
    for e in items:
        s = out.setdefault(e.model_version, VersionSummary(e.model_version))
        s.tasks += 1
        s.counts.add(e.counts)
        for name, c in e.per_class.items():
            s.per_class.setdefault(name, Counts()).add(c)
        c = e.counts
        s.scratch_seconds += effort.scratch_seconds(c.final, c.choices, e.polygons)
        s.assisted_seconds += effort.assisted_seconds(c.unchanged, c.modified, c.deleted, c.missed, c.choices_accepted,
                                                      c.choices - c.choices_accepted, polygons=e.polygons)
        s.first, s.last = min(s.first, e.when), max(s.last, e.when)
    return out


def total(summaries: dict[str, VersionSummary]) -> VersionSummary:
    all_ = VersionSummary("all versions")
    for s in summaries.values():
        all_.tasks += s.tasks
        all_.counts.add(s.counts)
        for name, c in s.per_class.items():
            all_.per_class.setdefault(name, Counts()).add(c)
        all_.scratch_seconds += s.scratch_seconds
        all_.assisted_seconds += s.assisted_seconds
        all_.first, all_.last = min(all_.first, s.first), max(all_.last, s.last)
    return all_


def reliability(items: Sequence[TaskEdits], bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidence bins -> (bin centres, share accepted unchanged, count): a reliability diagram of the pre-annotations."""
    conf = np.concatenate([e.confidence for e in items]) if items else np.zeros(0)
    kept = np.concatenate([e.kept for e in items]) if items else np.zeros(0, bool)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    accepted = np.bincount(idx, weights=kept.astype(float), minlength=bins)
    share = np.divide(accepted, count, out=np.full(bins, np.nan), where=count > 0)
    return (edges[:-1] + edges[1:]) / 2, share, count


def precision_coverage(scores: np.ndarray, correct: np.ndarray, total_items: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """For every threshold (each distinct score, strict to permissive): coverage and realised precision of the
    items accepted — the curve `calibrate` walks along."""
    scores, correct = np.asarray(scores, float), np.asarray(correct, bool)
    if not len(scores):
        return np.zeros(0), np.zeros(0)
    _, n, right = by_threshold(scores, np.ones(len(scores), int), correct)
    return n / (total_items or len(scores)), right / n


__all__ = ["KINDS", "Counts", "TaskEdits", "VersionSummary", "edits", "precision_coverage", "reliability", "summarise",
           "total"]
