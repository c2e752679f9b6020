"""Where two models agree on an image, and how strongly: the evidence behind auto-accept.

Two predictions of the same image (the CNN's and the VLM's, both in the control's labels) are matched
one-to-one, class-aware, by IoU (Hungarian, scipy): boxes by box IoU, polygons and instance masks by mask
IoU, choices by their top class. A matched pair scores

    s = IoU(a, b) · min(conf_a, conf_b)

— a region is only as trustworthy as its weaker vote, and a pair that agrees on the class but not on the
outline is not the same label twice. The task scores the minimum over its pairs (a task is accepted whole,
so its weakest region decides) and is an auto-accept *candidate* only when every region is matched and no
region is seen by one model only. An image neither model sees anything in is no candidate: two models
missing the same object is not evidence that nothing is there, and precision cannot measure a miss.

The score's scale does not matter to the guarantee: `calibration.calibrate` picks the threshold on
human-verified tasks; any score that orders pairs by how likely they are right works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from backend.core.prediction import CLASS_NAME, POLYGON, Prediction

_RASTER = 256  # polygons are compared on a grid whose long side is at most this many cells


@dataclass(frozen=True)
class Match:
    """A one-to-one, class-aware matching of `a`'s regions to `b`'s (indices into each)."""

    rows: np.ndarray  # (K,) indices into a
    cols: np.ndarray  # (K,) indices into b
    iou: np.ndarray  # (K,) IoU of each pair (1.0 for agreeing choices)
    pair_scores: np.ndarray  # (K,) IoU × min confidence
    only_a: np.ndarray  # indices into a that nothing in b matches
    only_b: np.ndarray  # indices into b that nothing in a matches
    kind: str = "boxes"  # "boxes", "masks", "choices" or "empty"

    @property
    def matched(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class TaskAgreement:
    """One task's verdict: `score` is the weakest matched pair's (0 when nothing matched)."""

    score: float
    candidate: bool
    matched: int
    only_a: int
    only_b: int
    pair_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kind: str = "boxes"
    match: Match | None = None

    def accepted(self, threshold: float | None) -> bool:
        return threshold is not None and self.candidate and self.score >= threshold


def _names(p: Prediction) -> np.ndarray:
    det = p.detections
    if det is None or len(det) == 0:
        return np.zeros(0, dtype=object)
    if CLASS_NAME in det.data:
        return np.asarray(det.data[CLASS_NAME], dtype=object)
    ids = det.class_id if det.class_id is not None else np.zeros(len(det), int)
    names = p.class_names
    return np.array([names[i] if names and 0 <= i < len(names) else str(i) for i in ids], dtype=object)


def _confidence(p: Prediction) -> np.ndarray:
    det = p.detections
    if det is None or len(det) == 0:
        return np.zeros(0)
    return np.ones(len(det)) if det.confidence is None else np.asarray(det.confidence, float)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 4) × (m, 4) xyxy -> (n, m) IoU."""
    a, b = np.asarray(a, float).reshape(-1, 4)[:, None], np.asarray(b, float).reshape(-1, 4)[None]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda x: np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, H, W) × (m, H, W) boolean masks -> (n, m) IoU, as one matrix product."""
    fa = np.asarray(a, bool).reshape(len(a), -1).astype(np.float32)
    fb = np.asarray(b, bool).reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0).astype(float)


def _polygon_masks(p: Prediction, extent: tuple[float, float]) -> np.ndarray:
    """Outlines rasterised on a shared grid (long side `_RASTER` cells); a region without an outline is its box."""
    import cv2

    det = p.detections
    scale = _RASTER / max(extent[0], extent[1], 1.0)
    w, h = int(np.ceil(extent[0] * scale)) + 1, int(np.ceil(extent[1] * scale)) + 1
    outlines = det.data.get(POLYGON) if det is not None else None
    masks = np.zeros((len(det), h, w), np.uint8)
    for i in range(len(det)):
        outline = outlines[i] if outlines is not None else None
        if outline is None:
            x0, y0, x1, y1 = det.xyxy[i]
            outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        cv2.fillPoly(masks[i], [np.round(np.asarray(outline, float) * scale).astype(np.int32)], 1)
    return masks.astype(bool)


def region_iou(a: Prediction, b: Prediction) -> tuple[np.ndarray, str]:
    """IoU of every region of `a` with every region of `b` (both non-empty): masks, else outlines, else boxes."""
    da, db = a.detections, b.detections
    if da.mask is not None and db.mask is not None and da.mask.shape[1:] == db.mask.shape[1:]:
        return mask_iou(da.mask, db.mask), "masks"
    if POLYGON in da.data or POLYGON in db.data:
        extent = np.maximum(da.xyxy[:, 2:].max(0), db.xyxy[:, 2:].max(0))
        return mask_iou(_polygon_masks(a, extent), _polygon_masks(b, extent)), "masks"
    return box_iou(da.xyxy, db.xyxy), "boxes"


def _top(p: Prediction) -> tuple[str | None, float]:
    if p.probabilities is None or len(p.probabilities) == 0 or not np.any(p.probabilities > 0):
        return None, 0.0
    i = int(np.argmax(p.probabilities))
    return (p.class_names[i] if p.class_names else str(i)), float(p.probabilities[i])


def match(a: Prediction, b: Prediction, iou: float = 0.5) -> Match:
    """Match `a`'s regions to `b`'s: same class and IoU ≥ `iou`, maximising the summed pair score.

    Both predictions must be in the same labels (stored predictions are in the control's; `from_results` reads
    annotations so). Classes compare by name (`data[CLASS_NAME]`, else `class_names[class_id]`).
    """
    empty = np.zeros(0, int)
    if a.is_classification or b.is_classification:
        (ca, pa), (cb, pb) = _top(a), _top(b)
        if ca is not None and ca == cb:
            return Match(np.zeros(1, int), np.zeros(1, int), np.ones(1), np.array([min(pa, pb)]), empty, empty, "choices")
        return Match(empty, empty, np.zeros(0), np.zeros(0), np.arange(int(ca is not None)), np.arange(int(cb is not None)),
                     "choices")
    na, nb = _names(a), _names(b)
    if len(na) == 0 or len(nb) == 0:
        return Match(empty, empty, np.zeros(0), np.zeros(0), np.arange(len(na)), np.arange(len(nb)),
                     "empty" if len(na) == len(nb) == 0 else "boxes")
    ious, kind = region_iou(a, b)
    allowed = (na[:, None] == nb[None, :]) & (ious >= iou)
    weights = ious * np.minimum(_confidence(a)[:, None], _confidence(b)[None, :])
    if allowed.any():
        rows, cols = linear_sum_assignment(np.where(allowed, weights, -1.0), maximize=True)
        keep = allowed[rows, cols]
        rows, cols = rows[keep], cols[keep]
    else:
        rows, cols = empty, empty
    return Match(rows, cols, ious[rows, cols], weights[rows, cols], np.setdiff1d(np.arange(len(na)), rows),
                 np.setdiff1d(np.arange(len(nb)), cols), kind)


def task_agreement(a: Prediction, b: Prediction, iou: float = 0.5) -> TaskAgreement:
    """The task's verdict from `match(a, b, iou)`."""
    m = match(a, b, iou)
    score = float(m.pair_scores.min()) if m.matched else 0.0
    candidate = m.matched > 0 and len(m.only_a) == 0 and len(m.only_b) == 0
    return TaskAgreement(score, candidate, m.matched, len(m.only_a), len(m.only_b), m.pair_scores, m.kind, m)


