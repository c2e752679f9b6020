"""How much two models (the CNN and the VLM, or any two) disagree on the same image — and why.

Detection. Agreement is a score-weighted, IoU-weighted F1 over the best one-to-one matching:

    Agree = 2 · max_M Σ_{(i,j)∈M} IoU(a_i, b_j) · 1[c_i = c_j] · √(s_i t_j)  /  (Σ s_i + Σ t_j)

with pairs below `min_iou` not allowed, and D = 1 − Agree ∈ [0, 1] (0 when both see nothing). Because the
matching maximises the numerator itself (Hungarian, scipy), D is symmetric and exactly 0 for identical
predictions. Reasons come from a second, class-agnostic matching: a box only one model sees
("overlooked"), a matched pair with IoU below `loc_iou` ("poorly localised"), a well-placed pair with
different classes ("class swap").

Classification. Jensen–Shannon divergence / log 2 (∈ [0, 1]) and whether the top-1 classes differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from active_learning.boxes import BoxBatch

REASONS = ("only_a", "only_b", "poor_localisation", "class_swap")


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between (..., n, 4) and (..., m, 4) xyxy boxes -> (..., n, m); broadcasting over leading axes."""
    a = a[..., :, None, :]
    b = b[..., None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter, dtype=float), where=union > 0)


def match(weights: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-weight one-to-one matching among allowed pairs -> (rows, cols)."""
    if weights.size == 0 or not allowed.any():
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    rows, cols = linear_sum_assignment(np.where(allowed, weights, 0.0), maximize=True)
    keep = allowed[rows, cols]
    return rows[keep], cols[keep]


@dataclass(frozen=True)
class DetectionDisagreement:
    score: np.ndarray  # (N,) in [0, 1]
    counts: dict[str, np.ndarray]  # reason -> (N,) counts
    pairs_a: np.ndarray  # flat indices into a of class-agnostic matched pairs
    pairs_b: np.ndarray
    pair_iou: np.ndarray

    def reason(self, i: int, names: tuple[str, str] = ("CNN", "VLM")) -> str:
        """A sentence for the reviewer, e.g. "2 boxes only VLM sees; 1 class swap"."""
        parts = []
        labels = {
            "only_a": f"only {names[0]} sees",
            "only_b": f"only {names[1]} sees",
            "poor_localisation": "poorly localised",
            "class_swap": "class swap",
        }
        for key in REASONS:
            n = int(self.counts[key][i])
            if n:
                noun = "box" if n == 1 else "boxes"
                parts.append(f"{n} {noun} {labels[key]}" if key.startswith("only") else f"{n} {labels[key]}")
        return "; ".join(parts) if parts else "agree"


def _padded(boxes: BoxBatch, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of images start..stop padded to (n, width, 4) plus a validity mask."""
    counts = boxes.counts[start:stop]
    width = int(counts.max()) if len(counts) else 0
    out = np.zeros((len(counts), width, 4))
    valid = np.arange(width)[None, :] < counts[:, None]
    rows = boxes.xyxy[boxes.offsets[start] : boxes.offsets[stop]]
    out[valid] = rows
    return out, valid


def detection_disagreement(
    a: BoxBatch,
    b: BoxBatch,
    min_iou: float = 0.1,
    loc_iou: float = 0.5,
    chunk: int = 4096,
) -> DetectionDisagreement:
    if a.num_images != b.num_images:
        raise ValueError(f"a has {a.num_images} images, b has {b.num_images}")
    n = a.num_images
    agree_num = np.zeros(n)
    pairs_a: list[np.ndarray] = []
    pairs_b: list[np.ndarray] = []
    pair_iou: list[np.ndarray] = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        pa, va = _padded(a, start, stop)
        pb, vb = _padded(b, start, stop)
        ious = pairwise_iou(pa, pb)  # one vectorised call per chunk
        for k, i in enumerate(range(start, stop)):
            sa, ea, sb, eb = a.offsets[i], a.offsets[i + 1], b.offsets[i], b.offsets[i + 1]
            if sa == ea or sb == eb:
                continue
            iou = ious[k, : ea - sa, : eb - sb]
            allowed = iou >= min_iou
            if not allowed.any():
                continue
            same = a.labels[sa:ea, None] == b.labels[None, sb:eb]
            w = iou * np.sqrt(a.scores[sa:ea, None] * b.scores[None, sb:eb])
            r, c = match(np.where(same, w, 0.0), allowed & same)
            agree_num[i] = w[r, c].sum()
            r, c = match(iou, allowed)  # class-agnostic, for the reasons
            pairs_a.append(r + sa)
            pairs_b.append(c + sb)
            pair_iou.append(iou[r, c])
        del ious, va, vb

    denom = np.bincount(a.image_index, a.scores, n) + np.bincount(b.image_index, b.scores, n)
    agree = np.divide(2 * agree_num, denom, out=np.ones(n), where=denom > 0)
    score = np.clip(1 - agree, 0, 1)

    pa_flat = np.concatenate(pairs_a) if pairs_a else np.zeros(0, int)
    pb_flat = np.concatenate(pairs_b) if pairs_b else np.zeros(0, int)
    iou_flat = np.concatenate(pair_iou) if pair_iou else np.zeros(0)
    img = a.image_index[pa_flat] if len(pa_flat) else np.zeros(0, int)
    matched = np.bincount(img, minlength=n)
    poor = iou_flat < loc_iou
    swap = (~poor) & (a.labels[pa_flat] != b.labels[pb_flat]) if len(pa_flat) else np.zeros(0, bool)
    counts = {
        "only_a": a.counts - matched,
        "only_b": b.counts - matched,
        "poor_localisation": np.bincount(img, weights=poor, minlength=n).astype(int),
        "class_swap": np.bincount(img, weights=swap, minlength=n).astype(int),
    }
    return DetectionDisagreement(score, counts, pa_flat, pb_flat, iou_flat)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence / log 2, row-wise, ∈ [0, 1]; symmetric; 0 iff p = q."""
    p = np.clip(np.asarray(p, float), 0, None)
    q = np.clip(np.asarray(q, float), 0, None)
    p = p / np.clip(p.sum(-1, keepdims=True), 1e-12, None)
    q = q / np.clip(q.sum(-1, keepdims=True), 1e-12, None)
    m = (p + q) / 2

    def kl(x: np.ndarray) -> np.ndarray:
        ratio = np.divide(x, m, out=np.ones_like(x), where=(x > 0) & (m > 0))
        return (x * np.log(ratio)).sum(-1)

    return np.clip((kl(p) + kl(q)) / (2 * np.log(2)), 0, 1)


@dataclass(frozen=True)
class ClassificationDisagreement:
    score: np.ndarray  # JS / log 2
    top1_mismatch: np.ndarray  # bool

    def reason(self, i: int, p: np.ndarray, q: np.ndarray, class_names: Sequence[str], names=("CNN", "VLM")) -> str:
        a, b = int(np.argmax(p[i])), int(np.argmax(q[i]))
        if not self.top1_mismatch[i]:
            return f"both say {class_names[a]} (JS {self.score[i]:.2f})"
        return f"{names[0]} says {class_names[a]} ({p[i][a]:.2f}), {names[1]} says {class_names[b]} ({q[i][b]:.2f})"


def classification_disagreement(p: np.ndarray, q: np.ndarray) -> ClassificationDisagreement:
    return ClassificationDisagreement(js_divergence(p, q), np.argmax(p, -1) != np.argmax(q, -1))
