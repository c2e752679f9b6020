"""Model uncertainty, every score normalised to [0, 1] (0 = sure, 1 = as unsure as it gets).

Classification: least confidence, margin, entropy over the class distribution. Detection: each box's
binary entropy of its score and, when the adapter kept the box's class distribution from before NMS,
that distribution's entropy; the image aggregates boxes by max, mean, capped sum and a count of boxes
near the confidence threshold. An image with no kept box takes the binary entropy of its best candidate
below the threshold, when the detector reports one: otherwise every image a weak detector misses scores
0, and the images it most needs labeled never reach the queue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from active_learning.boxes import BoxBatch, segment_max, segment_sum

_EPS = 1e-12


def _as_probs(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 0, None)
    total = p.sum(axis=-1, keepdims=True)
    return np.divide(p, total, out=np.full_like(p, 1.0 / max(p.shape[-1], 1)), where=total > 0)


def least_confidence(p: np.ndarray) -> np.ndarray:
    """(1 − p_max) scaled so a uniform distribution scores 1."""
    p = _as_probs(p)
    k = p.shape[-1]
    if k < 2:
        return np.zeros(p.shape[:-1])
    return np.clip((1 - p.max(axis=-1)) * k / (k - 1), 0, 1)


def margin(p: np.ndarray) -> np.ndarray:
    """1 − (p₁ − p₂): 1 when the top two classes tie."""
    p = _as_probs(p)
    if p.shape[-1] < 2:
        return np.zeros(p.shape[:-1])
    top2 = -np.partition(-p, 1, axis=-1)[..., :2]
    return np.clip(1 - (top2[..., 0] - top2[..., 1]), 0, 1)


def entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy divided by log K."""
    p = _as_probs(p)
    k = p.shape[-1]
    if k < 2:
        return np.zeros(p.shape[:-1])
    h = -(p * np.log(np.clip(p, _EPS, 1))).sum(axis=-1)
    return np.clip(h / np.log(k), 0, 1)


AGGREGATES = ("max", "mean", "capped_sum")  # how an image's boxes become one ranking value
NEAR = (0.25, 0.15)  # a box is "near the threshold" within 0.15 of a 0.25 confidence threshold

CLASSIFICATION_MEASURES = {"least_confidence": least_confidence, "margin": margin, "entropy": entropy}


def binary_entropy(s: np.ndarray) -> np.ndarray:
    """Entropy of a Bernoulli(s) in bits: 1 at s = 0.5, 0 at s ∈ {0, 1}."""
    s = np.clip(np.asarray(s, dtype=float), _EPS, 1 - _EPS)
    return np.clip(-(s * np.log2(s) + (1 - s) * np.log2(1 - s)), 0, 1)


@dataclass(frozen=True)
class DetectionUncertainty:
    """Per-image aggregates (all (N,) arrays) and the per-box values they came from."""

    box: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    capped_sum: np.ndarray
    near_threshold: np.ndarray  # counts, not normalised
    score: np.ndarray  # the image-level value used for ranking


def box_uncertainty(boxes: BoxBatch) -> np.ndarray:
    """A box is uncertain when its existence (score) or its class is: the max of the two entropies."""
    u = binary_entropy(boxes.scores)
    if boxes.class_probs is not None and len(boxes.class_probs):
        u = np.maximum(u, entropy(boxes.class_probs))
    return u


def detection_uncertainty(
    boxes: BoxBatch,
    threshold: float = NEAR[0],
    band: float = NEAR[1],
    cap: float = 5.0,
    aggregate: str = "max",
    candidate_peaks: np.ndarray | None = None,
) -> DetectionUncertainty:
    """`aggregate` picks the ranking value: max (one doubtful box), mean, or capped_sum (crowded doubt).
    `candidate_peaks` (N,): each image's best pre-threshold class score (NaN where unknown); an image with
    no box counts it as its one box."""
    u = box_uncertainty(boxes)
    counts = boxes.counts
    total = segment_sum(u, boxes.offsets)
    mean = np.divide(total, counts, out=np.zeros_like(total), where=counts > 0)
    near = segment_sum((np.abs(boxes.scores - threshold) < band).astype(float), boxes.offsets)
    top = segment_max(u, boxes.offsets)
    if candidate_peaks is not None:
        peaks = np.asarray(candidate_peaks, dtype=float)
        if peaks.shape != counts.shape:
            raise ValueError(f"candidate_peaks has {peaks.size} values for {counts.size} images")
        missed = (counts == 0) & np.isfinite(peaks)
        near_miss = binary_entropy(np.where(missed, peaks, 0.0))
        top, mean, total = (np.where(missed, near_miss, v) for v in (top, mean, total))
    result = {"max": top, "mean": mean, "capped_sum": np.minimum(total, cap) / cap}
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}")
    return DetectionUncertainty(box=u, near_threshold=near.astype(int), score=result[aggregate], **result)