def agreements(pairs: Sequence[tuple[Prediction, Prediction]], iou: float = 0.5) -> list[TaskAgreement]:
    return [task_agreement(a, b, iou) for a, b in pairs]


@dataclass(frozen=True)
class AgreementTable:
    """Many tasks' verdicts as arrays, for calibration and views over a whole project."""

    score: np.ndarray  # (N,)
    candidate: np.ndarray  # (N,) bool
    matched: np.ndarray  # (N,) int
    only_a: np.ndarray
    only_b: np.ndarray

    @classmethod
    def of(cls, verdicts: Sequence[TaskAgreement]) -> AgreementTable:
        return cls(np.array([v.score for v in verdicts], float), np.array([v.candidate for v in verdicts], bool),
                   np.array([v.matched for v in verdicts], int), np.array([v.only_a for v in verdicts], int),
                   np.array([v.only_b for v in verdicts], int))

    def accepted(self, threshold: float | None) -> np.ndarray:
        if threshold is None:
            return np.zeros(len(self.score), bool)
        return self.candidate & (self.score >= threshold)

    def coverage(self, threshold: float | None, by: str = "tasks") -> float:
        """Share of tasks (or of matched regions, `by="regions"`) auto-accepted at `threshold`."""
        acc = self.accepted(threshold)
        if by == "regions":
            total = (self.matched + np.maximum(self.only_a, self.only_b)).sum()
            return float(self.matched[acc].sum() / total) if total else 0.0
        return float(acc.mean()) if len(acc) else 0.0


def agreed(a: Prediction, m: Match) -> Prediction:
    """`a` reduced to its matched regions: what auto-accept writes (the pre-annotation model's geometry)."""
    if m.kind == "choices" or a.detections is None:
        return a
    return a.with_meta(detections=a.detections[np.sort(m.rows)])


@dataclass(frozen=True)
class Verified:
    """A human-verified task seen through auto-accept: what it would have written, and whether that was right."""

    verdict: TaskAgreement
    correct: np.ndarray  # (K,) per agreed region (one for a choice): the human kept it (same class, IoU ≥ iou)
    missed: int  # human regions the agreed set lacks (auto-accept would have left them out)

    @property
    def task_correct(self) -> bool:
        return bool(self.correct.all()) and self.missed == 0


def verify(a: Prediction, b: Prediction, human: Prediction, iou: float = 0.5) -> Verified:
    """Compare the regions both models agree on (`a`'s geometry) with the human's final annotation."""
    verdict = task_agreement(a, b, iou)
    if verdict.kind == "choices":
        hc, _ = _top(human)
        ac, _ = _top(a)
        right = np.array([ac is not None and ac == hc]) if verdict.matched else np.zeros(0, bool)
        return Verified(verdict, right, int(hc is not None and not right.any()))
    kept = agreed(a, verdict.match) if verdict.matched else None
    if kept is None:
        return Verified(verdict, np.zeros(0, bool), len(_names(human)))
    m = match(kept.with_meta(detections=_certain(kept.detections)), human, iou)
    correct = np.zeros(len(kept.detections), bool)
    correct[m.rows] = True
    return Verified(verdict, correct, len(m.only_b))


def _certain(det):
    """Matching against a human ignores the model's confidence (only which regions pair up matters)."""
    import supervision as sv

    return sv.Detections(xyxy=det.xyxy, mask=det.mask, confidence=np.ones(len(det)), class_id=det.class_id,
                         data=det.data)


__all__ = ["AgreementTable", "Match", "TaskAgreement", "agreed", "agreements", "box_iou", "mask_iou", "match",
           "region_iou", "task_agreement", "Verified", "verify"]
