"""Fine-tuning on a few corrections: which schedule builds on the parent instead of collapsing it?

A new project's first retrain has 10-20 corrected images. This measures candidate schedules on the
generated shapes (the demo's world) through Tandem's own fine-tune (`backend.training.yolo_finetune`),
replay (`backend.training.export.add_replay` / `pseudo_labels`) and gate metric (`evaluate`,
`paired_bootstrap`): per seed, n corrections of a fresh project (all three shapes), split into train and a
frozen validation split by the hash rule (`is_validation`: measured before the job topped a split of fewer
than 2 up to 2 from 10 tasks on, which changes only seeds the hash left with fewer), a fine-tune per
schedule, then held-out mAP50-95 on 100 other images and the gate's verdict with its bootstrap interval.

Parents: `blind` is the demo's CNN (never shown a triangle, 8 epochs) — there is something to learn;
`full` is the starter model (all three shapes, 20 epochs) — the corrections mostly must not hurt.

    uv run python benchmarks/finetune_small.py --seeds 3 --sizes 10,20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import numpy as np  # noqa: E402

from backend.convert.yolo_txt import box_lines  # noqa: E402
from backend.datasets.shapes import CLASS_NAMES, generate_samples, write_yolo_dataset  # noqa: E402
from backend.models.starter import StarterRecipe, train_starter_model  # noqa: E402
from backend.models.yolo import YoloAdapter  # noqa: E402
from backend.training.evaluate import evaluate, paired_bootstrap  # noqa: E402
from backend.training.export import ExportedDataset, add_replay, is_validation, pseudo_labels  # noqa: E402
from backend.training.worker import gate as job_gate  # noqa: E402
from backend.training.yolo_finetune import fine_tune  # noqa: E402

CACHE = Path(".test-cache/finetune-small")
PARENTS = {"blind": StarterRecipe("detect", epochs=8, classes=("square", "circle")), "full": StarterRecipe("detect")}
# name -> (fine-tune params, replay kind); "current" is what the job did before this benchmark
SCHEDULES = {
    "current": ({"lr0": 1e-3, "epochs": 30, "freeze": 10}, None),
    "lr2e-4": ({"lr0": 2e-4, "epochs": 30, "freeze": 10}, None),
    "replay-data": ({"lr0": 1e-3, "epochs": 30, "freeze": 10}, "data"),
    "replay-pseudo": ({"lr0": 1e-3, "epochs": 30, "freeze": 10}, "pseudo"),
    "unfrozen+replay-data": ({"lr0": 1e-3, "epochs": 30, "freeze": None}, "data"),
    "unfrozen+replay-pseudo": ({"lr0": 1e-3, "epochs": 30, "freeze": None}, "pseudo"),
    # for a parent that already knows every class (10 corrections moved it below the margin): gentler variants
    "unfrozen+replay-data@lr3e-4": ({"lr0": 3e-4, "epochs": 30, "freeze": None}, "data"),
    "unfrozen+replay-data@15ep": ({"lr0": 1e-3, "epochs": 15, "freeze": None}, "data"),
    "unfrozen+replay4x-data": ({"lr0": 1e-3, "epochs": 30, "freeze": None, "replay_per": 4, "replay_max": 64}, "data"),
    "unfrozen+replay-pseudo@lr3e-4": ({"lr0": 3e-4, "epochs": 30, "freeze": None}, "pseudo"),
    "unfrozen+replay4x-pseudo": ({"lr0": 1e-3, "epochs": 30, "freeze": None, "replay_per": 4, "replay_max": 64},
                                 "pseudo"),
}
MARGIN, EVAL_CONF, VAL_PERCENT = 0.01, 0.001, 20


def corrections(root: Path, n: int, seed: int) -> ExportedDataset:
    """n corrected images of a new project, split into train / frozen val as the job splits tasks."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "val": 0}
    for task_id, (image, s) in enumerate(generate_samples(n, seed=5000 + seed), start=1):
        split = "val" if is_validation(seed, task_id, VAL_PERCENT) else "train"
        xyxy = np.array([o.box for o in s.objects], dtype=float).reshape(-1, 4)
        lines = box_lines(xyxy, [CLASS_NAMES.index(o.label) for o in s.objects], image.size)
        image.save(root / "images" / split / f"task{task_id}.png")
        (root / "labels" / split / f"task{task_id}.txt").write_text("\n".join(lines) + "\n")
        counts[split] += 1
    names = "\n".join(f"  {i}: {c}" for i, c in enumerate(CLASS_NAMES))
    (root / "data.yaml").write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return ExportedDataset(root=root, task="detect", class_names=list(CLASS_NAMES), data=str(root / "data.yaml"),
                           train=counts["train"], val=counts["val"])


