"""From two models' outputs on the same images to one table of scores and reasons.

Model outputs are put into one label space by class name (case-insensitive), so a CNN and a VLM with
different class lists still compare; a class only one model knows never matches class-aware.

Detection images are ranked per image by `aggregate`: "max" and "mean" rank by the worst or the typical
box (and disagreement by its share, 1 − F1); "capped_sum" ranks by how much is doubtful — the boxes'
uncertainty summed, and the score-weighted count of discordant boxes, each capped at `cap` and scaled to
[0, 1]. Labels are paid per image, so an image with three doubtful boxes is worth more than one with one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from active_learning.boxes import BoxBatch, ImageBoxes
from active_learning.disagreement import classification_disagreement, detection_disagreement
from active_learning.uncertainty import NEAR, detection_uncertainty, margin
from backend.core.labels import OUTSIDE_LABELS
from backend.core.prediction import CLASS_NAME, CLASS_SCORES, DetectionColumns, Prediction

SELECT_AGGREGATE = "capped_sum"  # what `tandem select` ranks detections by: on digits it beat max (benchmarks/)


@dataclass(frozen=True)
class ScoreTable:
    uncertainty: np.ndarray  # (N,) in [0, 1]
    disagreement: np.ndarray | None  # (N,) in [0, 1], None without a second model
    reasons: Sequence[str]  # (N,) one sentence per image for the reviewer ("" where not built: `score_columns`)


class SharedIds:
    """Class name -> shared integer id, growing as new names appear; `names` keeps each first spelling."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.ids: dict[str, int] = {}
        self._spelling: list[str] = []
        for name in names:
            self.id(name)

    def id(self, name: str) -> int:
        key = str(name).strip().lower()
        if key not in self.ids:
            self.ids[key] = len(self.ids)
            self._spelling.append(str(name).strip())
        return self.ids[key]

    @property
    def names(self) -> list[str]:
        return list(self._spelling)


def to_image_boxes(output: Prediction, space: SharedIds) -> ImageBoxes:
    det = output.detections
    if det is None or len(det) == 0:
        return ImageBoxes.empty()
    labels = np.array([space.id(n) for n in det.data[CLASS_NAME]], dtype=int)
    scores = det.data.get(CLASS_SCORES)
    return ImageBoxes(det.xyxy, det.confidence, labels, scores if scores is not None and len(scores) else None)


def column_boxes(columns: DetectionColumns, space: SharedIds) -> BoxBatch:
    """Stored detections decoded column-wise -> the BoxBatch `to_image_boxes` + `BoxBatch.from_images` would build."""
    ids: dict[str, int] = {}
    labels = np.fromiter((ids[n] if n in ids else ids.setdefault(n, space.id(n)) for n in columns.class_name),
                         dtype=int, count=len(columns.class_name))
    return BoxBatch(columns.xyxy, columns.confidence, labels, columns.offsets, columns.class_scores)


def candidate_peaks(outputs: Sequence[Prediction]) -> np.ndarray:
    """Each image's best pre-threshold score, NaN where the detector reports none."""
    return np.array([np.nan if o.candidate_peak is None else o.candidate_peak for o in outputs], dtype=float)


def _aligned_probs(outputs: Sequence[Prediction], names: Sequence[str], space: SharedIds) -> np.ndarray:
    ids = [space.id(n) for n in names]
    out = np.zeros((len(outputs), len(space.ids)))
    for i, o in enumerate(outputs):
        out[i, ids] = o.probabilities
    return out


def _outside(model: str, seen: str) -> str:
    return f"{model} sees {seen}, which is none of the choices"


def _classification_reasons(p: np.ndarray, names: Sequence[str], model: str) -> list[str]:
    """By the top two's margin: "unsure" under 0.5, "leans" under 0.8 (a pick for uncertainty at 0.76 against
    0.19 must not read "confident"), "confident" above."""
    if p.shape[1] < 2:
        return [f"{model} confident: {names[0]} {row[0]:.2f}" for row in p]
    order = np.argsort(-p, axis=1)[:, :2]
    out = []
    for row, (a, b) in zip(p, order, strict=True):
        says = f"{names[a]} {row[a]:.2f}, then {names[b]} {row[b]:.2f}"
        gap = row[a] - row[b]
        out.append(f"{model} {'unsure' if gap < 0.5 else 'leans' if gap < 0.8 else 'confident'}: {says}")
    return out


def _listed(boxes: BoxBatch, rows: np.ndarray, names: Sequence[str], top: int = 3) -> str:
    """ "Dog 0.31, Cat 0.22, +2 more": highest score first."""
    rows = rows[np.argsort(-boxes.scores[rows], kind="stable")]
    shown = ", ".join(f"{names[boxes.labels[j]]} {boxes.scores[j]:.2f}" for j in rows[:top])
    return shown + (f", +{len(rows) - top} more" if len(rows) > top else "")


