"""Scaling: score 100k images' predictions from two models (~20 boxes each) and pick a diverse batch
from 100k × 512 embeddings. Prints seconds and ratios against a per-image baseline run in the same
process on the same inputs (a plain loop: supervision IoU + scipy matching per image).

    uv run python benchmarks/al_scaling.py [--images 100000] [--boxes 20] [--dim 512] [--budget 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import supervision as sv
from scipy.optimize import linear_sum_assignment

from active_learning.boxes import BoxBatch
from active_learning.disagreement import detection_disagreement
from active_learning.diversity import k_center_greedy
from active_learning.selection import SelectionConfig, Strategy, select
from active_learning.uncertainty import detection_uncertainty


def synthetic_predictions(n: int, boxes: int, classes: int, seed: int) -> tuple[BoxBatch, BoxBatch]:
    """Model B sees model A's boxes jittered, with some dropped, some added and some classes swapped."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(boxes, n).clip(0, 3 * boxes)
    m = int(counts.sum())
    xy = rng.uniform(0, 600, (m, 2))
    wh = rng.uniform(10, 120, (m, 2))
    xyxy = np.hstack([xy, xy + wh])
    scores = rng.beta(5, 2, m)
    labels = rng.integers(0, classes, m)
    probs = rng.dirichlet(np.ones(classes), m)
    a = BoxBatch(xyxy, scores, labels, np.concatenate([[0], np.cumsum(counts)]), probs)

    keep = rng.random(m) > 0.1
    jitter = rng.normal(0, 4, (m, 4))
    b_xyxy = (xyxy + jitter)[keep]
    b_labels = np.where(rng.random(m) < 0.05, rng.integers(0, classes, m), labels)[keep]
    b_scores = np.clip(scores + rng.normal(0, 0.1, m), 0.01, 1)[keep]
    image = np.repeat(np.arange(n), counts)[keep]
    extra = rng.poisson(1, n)
    e_img = np.repeat(np.arange(n), extra)
    e_xy = rng.uniform(0, 600, (len(e_img), 2))
    e_xyxy = np.hstack([e_xy, e_xy + rng.uniform(10, 120, (len(e_img), 2))])
    all_img = np.concatenate([image, e_img])
    order = np.argsort(all_img, kind="stable")
    b = BoxBatch(
        np.vstack([b_xyxy, e_xyxy])[order],
        np.concatenate([b_scores, rng.beta(2, 5, len(e_img))])[order],
        np.concatenate([b_labels, rng.integers(0, classes, len(e_img))])[order],
        np.concatenate([[0], np.cumsum(np.bincount(all_img, minlength=n))]),
    )
    return a, b


def baseline_disagreement(a: BoxBatch, b: BoxBatch, images: int) -> np.ndarray:
    """The obvious per-image loop, for the ratio."""
    out = np.zeros(images)
    for i in range(images):
        ia, ib = a.image(i), b.image(i)
        if len(ia) == 0 or len(ib) == 0:
            out[i] = float(len(ia) + len(ib) > 0)
            continue
        iou = sv.box_iou_batch(ia.xyxy, ib.xyxy)
        same = ia.labels[:, None] == ib.labels[None, :]
        w = np.where(same & (iou >= 0.1), iou * np.sqrt(ia.scores[:, None] * ib.scores[None, :]), 0)
        r, c = linear_sum_assignment(w, maximize=True)
        out[i] = 1 - 2 * w[r, c].sum() / (ia.scores.sum() + ib.scores.sum())
        linear_sum_assignment(np.where(iou >= 0.1, iou, 0), maximize=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--boxes", type=int, default=20)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--baseline-images", type=int, default=10_000)
    args = ap.parse_args()

    t = time.perf_counter()
    a, b = synthetic_predictions(args.images, args.boxes, args.classes, seed=0)
    print(f"generated {args.images:,} images, {len(a.scores):,} + {len(b.scores):,} boxes in {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    unc = detection_uncertainty(a)
    dis = detection_disagreement(a, b)
    scoring_s = time.perf_counter() - t
    print(f"score (uncertainty + disagreement + reasons) {args.images:,} images: {scoring_s:.2f} s  [target ≤ 10 s]")

    n0 = args.baseline_images
    t = time.perf_counter()
    base = baseline_disagreement(a, b, n0)
    base_s = (time.perf_counter() - t) * args.images / n0
    same = np.allclose(base, dis.score[:n0], atol=1e-9)
    print(f"baseline per-image loop: {base_s:.2f} s (extrapolated from {n0:,}); Tandem is {base_s / scoring_s:.2f}× "
          f"faster; same scores: {same}")

    rng = np.random.default_rng(1)
    emb = rng.normal(size=(args.images, args.dim)).astype(np.float32)
    labeled = rng.normal(size=(500, args.dim)).astype(np.float32)
    config = SelectionConfig(strategy=Strategy.HYBRID, budget=args.budget)
    t = time.perf_counter()
    sel = select(config, unc.score, dis.score, emb, labeled, num_labeled=500)
    select_s = time.perf_counter() - t
    print(f"hybrid selection of {args.budget} from {args.images:,}×{args.dim} (pool {int(config.pool_factor)}×, "
          f"k-center): {select_s:.2f} s  [target ≤ 60 s]; mode {sel.mode}")
    t = time.perf_counter()
    k_center_greedy(emb, args.budget, labeled=labeled)
    full_s = time.perf_counter() - t
    print(f"k-center greedy over all {args.images:,} (no pool): {full_s:.2f} s")


if __name__ == "__main__":
    main()
