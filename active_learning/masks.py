"""Disagreement between two segmenters by mask IoU: a CNN's outlines against SAM 3's masks.

Two boxes around a grape cluster can agree while the masks inside them do not (one takes the leaves, one a
neighbour's berries): segmentations are compared by the IoU of their pixels. The measure is that of
`active_learning.disagreement` with mask IoU in place of box IoU: a score-weighted, IoU-weighted F1 over the
best class-aware one-to-one matching, then a class-agnostic matching of the leftovers, and the same reasons
(only one model sees it, poorly localised, class swap), said of masks.

Uncertainty stays the instances' score uncertainty (`detection_uncertainty`): stored masks are binary, so
they carry no per-pixel doubt of their own. A model that gives outlines only (YOLO-seg) has them filled
(`backend.convert.brush.instance_masks`) at the size of the other model's masks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from active_learning.boxes import BoxBatch
from active_learning.disagreement import DetectionDisagreement
from active_learning.uncertainty import NEAR, detection_uncertainty
from backend.core.prediction import POLYGON, Prediction


def _has_shapes(output: Prediction) -> bool:
    det = output.detections
    return det is None or len(det) == 0 or det.mask is not None or POLYGON in det.data


def carry_masks(primary: Sequence[Prediction], second: Sequence[Prediction]) -> bool:
    """Whether two models' outputs are to be compared by mask: some image carries a mask, and every instance
    of either model has a mask or an outline to fill."""
    outputs = [*primary, *second]
    some_mask = any(o.detections is not None and o.detections.mask is not None for o in outputs)
    return some_mask and all(_has_shapes(o) for o in outputs)


def _canvas(a: Prediction, b: Prediction) -> tuple[int, int]:
    """(width, height) to compare on: a model's mask size, else the extent of every outline."""
    for o in (a, b):
        det = o.detections
        if det is not None and det.mask is not None and np.ndim(det.mask) == 3:
            return int(det.mask.shape[2]), int(det.mask.shape[1])
    corners = [np.asarray(p).reshape(-1, 2).max(axis=0) for o in (a, b) if o.detections is not None
               for p in o.detections.data.get(POLYGON, []) if p is not None]
    top = np.max(corners, axis=0) if corners else np.zeros(2)
    return int(np.ceil(top[0])) + 1, int(np.ceil(top[1])) + 1


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, H, W) and (m, H, W) boolean masks -> (n, m) IoU, as one matrix product over the pixels either uses."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    used = a.any(axis=0) | b.any(axis=0)
    fa = a[:, used].astype(np.float32)
    fb = b[:, used].astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0).astype(float)


def _masks(output: Prediction, size: tuple[int, int]) -> np.ndarray:
    from backend.convert.brush import instance_masks

    det = output.detections
    if det is None or len(det) == 0:
        return np.zeros((0, size[1], size[0]), dtype=bool)
    return instance_masks(det, *size)


