"""Overhead of Tandem's YOLO training job against the same training run directly with ultralytics.

Both runs fine-tune the same parent weights on the same generated dataset with the same arguments, one
after the other in this process's machine. "Tandem" is what a job's worker process does besides
exporting from Label Studio: start a fresh Python process, fine-tune through `fine_tune`, load the new
weights (the corrupt-file check) and score candidate and parent on the frozen validation split.

    uv run python benchmarks/train_overhead.py [--epochs 10] [--images 120] [--imgsz 160]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

from backend.datasets.shapes import write_yolo_dataset  # noqa: E402
from backend.models.starter import StarterRecipe, train_starter_model  # noqa: E402

JOB = """
import json, sys, time
from backend.models.yolo import YoloAdapter
from backend.training.evaluate import evaluate
from backend.training.export import ExportedDataset
from backend.training.yolo_finetune import fine_tune
a = json.loads(sys.argv[1])
ds = ExportedDataset(root=a["root"], task="detect", class_names=["square", "circle", "triangle"], data=a["data"])
t = time.perf_counter()
out = fine_tune(a["parent"], a["data"], a["out"], a["params"], "cpu")
train_s = time.perf_counter() - t
new, old = evaluate(YoloAdapter(out["weights"], device="cpu"), ds), evaluate(YoloAdapter(a["parent"], device="cpu"), ds)
print(json.dumps({"train_s": train_s, "new": new["fitness"], "old": old["fitness"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    params = {"epochs": args.epochs, "imgsz": args.imgsz, "batch": 16, "lr0": 0.001, "workers": 0}
    with tempfile.TemporaryDirectory(prefix="tandem-overhead-") as tmp:
        tmp = Path(tmp)
        parent = str(train_starter_model(tmp / "home", "detect", StarterRecipe("detect", epochs=6)))
        data = str(write_yolo_dataset(tmp / "data", train=args.images, val=args.images // 4, seed=77))
        direct, tandem = [], []
        for r in range(args.repeats):
            from ultralytics import YOLO

            t = time.perf_counter()
            YOLO(parent).train(data=data, epochs=args.epochs, imgsz=args.imgsz, batch=16, workers=0, device="cpu",
                               project=str(tmp / f"direct{r}"), name="train", exist_ok=True, val=False, plots=False,
                               verbose=False, warmup_epochs=0, seed=0, optimizer="AdamW", lr0=0.001, nbs=16)
            direct.append(time.perf_counter() - t)

            job_args = {"root": str(tmp / "data"), "data": data, "parent": parent, "out": str(tmp / f"job{r}"),
                        "params": params}
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", JOB, json.dumps(job_args)], capture_output=True, text=True,
                                  check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            tandem.append(time.perf_counter() - t)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"run {r}: ultralytics direct {direct[-1]:.1f} s | Tandem job {tandem[-1]:.1f} s "
                  f"(of which training {result['train_s']:.1f} s) | fitness {result['old']:.3f} -> {result['new']:.3f}")
            shutil.rmtree(tmp / f"direct{r}", ignore_errors=True)
        d, j = min(direct), min(tandem)
        print(f"\nbest of {args.repeats}: direct {d:.1f} s, Tandem job {j:.1f} s -> ratio {j / d:.3f}x "
              f"[target <= 1.05x]; training step alone {result['train_s'] / d:.3f}x")


if __name__ == "__main__":
    main()
