"""Score any served model on an exported dataset's frozen validation split.

Both the candidate and the serving model go through the same code, their classes mapped onto the
exported control's labels by the rules serving uses (name, alias, predicted_values, the label map), so a
parent trained on other class names ("square" served as "Box") is scored as annotators saw it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import supervision as sv
from PIL import Image
from supervision.metrics import MeanAveragePrecision

from backend.convert.yolo_txt import read_detections
from backend.core.labels import LabelSpace
from backend.errors import ConfigError
from backend.models.base import ModelAdapter, ModelTask
from backend.training.export import ExportedDataset


def _label_space(adapter: ModelAdapter, dataset: ExportedDataset, label_map: Mapping[str, str] | None,
                 case_sensitive: bool) -> LabelSpace | None:
    """The model's classes over the dataset's classes (columns = dataset class ids); None when no class maps
    (the model cannot serve this project)."""
    if dataset.control is None:  # a dataset made outside export_yolo_dataset: names alone
        return LabelSpace.by_name(adapter.class_names, dataset.class_names)
    try:
        space = LabelSpace.build(dataset.control, adapter.class_names, label_map, case_sensitive)
    except ConfigError:
        return None
    return space.over(adapter.class_names, dataset.class_names)


def evaluate(adapter: ModelAdapter, dataset: ExportedDataset, batch: int = 16,
             label_map: Mapping[str, str] | None = None, case_sensitive: bool = False) -> dict[str, float]:
    """{"fitness": …, plus map50/map50_95 or top1}; fitness is what the promotion gate compares."""
    space = _label_space(adapter, dataset, label_map, case_sensitive)
    mapping = space.class_ids() if space is not None else {}
    root = Path(dataset.root)
    if dataset.task == "classify":
        files = sorted((root / "val").glob("*/*.png"))
        if not files:
            return {"fitness": 0.0, "top1": 0.0, "images": 0}
        correct = 0
        for start in range(0, len(files), batch):
            part = files[start : start + batch]
            outs = adapter.predict([Image.open(f).convert("RGB") for f in part])
            for f, out in zip(part, outs, strict=True):
                if adapter.task is not ModelTask.CLASSIFY or out.probabilities is None:
                    continue
                top = adapter.class_names[int(np.argmax(out.probabilities))]
                correct += mapping.get(top) == dataset.class_names.index(f.parent.name)
        top1 = correct / len(files)
        return {"fitness": top1, "top1": top1, "images": len(files)}

    preds, targets = detections_on_val(adapter, dataset, space, batch)
    if not targets:
        return {"fitness": 0.0, "map50": 0.0, "map50_95": 0.0, "images": 0}
    map50, map50_95 = _map(preds, targets)
    return {"fitness": map50_95, "map50": map50, "map50_95": map50_95, "images": len(targets)}


def detections_on_val(adapter: ModelAdapter, dataset: ExportedDataset, space: LabelSpace | None,
                      batch: int = 16) -> tuple[list[sv.Detections], list[sv.Detections]]:
    """Per frozen-validation image: the model's boxes (in the dataset's class ids) and the corrected ones."""
    root = Path(dataset.root)
    files = sorted((root / "images" / "val").glob("*.png"))
    preds, targets = [], []
    for start in range(0, len(files), batch):
        part = files[start : start + batch]
        images = [Image.open(f).convert("RGB") for f in part]
        scored = adapter.task is not ModelTask.CLASSIFY and space is not None
        outs = space.to_labels(adapter.predict(images)) if scored else [None] * len(part)  # in the dataset's ids
        for f, img, out in zip(part, images, outs, strict=True):
            targets.append(read_detections(root / "labels" / "val" / f"{f.stem}.txt", img.size))
            det = out.detections if out is not None else None
            if det is None or len(det) == 0:
                preds.append(sv.Detections.empty())
                continue
            preds.append(sv.Detections(xyxy=det.xyxy, confidence=det.confidence, class_id=det.class_id))
    return preds, targets


def _map(preds: list[sv.Detections], targets: list[sv.Detections]) -> tuple[float, float]:
    result = MeanAveragePrecision().update(preds, targets).compute()
    return max(float(result.map50), 0.0), max(float(result.map50_95), 0.0)


@dataclass(frozen=True)
class GateResolution:
    """What the frozen split can tell apart: a paired bootstrap over its images of candidate − serving mAP50-95."""

    images: int
    difference: float  # candidate − serving on the whole split
    low: float  # 95% percentile interval of the difference
    high: float
    margin: float

    @property
    def resolves_margin(self) -> bool:
        """True when the interval is narrower than the margin on each side: the split can see a margin-sized loss."""
        return (self.high - self.low) / 2 <= self.margin

    def describe(self) -> str:
        verdict = ("it can tell a loss of the gate's margin from noise" if self.resolves_margin else
                   f"it cannot tell differences smaller than about {(self.high - self.low) / 2:.3f} from noise "
                   f"(the gate's margin is {self.margin}); annotate more tasks for a sharper verdict")
        return (f"frozen split of {self.images} images: candidate − serving mAP50-95 {self.difference:+.3f}, "
                f"95% bootstrap interval [{self.low:+.3f}, {self.high:+.3f}]: {verdict}")


def paired_bootstrap(candidate: ModelAdapter, serving: ModelAdapter, dataset: ExportedDataset, margin: float,
                     label_map: Mapping[str, str] | None = None, case_sensitive: bool = False,
                     resamples: int = 200, seed: int = 0) -> GateResolution | None:
    """Resample the frozen split's images (the same draw for both models) and recompute each model's mAP50-95.

    mAP is not a mean over images, so each resample is scored whole; None for classify or an empty split."""
    if dataset.task == "classify":
        return None
    runs = []
    for adapter in (candidate, serving):
        space = _label_space(adapter, dataset, label_map, case_sensitive)
        runs.append(detections_on_val(adapter, dataset, space))
    (pred_c, targets), (pred_s, _) = runs
    n = len(targets)
    if n == 0:
        return None
    diff = _map(pred_c, targets)[1] - _map(pred_s, targets)[1]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        t = [targets[i] for i in idx]
        draws.append(_map([pred_c[i] for i in idx], t)[1] - _map([pred_s[i] for i in idx], t)[1])
    low, high = np.percentile(draws, [2.5, 97.5])
    return GateResolution(images=n, difference=float(diff), low=float(low), high=float(high), margin=margin)
