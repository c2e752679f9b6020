"""Does each acquisition signal point at the images the model actually gets wrong?

One round of the label-efficiency simulation, without the retraining loop: train the CNN (and the
second opinion) on a random labeled set, predict the rest of the pool, and compare every image-level
signal with the ground truth there. Detection counts each image's errors (missed plus spurious boxes at
confidence 0.25, IoU 0.5, class-aware) and reports each signal's Spearman correlation with them, with
the boxes and errors per image its top picks would bring; classification reports each signal's AUROC
for "the CNN is wrong" and how many of the pool's errors the top pool_factor × budget holds.

    uv run python benchmarks/al_signal_check.py --task detect     # about 5 minutes on 2 cores
    uv run python benchmarks/al_signal_check.py --task classify --labeled 200
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from active_learning.boxes import BoxBatch
from active_learning.disagreement import pairwise_iou
from active_learning.scoring import SharedIds, candidate_peaks, score_outputs, to_image_boxes
from active_learning.uncertainty import detection_uncertainty
from backend.core.prediction import CLASS_NAME
from backend.models.yolo import YoloAdapter
from benchmarks.al_simulation import DEFAULTS, dataset, draw_split, evaluate, second_opinion, train


def detection_errors(outputs, samples, conf: float = 0.25, iou_min: float = 0.5) -> np.ndarray:
    errors = []
    for out, s in zip(outputs, samples, strict=True):
        d = out.detections
        keep = d.confidence >= conf
        xyxy = d.xyxy[keep]
        cls = np.array([int(n) for n in d.data[CLASS_NAME]], dtype=int)[keep]
        iou = pairwise_iou(xyxy, s.boxes) if len(xyxy) and len(s.boxes) else np.zeros((len(xyxy), len(s.boxes)))
        hit = (iou >= iou_min) & (cls[:, None] == s.labels[None, :])
        tp = min(int(hit.any(0).sum()), int(hit.any(1).sum()))
        errors.append(len(xyxy) - tp + len(s.boxes) - tp)
    return np.array(errors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["classify", "detect"], default="detect")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--labeled", type=int, default=None, help="random labeled images (detect 60, classify 200)")
    ap.add_argument("--budget", type=int, default=None, help="the round's budget (detect 30, classify 40)")
    ap.add_argument("--pool-factor", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    detect = args.task == "detect"
    sim = argparse.Namespace(**DEFAULTS[args.task], imbalance=1.0)  # the simulation's round 0, same seed, same split
    labeled_n = args.labeled or (sim.initial if detect else 200)
    budget = args.budget or sim.budget
    samples, test, pool_all = draw_split(args.task, sim, args.seed)
    labeled, pool = list(pool_all[:labeled_n]), list(pool_all[labeled_n:])
    lines = []
    with tempfile.TemporaryDirectory(prefix="tandem-signal-") as tmp:
        work = Path(tmp)
        data = dataset(samples, labeled, test, work / "data", args.task)
        weights = train(args.task, data, "yolov8n.yaml" if detect else "yolov8n-cls.yaml", sim.epochs0, sim.imgsz,
                        args.seed, work / "a")
        metric = evaluate(args.task, weights, data, sim.imgsz)
        adapter = YoloAdapter(weights, device="cpu", conf=0.05, imgsz=sim.imgsz)
        outputs = adapter.predict([samples[i].image for i in pool])
        second, names_b, _ = second_opinion(args.task, samples, labeled, pool, sim, None, work, args.seed)
        pool_samples = [samples[i] for i in pool]
        top_k, pool_k = budget, int(args.pool_factor * budget)
        head = f"{args.task}, seed {args.seed}: {labeled_n} random labels, {len(pool)} unlabeled"
        if detect:
            lines.append(f"## {head}; mAP50 {metric:.3f} on the test split")
            errors = detection_errors(outputs, pool_samples)
            boxes = np.array([len(s.labels) for s in pool_samples])
            space = SharedIds(adapter.class_names)
            batch = BoxBatch.from_images([to_image_boxes(o, space) for o in outputs])
            unc = detection_uncertainty(batch, candidate_peaks=candidate_peaks(outputs))
            signals = {f"uncertainty ({a})": getattr(unc, a) for a in ("max", "mean", "capped_sum")}
            signals["near-threshold count"] = unc.near_threshold.astype(float)
            for agg in ("max", "capped_sum"):
                table = score_outputs(outputs, adapter.class_names, second, names_b, aggregate=agg)
                name = "share (1 − F1)" if agg == "max" else "count (capped_sum)"
                signals[f"disagreement {name}"] = table.disagreement
                signals[f"hybrid ({agg})"] = 0.5 * table.uncertainty + 0.5 * table.disagreement
            best = np.sort(errors)[::-1][:top_k].mean()
            lines += [(f"Pool: {boxes.mean():.2f} boxes and {errors.mean():.2f} errors per image; "
                       f"the {top_k} images with the most errors hold {best:.2f} each."),
                      "", (f"| signal | Spearman with errors | with boxes | top {top_k}: boxes, errors per image "
                           f"| top {pool_k}: boxes, errors |"), "|---|---|---|---|---|"]
            for name, v in signals.items():
                rank = np.argsort(-v, kind="stable")
                t, p = rank[:top_k], rank[:pool_k]
                lines.append(f"| {name} | {spearmanr(v, errors).correlation:.2f} | {spearmanr(v, boxes).correlation:.2f} "
                             f"| {boxes[t].mean():.2f}, {errors[t].mean():.2f} | {boxes[p].mean():.2f}, {errors[p].mean():.2f} |")
        else:
            lines.append(f"## {head}; top-1 {metric:.3f} on the test split")
            names = adapter.class_names
            p = np.stack([o.probabilities for o in outputs])
            truth = np.array([s.labels[0] for s in pool_samples])
            wrong = np.array([int(names[k]) for k in p.argmax(1)]) != truth
            table = score_outputs(outputs, names, second, names_b)
            signals = {"uncertainty (margin)": table.uncertainty, "disagreement (JS)": table.disagreement,
                       "hybrid": 0.5 * table.uncertainty + 0.5 * table.disagreement}
            q = np.stack([o.probabilities for o in second])
            lines += [(f"CNN wrong on {wrong.sum()} of {len(pool)} pool images; the second opinion on "
                       f"{(q.argmax(1) != truth).sum()}."), "",
                      f"| signal | AUROC for a CNN error | errors in its top {pool_k} | errors in its top {top_k} |",
                      "|---|---|---|---|"]
            for name, v in signals.items():
                rank = np.argsort(-v, kind="stable")
                lines.append(f"| {name} | {roc_auc_score(wrong, v):.3f} | {wrong[rank[:pool_k]].sum()} of {wrong.sum()} "
                             f"| {wrong[rank[:top_k]].sum()} |")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"al_signal_{args.task}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
