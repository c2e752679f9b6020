"""How much two models (the CNN and the VLM, or any two) disagree on the same image — and why.

Detection. Agreement is a score-weighted, IoU-weighted F1 over the best one-to-one matching:

    Agree = 2 · max_M Σ_{(i,j)∈M} IoU(a_i, b_j) · 1[c_i = c_j] · √(s_i t_j)  /  (Σ s_i + Σ t_j)

with pairs below `min_iou` not allowed, and D = 1 − Agree ∈ [0, 1] (0 when both see nothing). D is a
share: one missed box on an image of one scores as high as three on an image of three. `mass`, the same
quantity unnormalised — (Σ s_i + Σ t_j)/2 − the matched numerator, a score-weighted count of discordant
boxes — says how much there is to fix, which is what an image's label is worth to the next model. Because the
matching maximises the numerator itself (Hungarian, scipy), D is symmetric and exactly 0 for identical
predictions. Reasons come from the same class-aware matching followed by a class-agnostic matching of
the boxes it left over: a box only one model sees ("overlooked"), a matched pair with IoU below
`loc_iou` ("poorly localised"), a well-placed pair with different classes ("class swap").

Classification. Jensen–Shannon divergence / log 2 (∈ [0, 1]) and whether the top-1 classes differ.
"""

from __future__ import annotations

from collections import Counter

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
    mass: np.ndarray  # (N,) ≥ 0: score-weighted count of boxes the two models do not agree on
    counts: dict[str, np.ndarray]  # reason -> (N,) counts
    pairs_a: np.ndarray  # flat indices into a of class-agnostic matched pairs, ascending
    pairs_b: np.ndarray
    pair_iou: np.ndarray
    a: BoxBatch | None = None  # the inputs, so a reason can name the classes of the boxes it counts
    b: BoxBatch | None = None
    loc_iou: float = 0.5

    def reason(self, i: int, names: tuple[str, str] = ("CNN", "VLM"), class_names: Sequence[str] | None = None,
               faint: float | None = None) -> str:
        """A sentence for the reviewer, e.g. "2 boxes only VLM sees (Dog ×2); 1 class swap (CNN Cat, VLM Dog)".

        The classes are named when `class_names` is given: the reviewer then knows what to look for; with
        `faint` (the serving threshold), the unmatched boxes scored below it are counted apart, since the
        annotator is not shown them.
        """
        if not any(self.counts[key][i] for key in REASONS):  # the common case, and the cheap one
            return "agree"
        named = class_names is not None and self.a is not None and self.b is not None
        what = self._classes(i, class_names, faint) if named else {}
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
                said = labels[key] + ("s" if key == "class_swap" and n > 1 else "")  # "2 class swaps"
                text = f"{n} {noun} {said}" if key.startswith("only") else f"{n} {said}"
                if key == "class_swap" and what.get(key):
                    text += f" ({names[0]} {what[key][0]}, {names[1]} {what[key][1]})"
                elif what.get(key):
                    text += f" ({what[key]})"
                parts.append(text)
        return "; ".join(parts) if parts else "agree"

    def _classes(self, i: int, class_names: Sequence[str], faint: float | None = None) -> dict:
        """For image i: the classes of the boxes only one model sees, and of the swapped pairs."""
        a, b = self.a, self.b
        lo, hi = np.searchsorted(self.pairs_a, [a.offsets[i], a.offsets[i + 1]])
        pa, pb, iou = self.pairs_a[lo:hi], self.pairs_b[lo:hi], self.pair_iou[lo:hi]
        out = {}
        for key, boxes, matched in (("only_a", a, pa), ("only_b", b, pb)):
            if not self.counts[key][i]:
                continue
            rows = np.arange(boxes.offsets[i], boxes.offsets[i + 1])
            alone = rows[~np.isin(rows, matched, assume_unique=True)]
            out[key] = _tally(boxes.labels[alone], class_names)
            below = int((boxes.scores[alone] < faint).sum()) if faint is not None else 0
            if below:
                them = "it is" if len(alone) == 1 else f"{below} of them {'is' if below == 1 else 'are'}"
                out[key] += f"; {them} below {faint:g}"
        swap = (iou >= self.loc_iou) & (a.labels[pa] != b.labels[pb])
        if swap.any():
            out["class_swap"] = (_tally(a.labels[pa[swap]], class_names), _tally(b.labels[pb[swap]], class_names))
        return out


def _tally(labels: np.ndarray, class_names: Sequence[str]) -> str:
    """"Dog ×2, Cat": most frequent first (ties by class id, as before)."""
    counts = Counter(int(x) for x in labels)
    order = sorted(counts, key=lambda k: (-counts[k], k))
    return ", ".join(class_names[k] + (f" ×{counts[k]}" if counts[k] > 1 else "") for k in order)


