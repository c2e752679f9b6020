"""How precise can auto-accept be on the detection benchmark's models, at any threshold? (issue #22)

The human-seconds benchmark (`al_simulation.py --task detect --human-seconds`) never switched auto-accept on:
its calibration sample never held the 149 verified agreed boxes the guarantee needs. This script answers the
question the guarantee would have answered, with the truth in hand (an oracle no product has). It trains the
round-0 CNN and the second opinion exactly as that benchmark does and predicts the pool it labels. Then, for
every agreement threshold, it reports the precision of the auto-accepted boxes against ground truth, and their
coverage (auto-accepted boxes / all true boxes of the pool). If no threshold gives precision ≥ 0.98 at
coverage ≥ 0.5, these models cannot meet the target whatever the calibration, and the figures show by how much.

    for s in 0 1 2; do uv run python benchmarks/agreement_ceiling.py --seed $s --threads 1 & done; wait
    uv run python benchmarks/agreement_ceiling.py --summarise
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

import numpy as np  # noqa: E402

from active_learning.calibration import by_threshold  # noqa: E402

TARGET_PRECISION, TARGET_COVERAGE = 0.98, 0.5


def ceiling_curve(scores: np.ndarray, boxes: np.ndarray, correct: np.ndarray, true_boxes: int) -> dict:
    """Candidate tasks' (agreement score, agreed boxes, correct boxes) -> precision and coverage when every
    candidate at or above each score is accepted (strictest first), and the best of them against the targets."""
    s, b, c = by_threshold(scores, boxes, correct)  # ties are accepted together
    keep = b > 0
    s, b, c = s[keep], b[keep], c[keep]
    precision = c / np.maximum(b, 1)
    coverage = b / max(true_boxes, 1)
    ok = precision >= TARGET_PRECISION
    reach = coverage >= TARGET_COVERAGE
    return {
        "thresholds": s.tolist(), "precision": precision.tolist(), "coverage": coverage.tolist(),
        "all_candidates": {"boxes": int(b[-1]) if len(b) else 0, "precision": float(precision[-1]) if len(b) else None,
                           "coverage": float(coverage[-1]) if len(b) else 0.0},
        "best_coverage_at_target_precision": float(coverage[ok].max()) if ok.any() else 0.0,
        "best_precision_at_target_coverage": float(precision[reach].max()) if reach.any() else None,
    }


def run_seed(seed: int, work: Path) -> dict:
    from active_learning.agreement import agreed, task_agreement
    from backend.demo_rounds import LoopConfig, correct_boxes, truth_prediction
    from backend.models.yolo import YoloAdapter
    from benchmarks.al_simulation import DEFAULTS, NAMES, dataset, draw_split, train

    args = argparse.Namespace(**DEFAULTS["detect"], imbalance=1.0)
    config = LoopConfig()
    samples, test, pool_all = draw_split("detect", args, seed)
    initial, pool = list(pool_all[: args.initial]), list(pool_all[args.initial :])
    # as benchmarks/al_simulation.py::human_seconds_seed trains them
    w0 = train("detect", dataset(samples, initial, test, work / "data", "detect"), "yolov8n.yaml", args.epochs0,
               args.imgsz, seed, work / "a")
    second = train("detect", dataset(samples, initial, initial[:8], work / "data_b", "detect"), "yolov8n.yaml",
                   args.epochs0, args.imgsz - 32, seed + 1000, work / "b")
    images = [samples[i].image for i in pool]
    truth = [truth_prediction(np.asarray(samples[i].boxes, float).reshape(-1, 4),
                              [NAMES[int(c)] for c in samples[i].labels]) for i in pool]
    # as backend.demo_rounds' Tandem arm predicts and matches them
    shown = YoloAdapter(w0, device="cpu", conf=config.serve_conf).predict(images)
    seen = YoloAdapter(second, device="cpu", conf=config.second_conf).predict(images)
    scores, boxes, correct = [], [], []
    shown_boxes = shown_correct = 0
    for a, b, t in zip(shown, seen, truth, strict=True):
        ok_all = correct_boxes(a, t)
        shown_boxes, shown_correct = shown_boxes + len(ok_all), shown_correct + int(ok_all.sum())
        v = task_agreement(a, b, config.match_iou)
        if v.candidate:
            ok = correct_boxes(agreed(a, v.match), t)
            scores.append(v.score)
            boxes.append(len(ok))
            correct.append(int(ok.sum()))
    true_boxes = sum(len(t.detections) for t in truth)
    return {"seed": seed, "pool_tasks": len(pool), "true_boxes": true_boxes, "cnn_boxes": shown_boxes,
            "cnn_precision": shown_correct / max(shown_boxes, 1), "cnn_recall": shown_correct / max(true_boxes, 1),
            "candidate_tasks": len(scores),
            **ceiling_curve(np.array(scores, float), np.array(boxes, int), np.array(correct, int), true_boxes)}


def summarise(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("al_detect_agreement_ceiling_seed*.json"))]
    lines = ["# Auto-accept's ceiling on the detection benchmark's round-0 models (issue #22)", "",
             "`benchmarks/agreement_ceiling.py`: the round-0 CNN and the second opinion trained as "
             "`al_simulation.py --task detect --human-seconds` trains them (YOLOv8n, 60 initial labels; the second "
             "at input 96, another seed), both predicting the 340-image pool at confidence 0.25, matched at IoU 0.5 "
             "with the same class. A candidate task has every region matched and none seen by one model only. For "
             "every threshold on the candidates' agreement, precision of the accepted boxes against ground truth "
             "and coverage (accepted boxes / all true boxes in the pool). This is an oracle: it reads the truth, "
             "which calibration cannot.", "",
             "| seed | CNN precision / recall (conf 0.25) | candidate tasks | their boxes | precision of all candidates | "
             "coverage of all candidates | best coverage at precision ≥ 0.98 | best precision at coverage ≥ 0.5 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["all_candidates"]
        p = "-" if a["precision"] is None else f"{a['precision']:.3f}"
        best_p = "unreachable" if r["best_precision_at_target_coverage"] is None \
            else f"{r['best_precision_at_target_coverage']:.3f}"
        lines.append(f"| {r['seed']} | {r['cnn_precision']:.3f} / {r['cnn_recall']:.3f} | {r['candidate_tasks']} of "
                     f"{r['pool_tasks']} | {a['boxes']} of {r['true_boxes']} | {p} | {a['coverage']:.3f} | "
                     f"{r['best_coverage_at_target_precision']:.3f} | {best_p} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, action="append", help="seed(s) to run (repeatable); default 0, 1, 2")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 when seeds run in parallel)")
    ap.add_argument("--summarise", action="store_true", help="only write the table from the per-seed files")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarise:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        for seed in args.seed or [0, 1, 2]:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="tandem-ceiling-") as tmp:
                row = run_seed(seed, Path(tmp))
            row["seconds"] = time.perf_counter() - t0
            (args.out / f"al_detect_agreement_ceiling_seed{seed}.json").write_text(json.dumps(row, indent=1))
    table = summarise(args.out)
    (args.out / "al_detect_agreement_ceiling.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
