"""Overhead of Tandem's YOLO training job against the same training run directly with ultralytics.

Both runs fine-tune the same parent weights on the same generated dataset with the same arguments, one
after the other on this machine, each in a fresh Python process, timed from outside: "ultralytics" is
what a user runs by hand (import, `YOLO(parent).train(...)`, which also validates the last epoch and
best.pt); "Tandem" is what a job's worker process does besides exporting from Label Studio: fine-tune
through `fine_tune`, load the new weights (the corrupt-file check) and score candidate and parent on the
frozen validation split (the promotion gate). The training calls alone are timed inside each process too.

    uv run python benchmarks/train_overhead.py [--epochs 30] [--images 120] [--imgsz 160]
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

DIRECT = """
import json, sys, time
from ultralytics import YOLO
a = json.loads(sys.argv[1])
t = time.perf_counter()
YOLO(a["parent"]).train(data=a["data"], epochs=a["params"]["epochs"], imgsz=a["params"]["imgsz"], batch=16, workers=0,
                        device="cpu", project=a["out"], name="train", exist_ok=True, val=False, plots=False,
                        verbose=True, warmup_epochs=0, seed=0, optimizer="AdamW", lr0=0.001, nbs=16)
print(json.dumps({"train_s": time.perf_counter() - t}))
"""

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
    ap.add_argument("--epochs", type=int, default=30, help="Tandem's own default (TANDEM_TRAIN_EPOCHS)")
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    params = {"epochs": args.epochs, "imgsz": args.imgsz, "batch": 16, "lr0": 0.001, "workers": 0}
    with tempfile.TemporaryDirectory(prefix="tandem-overhead-") as tmp:
        tmp = Path(tmp)
        parent = str(train_starter_model(tmp / "home", "detect", StarterRecipe("detect", epochs=6)))
        data = str(write_yolo_dataset(tmp / "data", train=args.images, val=args.images // 4, seed=77))
        direct, tandem, direct_train, tandem_train = [], [], [], []

        def timed(script: str, out: str) -> tuple[float, dict]:
            job_args = {"root": str(tmp / "data"), "data": data, "parent": parent, "out": str(tmp / out),
                        "params": params}
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", script, json.dumps(job_args)], capture_output=True, text=True,
                                  check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            seconds = time.perf_counter() - t
            shutil.rmtree(tmp / out, ignore_errors=True)
            return seconds, json.loads(proc.stdout.strip().splitlines()[-1])

        for r in range(args.repeats):
            order = [("direct", DIRECT), ("tandem", JOB)] if r % 2 == 0 else [("tandem", JOB), ("direct", DIRECT)]
            for name, script in order:
                seconds, result = timed(script, f"{name}{r}")
                if name == "direct":
                    direct.append(seconds)
                    direct_train.append(result["train_s"])
                else:
                    tandem.append(seconds)
                    tandem_train.append(result["train_s"])
                    fitness = (result["old"], result["new"])
            print(f"run {r}: ultralytics {direct[-1]:.1f} s (train() {direct_train[-1]:.1f} s) | Tandem job "
                  f"{tandem[-1]:.1f} s (fine_tune {tandem_train[-1]:.1f} s) | fitness {fitness[0]:.3f} -> {fitness[1]:.3f}")
        d, j = min(direct), min(tandem)
        print(f"\nbest of {args.repeats}, fresh process each, timed from outside: ultralytics {d:.1f} s, Tandem job "
              f"{j:.1f} s -> ratio {j / d:.3f}x [target <= 1.05x]; training call alone {min(tandem_train):.1f} s vs "
              f"{min(direct_train):.1f} s -> {min(tandem_train) / min(direct_train):.3f}x")


if __name__ == "__main__":
    main()