def _gather(boxes: BoxBatch, rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xyxy, scores and labels of the images `rows`, padded to `width` boxes (score 0, label −1)."""
    counts = boxes.counts[rows]
    valid = np.arange(width)[None, :] < counts[:, None]
    src = (boxes.offsets[rows][:, None] + np.arange(width)[None, :])[valid]
    xyxy = np.zeros((len(rows), width, 4))
    scores = np.zeros((len(rows), width))
    labels = np.full((len(rows), width), -1)
    xyxy[valid], scores[valid], labels[valid] = boxes.xyxy[src], boxes.scores[src], boxes.labels[src]
    return xyxy, scores, labels


def detection_disagreement(
    a: BoxBatch,
    b: BoxBatch,
    min_iou: float = 0.1,
    loc_iou: float = 0.5,
    chunk: int = 2048,
) -> DetectionDisagreement:
    if a.num_images != b.num_images:
        raise ValueError(f"a has {a.num_images} images, b has {b.num_images}")
    n = a.num_images
    agree_num = np.zeros(n)
    pairs_a: list[np.ndarray] = []
    pairs_b: list[np.ndarray] = []
    pair_iou: list[np.ndarray] = []
    ca, cb = a.counts, b.counts
    both = np.flatnonzero((ca > 0) & (cb > 0))
    both = both[np.argsort(np.maximum(ca[both], cb[both]), kind="stable")]  # similar sizes share a chunk: little padding
    for start in range(0, len(both), chunk):
        rows = both[start : start + chunk]
        # images with boxes on both sides, padded and scored in one vectorised pass per chunk
        wa, wb = int(ca[rows].max()), int(cb[rows].max())
        xa, sa, la = _gather(a, rows, wa)
        xb, sb, lb = _gather(b, rows, wb)
        iou = pairwise_iou(xa, xb)
        allowed = iou >= min_iou
        weight = iou * np.sqrt(sa[:, :, None] * sb[:, None, :])
        aware = np.where(allowed & (la[:, :, None] == lb[:, None, :]), weight, 0.0)
        agnostic = np.where(allowed, iou, 0.0)
        any_allowed = allowed.any(axis=(1, 2))
        for k, i in enumerate(rows):
            if not any_allowed[k]:
                continue
            na, nb = ca[i], cb[i]
            w = aware[k, :na, :nb]
            r, c = linear_sum_assignment(w, maximize=True)
            kept = w[r, c] > 0
            r, c = r[kept], c[kept]
            agree_num[i] = w[r, c].sum()
            # then class-agnostic among the boxes left over: these pairs are the class swaps
            if len(r) < na and len(c) < nb:
                mask_a, mask_b = np.ones(na, bool), np.ones(nb, bool)
                mask_a[r], mask_b[c] = False, False
                free_a, free_b = np.flatnonzero(mask_a), np.flatnonzero(mask_b)
                rest = agnostic[k][np.ix_(free_a, free_b)]
                if rest.any():
                    r2, c2 = linear_sum_assignment(rest, maximize=True)
                    ok = rest[r2, c2] > 0
                    r = np.concatenate([r, free_a[r2[ok]]])
                    c = np.concatenate([c, free_b[c2[ok]]])
            pairs_a.append(r + a.offsets[i])
            pairs_b.append(c + b.offsets[i])
            pair_iou.append(iou[k, r, c])

    denom = np.bincount(a.image_index, a.scores, n) + np.bincount(b.image_index, b.scores, n)
    agree = np.divide(2 * agree_num, denom, out=np.ones(n), where=denom > 0)
    score = np.clip(1 - agree, 0, 1)
    mass = np.clip(denom / 2 - agree_num, 0, None)

    pa_flat = np.concatenate(pairs_a) if pairs_a else np.zeros(0, int)
    pb_flat = np.concatenate(pairs_b) if pairs_b else np.zeros(0, int)
    iou_flat = np.concatenate(pair_iou) if pair_iou else np.zeros(0)
    img = a.image_index[pa_flat] if len(pa_flat) else np.zeros(0, int)
    by_image = np.argsort(pa_flat, kind="stable")  # sorted by a's row, so grouped by image: a reason slices its own
    pa_flat, pb_flat, iou_flat, img = pa_flat[by_image], pb_flat[by_image], iou_flat[by_image], img[by_image]
    matched = np.bincount(img, minlength=n)
    poor = iou_flat < loc_iou
    swap = (~poor) & (a.labels[pa_flat] != b.labels[pb_flat]) if len(pa_flat) else np.zeros(0, bool)
    counts = {
        "only_a": a.counts - matched,
        "only_b": b.counts - matched,
        "poor_localisation": np.bincount(img, weights=poor, minlength=n).astype(int),
        "class_swap": np.bincount(img, weights=swap, minlength=n).astype(int),
    }
    return DetectionDisagreement(score, mass, counts, pa_flat, pb_flat, iou_flat, a, b, loc_iou)


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
