"""The YOLO fine-tune itself, with no Tandem state: the local worker and the Modal container both call it."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")


def rebase_data_yaml(data: str | Path) -> str:
    """Point a detect/segment data.yaml's `path:` at where the dataset is mounted now (a Volume, say)."""
    data = Path(data)
    if data.suffix != ".yaml":
        return str(data)
    text = re.sub(r"(?m)^path: .*$", f"path: {data.parent.resolve()}", data.read_text())
    data.write_text(text)
    return str(data)


def fine_tune(parent: str, data: str, out_dir: str | Path, params: dict, device: str | int) -> dict:
    """Train from `parent` weights; returns plain types only (it crosses Modal's pickle boundary)."""
    from ultralytics import YOLO

    model = YOLO(parent)
    imgsz = params.get("imgsz") or int(model.overrides.get("imgsz") or 640)
    t0 = time.perf_counter()
    model.train(
        data=rebase_data_yaml(data), epochs=int(params.get("epochs", 10)), imgsz=imgsz,
        batch=params.get("batch", 16), workers=int(params.get("workers", 0)), device=device,
        project=str(out_dir), name="train", exist_ok=True, val=False, plots=False, verbose=True,
        warmup_epochs=0, seed=0, optimizer="AdamW", lr0=float(params.get("lr0", 0.001)),
        # ultralytics accumulates gradients up to a nominal batch of 64: on a few dozen corrections that
        # leaves a handful of optimizer steps, too few to learn a class the parent never saw. Step every batch.
        nbs=params.get("batch", 16),
    )
    last = Path(out_dir) / "train" / "weights" / "last.pt"
    return {"weights": str(last), "seconds": time.perf_counter() - t0, "imgsz": imgsz, "size": last.stat().st_size}