def mask_disagreement(
    a: BoxBatch, b: BoxBatch, primary: Sequence[Prediction], second: Sequence[Prediction],
    min_iou: float = 0.1, loc_iou: float = 0.5,
) -> DetectionDisagreement:
    """`detection_disagreement` with mask IoU: `a`/`b` hold the instances' scores and shared class ids (in the
    order of each output's detections), `primary`/`second` their masks or outlines."""
    if a.num_images != b.num_images or len(primary) != a.num_images or len(second) != b.num_images:
        raise ValueError(f"a has {a.num_images} images, b has {b.num_images}")
    n = a.num_images
    agree_num = np.zeros(n)
    pairs_a, pairs_b, pair_iou = [], [], []
    ca, cb = a.counts, b.counts
    for i in np.flatnonzero((ca > 0) & (cb > 0)):
        size = _canvas(primary[i], second[i])
        iou = mask_iou(_masks(primary[i], size), _masks(second[i], size))
        sa, la = a.scores[a.offsets[i]:a.offsets[i + 1]], a.labels[a.offsets[i]:a.offsets[i + 1]]
        sb, lb = b.scores[b.offsets[i]:b.offsets[i + 1]], b.labels[b.offsets[i]:b.offsets[i + 1]]
        allowed = iou >= min_iou
        if not allowed.any():
            continue
        aware = np.where(allowed & (la[:, None] == lb[None, :]), iou * np.sqrt(sa[:, None] * sb[None, :]), 0.0)
        r, c = linear_sum_assignment(aware, maximize=True)
        kept = aware[r, c] > 0
        r, c = r[kept], c[kept]
        agree_num[i] = aware[r, c].sum()
        free_a, free_b = np.setdiff1d(np.arange(ca[i]), r), np.setdiff1d(np.arange(cb[i]), c)
        rest = np.where(allowed, iou, 0.0)[np.ix_(free_a, free_b)]
        if rest.any():  # class-agnostic among the leftovers: these pairs are the class swaps
            r2, c2 = linear_sum_assignment(rest, maximize=True)
            ok = rest[r2, c2] > 0
            r, c = np.concatenate([r, free_a[r2[ok]]]), np.concatenate([c, free_b[c2[ok]]])
        pairs_a.append(r + a.offsets[i])
        pairs_b.append(c + b.offsets[i])
        pair_iou.append(iou[r, c])

    denom = np.bincount(a.image_index, a.scores, n) + np.bincount(b.image_index, b.scores, n)
    score = np.clip(1 - np.divide(2 * agree_num, denom, out=np.ones(n), where=denom > 0), 0, 1)
    mass = np.clip(denom / 2 - agree_num, 0, None)
    pa = np.concatenate(pairs_a).astype(int) if pairs_a else np.zeros(0, int)
    pb = np.concatenate(pairs_b).astype(int) if pairs_b else np.zeros(0, int)
    piou = np.concatenate(pair_iou) if pair_iou else np.zeros(0)
    order = np.argsort(pa, kind="stable")  # grouped by image: a reason slices its own
    pa, pb, piou = pa[order], pb[order], piou[order]
    img = a.image_index[pa] if len(pa) else np.zeros(0, int)
    poor = piou < loc_iou
    swap = (~poor) & (a.labels[pa] != b.labels[pb]) if len(pa) else np.zeros(0, bool)
    counts = {
        "only_a": a.counts - np.bincount(img, minlength=n),
        "only_b": b.counts - np.bincount(img, minlength=n),
        "poor_localisation": np.bincount(img, weights=poor, minlength=n).astype(int),
        "class_swap": np.bincount(img, weights=swap, minlength=n).astype(int),
    }
    return DetectionDisagreement(score, mass, counts, pa, pb, piou, a, b, loc_iou)


_BOXES = re.compile(r"\b(\d+) box(es)?\b")


def as_masks(reason: str) -> str:
    """A disagreement sentence about boxes, said of masks ("2 boxes only VLM sees" -> "2 masks ...")."""
    return _BOXES.sub(lambda m: f"{m.group(1)} mask{'s' if m.group(2) else ''}", reason)


def score_masks(primary: Sequence[Prediction], second: Sequence[Prediction], space, model_names: tuple[str, str],
                aggregate: str = "max", cap: float = 5.0, threshold: float = NEAR[0]):
    """`score_outputs` for two segmenters (`carry_masks`): the same uncertainty and reasons, disagreement by
    mask IoU. `space` is scoring's SharedIds of both models' class names."""
    from active_learning.scoring import ScoreTable, _both, _uncertainty_reason, candidate_peaks, to_image_boxes

    a = BoxBatch.from_images([to_image_boxes(o, space) for o in primary])
    b = BoxBatch.from_images([to_image_boxes(o, space) for o in second])
    peaks = candidate_peaks(primary)
    unc = detection_uncertainty(a, threshold=threshold, cap=cap, aggregate=aggregate, candidate_peaks=peaks)
    d = mask_disagreement(a, b, primary, second)
    disagreement = np.minimum(d.mass, cap) / cap if aggregate == "capped_sum" else d.score
    reasons = [_both(_uncertainty_reason(a, i, space.names, model_names[0], peaks[i], threshold),
                     as_masks(d.reason(i, model_names, space.names, faint=threshold)), unc.score[i], disagreement[i],
                     model_names) for i in range(a.num_images)]
    return ScoreTable(unc.score, disagreement, reasons)


__all__ = ["as_masks", "carry_masks", "mask_disagreement", "mask_iou", "score_masks"]
