"""The YOLO fine-tune itself, with no Tandem state: the local worker and the Modal container both call it."""

from __future__ import annotations

import os
import re
import sys
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


_TASK_TRAINERS = {"detect": "DetectionTrainer", "segment": "SegmentationTrainer", "classify": "ClassificationTrainer"}


def trainer_without_validation(task: str):
    """The task's ultralytics trainer, minus its validation passes.

    Even with val=False, ultralytics validates the last epoch and then best.pt (the same weights) on the
    validation split; the promotion gate then scores the candidate on that split again, with Tandem's own
    metric. Skipping ultralytics' two passes leaves the job with the one evaluation that decides anything.
    """
    return getattr(sys.modules[__name__], f"Tandem{_TASK_TRAINERS[task]}")


def __getattr__(name: str):
    # Built on first use, as module attributes: ultralytics' multi-GPU launcher re-imports the trainer
    # class by module and name in each worker process.
    base_name = name.removeprefix("Tandem")
    if not name.startswith("Tandem") or base_name not in _TASK_TRAINERS.values():
        raise AttributeError(name)
    from ultralytics.models import yolo

    task = next(t for t, n in _TASK_TRAINERS.items() if n == base_name)
    base = getattr(getattr(yolo, task), base_name)

    def validate(self):
        return self.metrics, None  # fitness None: no early stop, the last epoch is kept (as with val=False)

    def final_eval(self):
        # what ultralytics' final_eval does besides validating: drop the optimizer state (3x the weights)
        from ultralytics.utils import RANK
        from ultralytics.utils.torch_utils import strip_optimizer

        if RANK in {-1, 0}:
            for ckpt in (self.last, self.best):
                if ckpt.exists():
                    strip_optimizer(ckpt)

    cls = type(name, (base,), {"validate": validate, "final_eval": final_eval, "__module__": __name__})
    globals()[name] = cls
    return cls


def _fine_tune_trainer(model):
    """Tandem's trainer for the standard YOLO tasks; RT-DETR, YOLO-World and the rest keep their own."""
    if model.task not in _TASK_TRAINERS:
        return None
    stock = model._smart_load("trainer")
    return trainer_without_validation(model.task) if stock.__name__ == _TASK_TRAINERS[model.task] else None


def fine_tune(parent: str, data: str, out_dir: str | Path, params: dict, device: str | int) -> dict:
    """Train from `parent` weights; returns plain types only (it crosses Modal's pickle boundary)."""
    from ultralytics import YOLO

    model = YOLO(parent)
    imgsz = params.get("imgsz") or int(model.overrides.get("imgsz") or 640)
    t0 = time.perf_counter()
    model.train(
        trainer=_fine_tune_trainer(model), data=rebase_data_yaml(data),
        epochs=int(params.get("epochs", 10)), imgsz=imgsz,
        batch=params.get("batch", 16), workers=int(params.get("workers", 0)), device=device,
        project=str(out_dir), name="train", exist_ok=True, val=False, plots=False, verbose=True,
        warmup_epochs=0, seed=0, optimizer="AdamW", lr0=float(params.get("lr0", 0.001)),
        freeze=params.get("freeze"),  # the worker freezes the backbone on very few images
        # ultralytics accumulates gradients up to a nominal batch of 64: on a few dozen corrections that
        # leaves a handful of optimizer steps, too few to learn a class the parent never saw. Step every batch.
        nbs=params.get("batch", 16),
    )
    last = Path(out_dir) / "train" / "weights" / "last.pt"
    return {"weights": str(last), "seconds": time.perf_counter() - t0, "imgsz": imgsz, "size": last.stat().st_size}
