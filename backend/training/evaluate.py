"""Score any served model on an exported dataset's frozen validation split.

Both the candidate and the serving model go through the same code, their classes mapped onto the
exported control's labels by the rules serving uses (name, alias, predicted_values, the label map), so a
parent trained on other class names ("square" served as "Box") is scored as annotators saw it.
"""

from __future__ import annotations

from collections.abc import Mapping
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

    files = sorted((root / "images" / "val").glob("*.png"))
    if not files:
        return {"fitness": 0.0, "map50": 0.0, "map50_95": 0.0, "images": 0}
    metric = MeanAveragePrecision()
    for start in range(0, len(files), batch):
        part = files[start : start + batch]
        images = [Image.open(f).convert("RGB") for f in part]
        scored = adapter.task is not ModelTask.CLASSIFY and space is not None
        outs = space.to_labels(adapter.predict(images)) if scored else [None] * len(part)  # in the dataset's ids
        preds, targets = [], []
        for f, img, out in zip(part, images, outs, strict=True):
            targets.append(read_detections(root / "labels" / "val" / f"{f.stem}.txt", img.size))
            det = out.detections if out is not None else None
            if det is None or len(det) == 0:
                preds.append(sv.Detections.empty())
                continue
            preds.append(sv.Detections(xyxy=det.xyxy, confidence=det.confidence, class_id=det.class_id))
        metric.update(preds, targets)
    result = metric.compute()
    map50, map50_95 = max(float(result.map50), 0.0), max(float(result.map50_95), 0.0)
    return {"fitness": map50_95, "map50": map50, "map50_95": map50_95, "images": len(files)}