def _uncertainty_reason(boxes: BoxBatch, i: int, names: Sequence[str], model: str, peak: float,
                        threshold: float = NEAR[0], band: float = NEAR[1]) -> str:
    """What the reviewer sees is the boxes at or above the serving threshold; fainter candidates count, said
    apart."""
    rows = np.arange(boxes.offsets[i], boxes.offsets[i + 1])
    scores = boxes.scores[rows]
    near = np.abs(scores - threshold) < band
    shown, faint = near & (scores >= threshold), near & (scores < threshold)
    visible = int((scores >= threshold).sum())
    parts = []
    if shown.any():
        parts.append(f"{int(shown.sum())} of {visible} boxes near the {threshold:.2f} threshold "
                     f"({_listed(boxes, rows[shown], names)})")
    if faint.any():
        k = int(faint.sum())
        parts.append(f"{k} {'candidate' if k == 1 else 'candidates'} just below {threshold:.2f}, not pre-annotated "
                     f"({_listed(boxes, rows[faint], names)})")
    if parts:
        return f"{model} unsure: " + "; ".join(parts)
    if len(rows) == 0 and np.isfinite(peak):
        if peak >= threshold:  # a confident candidate, yet no box: its class is one the project does not map
            return (f"{model} sees none of the project's labels (its best candidate, {peak:.2f}, is of a class the "
                    "labeling config or label map leaves out)")
        return f"{model} sees nothing (best candidate {peak:.2f})"
    return f"{model} boxes: {visible}"


def score_outputs(
    primary: Sequence[Prediction],
    primary_names: Sequence[str],
    second: Sequence[Prediction] | None = None,
    second_names: Sequence[str] | None = None,
    model_names: tuple[str, str] = ("CNN", "VLM"),
    aggregate: str = "max",
    cap: float = 5.0,
    threshold: float = NEAR[0],
) -> ScoreTable:
    """`threshold` is the serving confidence threshold: what annotators see, and what reasons name."""
    space = SharedIds(primary_names)
    if second_names:
        for n in second_names:
            space.id(n)
    n = len(primary)
    classify = n > 0 and primary[0].probabilities is not None
    if classify:
        p = _aligned_probs(primary, primary_names, space)
        uncertainty = margin(p)
        reasons = _classification_reasons(p, space.names, model_names[0])
        # a top class that is none of the labels: the pooled numbers are no answer, so the reason names the class
        outside = [o.extra.get(OUTSIDE_LABELS) for o in primary]
        reasons = [_outside(model_names[0], seen) if seen else r for r, seen in zip(reasons, outside, strict=True)]
        disagreement = None
        if second is not None:
            q = _aligned_probs(second, second_names or primary_names, space)
            d = classification_disagreement(p, q)
            disagreement = d.score
            other = [o.extra.get(OUTSIDE_LABELS) for o in second]
            reasons = [_both(reasons[i], d.reason(i, p, q, space.names, model_names), uncertainty[i], disagreement[i],
                             model_names) if not (outside[i] or other[i]) else
                       "; ".join([reasons[i], *([_outside(model_names[1], other[i])] if other[i] else [])])
                       for i in range(n)]
        return ScoreTable(uncertainty, disagreement, reasons)
    if second is not None:  # two segmenters (masks, or outlines beside masks) compare by mask IoU
        from active_learning import masks

        if masks.carry_masks(primary, second):
            return masks.score_masks(primary, second, space, model_names, aggregate, cap, threshold)

    a = BoxBatch.from_images([to_image_boxes(o, space) for o in primary])
    b = BoxBatch.from_images([to_image_boxes(o, space) for o in second]) if second is not None else None
    return _score_boxes(a, candidate_peaks(primary), b, space, model_names, aggregate, cap, threshold)


def score_columns(
    primary: DetectionColumns,
    names: Sequence[str],
    second: DetectionColumns | None = None,
    model_names: tuple[str, str] = ("CNN", "VLM"),
    aggregate: str = "max",
    cap: float = 5.0,
    threshold: float = NEAR[0],
    reasons: bool = True,
) -> ScoreTable:
    """`score_outputs` for detections decoded column-wise from the store, both in the same labels `names`.
    `reasons=False` leaves every reason "" (the ranking pass of `tandem select`: a sentence is built only for
    the images it picks, and each image's numbers do not depend on the others)."""
    space = SharedIds(names)
    a = column_boxes(primary, space)
    b = column_boxes(second, space) if second is not None else None
    return _score_boxes(a, primary.candidate_peak, b, space, model_names, aggregate, cap, threshold, reasons)


def _score_boxes(a: BoxBatch, peaks: np.ndarray, b: BoxBatch | None, space: SharedIds, model_names: tuple[str, str],
                 aggregate: str, cap: float, threshold: float, with_reasons: bool = True) -> ScoreTable:
    n = a.num_images
    unc = detection_uncertainty(a, threshold=threshold, cap=cap, aggregate=aggregate, candidate_peaks=peaks)
    reasons = [_uncertainty_reason(a, i, space.names, model_names[0], peaks[i], threshold) for i in range(n)] \
        if with_reasons else [""] * n
    disagreement = None
    if b is not None:
        d = detection_disagreement(a, b)
        disagreement = np.minimum(d.mass, cap) / cap if aggregate == "capped_sum" else d.score
        if with_reasons:
            reasons = [_both(reasons[i], d.reason(i, model_names, space.names, faint=threshold), unc.score[i],
                             disagreement[i], model_names) for i in range(n)]
    return ScoreTable(unc.score, disagreement, reasons)


def _both(doubt: str, disagreement: str, u: float, d: float, model_names: tuple[str, str]) -> str:
    """Both halves of a hybrid score, the larger first: a rank driven by the CNN's doubt must not read as
    "both say Square" alone."""
    if disagreement == "agree":
        disagreement = f"{model_names[1]} agrees"
    return f"{doubt}; {disagreement}" if u >= d else f"{disagreement}; {doubt}"