def replay_items(kind: str, recipe: StarterRecipe, parent: YoloAdapter, count: int, seed: int):
    if kind == "data":  # the parent's own training distribution (the starter regenerates it exactly)
        samples = generate_samples(count, seed=recipe.seed * 7 + seed, classes=recipe.classes)
        return [(f"d{i}", img, box_lines(np.array([o.box for o in s.objects], dtype=float).reshape(-1, 4),
                                         [CLASS_NAMES.index(o.label) for o in s.objects], img.size))
                for i, (img, s) in enumerate(samples)]
    images = [img for img, _ in generate_samples(count, seed=9000 + seed)]  # unreviewed tasks of the project
    lines = pseudo_labels(parent, images, {c: i for i, c in enumerate(CLASS_NAMES)})
    return [(f"p{i}", img, ln) for i, (img, ln) in enumerate(zip(images, lines, strict=True))]


def run(args) -> list[dict]:
    test_root = CACHE / "test"
    if not (test_root / "data.yaml").exists():
        write_yolo_dataset(test_root, train=0, val=args.test, seed=4242)
    test = ExportedDataset(root=test_root, task="detect", class_names=list(CLASS_NAMES), data=str(test_root / "data.yaml"))
    rows = []
    for parent_name in args.parents.split(","):
        recipe = PARENTS[parent_name]
        weights = train_starter_model(CACHE / parent_name, "detect", recipe)
        parent = YoloAdapter(weights, device="cpu", conf=EVAL_CONF)
        parent_test = evaluate(parent, test)
        for n in [int(x) for x in args.sizes.split(",")]:
            for seed in range(args.seeds):
                with tempfile.TemporaryDirectory(prefix="tandem-ft-") as tmp:
                    base = corrections(Path(tmp) / "base", n, seed)
                    for name in args.schedules.split(","):
                        params, replay = SCHEDULES[name]
                        params = dict(params)
                        per, most = params.pop("replay_per", 2), params.pop("replay_max", 32)
                        data_root = Path(tmp) / name
                        shutil.copytree(base.root, data_root)
                        (data_root / "data.yaml").write_text(
                            (base.root / "data.yaml").read_text().replace(str(base.root.resolve()), str(data_root.resolve())))
                        ds = ExportedDataset(root=data_root, task="detect", class_names=list(CLASS_NAMES),
                                             data=str(data_root / "data.yaml"), train=base.train, val=base.val)
                        added = add_replay(ds, replay_items(replay, recipe, parent, min(per * n, most), seed)) if replay else 0
                        t0 = time.perf_counter()
                        out = fine_tune(str(weights), ds.data, Path(tmp) / f"run-{name}",
                                        {**params, "imgsz": recipe.imgsz, "batch": 16}, "cpu")
                        seconds = time.perf_counter() - t0
                        cand = YoloAdapter(out["weights"], device="cpu", conf=EVAL_CONF)
                        gate = paired_bootstrap(cand, parent, ds, MARGIN, resamples=args.resamples)
                        held = evaluate(cand, test)
                        promoted, _ = job_gate(evaluate(cand, ds)["fitness"], evaluate(parent, ds)["fitness"], MARGIN, "")
                        row = {"parent": parent_name, "n": n, "seed": seed, "schedule": name, "train": ds.train,
                               "val": ds.val, "replay": added, "seconds": round(seconds, 1),
                               "parent_test": parent_test["map50_95"], "test": held["map50_95"],
                               "test_map50": held["map50"], "parent_test_map50": parent_test["map50"],
                               "gate_diff": gate.difference, "gate_low": gate.low, "gate_high": gate.high,
                               "promoted": bool(promoted), **({"run": args.run} if args.run else {})}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| parent | corrections | schedule | held-out mAP50-95, parent → candidate (mean ± std) | Δ mean | worst Δ "
             "| promoted | frozen-split 95% interval half-width (mean) | fine-tune s |", "|---" * 9 + "|"]
    keys = sorted({(r["parent"], r["n"], r["schedule"]) for r in rows}, key=lambda k: (k[0], k[1], list(SCHEDULES).index(k[2])))
    for p, n, s in keys:
        sel = [r for r in rows if (r["parent"], r["n"], r["schedule"]) == (p, n, s)]
        delta = np.array([r["test"] - r["parent_test"] for r in sel])
        cand = np.array([r["test"] for r in sel])
        half = np.mean([(r["gate_high"] - r["gate_low"]) / 2 for r in sel])
        lines.append(f"| {p} | {n} | {s} | {sel[0]['parent_test']:.3f} → {cand.mean():.3f} ± {cand.std():.3f} | "
                     f"{delta.mean():+.3f} | {delta.min():+.3f} | {sum(r['promoted'] for r in sel)}/{len(sel)} | "
                     f"{half:.3f} | {np.mean([r['seconds'] for r in sel]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sizes", default="10,20", help="corrections per round (train + frozen val)")
    ap.add_argument("--parents", default="blind,full")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--test", type=int, default=100, help="held-out images")
    ap.add_argument("--resamples", type=int, default=200, help="bootstrap resamples of the frozen split")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune_small.json"))
    ap.add_argument("--append", action="store_true", help="add these rows to --out (another schedule, say)")
    ap.add_argument("--run", type=int, default=None, help="tag the rows with this run number")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(args)
    if args.append and args.out.exists():
        rows = json.loads(args.out.read_text()) + rows
    args.out.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
