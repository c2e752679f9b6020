"""The model Tandem serves when given none: YOLOv8n trained from its YAML on the generated shapes set.

This keeps `tandem serve` real and offline: no hub download, a model whose predictions can be checked
against known ground truth. The weights are trained once per TANDEM_HOME and reused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from backend.datasets.shapes import CLASS_NAMES, write_yolo_dataset
from backend.models.yolo import default_device


@dataclass(frozen=True)
class StarterRecipe:
    task: str = "detect"
    epochs: int = 20
    imgsz: int = 160
    train_images: int = 200
    val_images: int = 30
    batch: int = 8
    seed: int = 0
    classes: tuple[str, ...] = CLASS_NAMES  # fewer: a model with a blind spot (the demo's weak CNN)

    @property
    def architecture(self) -> str:
        return {"detect": "yolov8n.yaml", "segment": "yolov8n-seg.yaml", "classify": "yolov8n-cls.yaml"}[self.task]

    @property
    def weights_name(self) -> str:
        return f"shapes-yolov8n-{self.task}.pt"


RECIPES = {
    "detect": StarterRecipe("detect"),
    "segment": StarterRecipe("segment"),
    "classify": StarterRecipe("classify", epochs=6, imgsz=64, train_images=150, batch=16),
}


def starter_weights_path(home: Path, task: str = "detect") -> Path:
    return Path(home) / "models" / "starter" / RECIPES[task].weights_name


def starter_target(home: Path, recipe: StarterRecipe) -> Path:
    """Where a recipe's weights live: another seed is another model (a second opinion), so another folder."""
    folder = "starter" if recipe.seed == 0 else f"starter-seed{recipe.seed}"
    return Path(home) / "models" / folder / recipe.weights_name


def train_starter_model(home: Path, task: str = "detect", recipe: StarterRecipe | None = None) -> Path:
    """Train (once) and return the weights path; ultralytics prints its own per-epoch progress bars."""
    from ultralytics import YOLO

    recipe = recipe or RECIPES[task]
    target = starter_target(home, recipe)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tandem-starter-") as tmp:
        data = write_yolo_dataset(
            Path(tmp) / "data", task=task, train=recipe.train_images, val=recipe.val_images, seed=recipe.seed,
            classes=recipe.classes,
        )
        model = YOLO(recipe.architecture)
        model.train(
            data=str(data),
            epochs=recipe.epochs,
            imgsz=recipe.imgsz,
            batch=recipe.batch,
            workers=0,
            device=default_device(),
            project=str(Path(tmp) / "runs"),
            name="starter",
            exist_ok=True,
            val=False,
            plots=False,
            seed=recipe.seed,
            warmup_epochs=1,
            optimizer="AdamW",
            lr0=0.003,
            verbose=False,
        )
        last = Path(tmp) / "runs" / "starter" / "weights" / "last.pt"
        partial = target.with_suffix(".partial")
        shutil.copyfile(last, partial)
        os.replace(partial, target)
    return target
