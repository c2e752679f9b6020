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

from backend.errors import ConfigError
from backend.labeling.label_map import build_label_map
from backend.models.base import ModelAdapter, ModelTask
from backend.training.export import ExportedDataset


def _class_ids(adapter: ModelAdapter, dataset: ExportedDataset, label_map: Mapping[str, str] | None,
               case_sensitive: bool) -> dict[str, int]:
    """Model class name -> dataset class id; {} when no class maps (the model cannot serve this project)."""
    index = {n: i for i, n in enumerate(dataset.class_names)}
    if dataset.control is None:  # a dataset made outside export_yolo_dataset: names alone
        wanted = {n.lower(): i for n, i in index.items()}
        return {c: wanted[c.lower()] for c in adapter.class_names if c.lower() in wanted}
    try:
        labels = build_label_map(dataset.control, adapter.class_names, label_map, case_sensitive)
    except ConfigError:
        return {}
    return {c: index[v] for c, v in labels.by_class.items() if v in index}


def _read_targets(label_file: Path, width: int, height: int) -> sv.Detections:
    rows = [line.split() for line in label_file.read_text().splitlines() if line.strip()] if label_file.exists() else []
    if not rows:
        return sv.Detections.empty()
    cls = np.array([int(r[0]) for r in rows])
    boxes = []
    for r in rows:
        vals = np.array(r[1:], dtype=float)
        if len(vals) == 4:
            cx, cy, w, h = vals
            boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
        else:  # polygon: its bounding box
            xs, ys = vals[0::2] * width, vals[1::2] * height
            boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    return sv.Detections(xyxy=np.array(boxes, float), class_id=cls)


def evaluate(adapter: ModelAdapter, dataset: ExportedDataset, batch: int = 16,
             label_map: Mapping[str, str] | None = None, case_sensitive: bool = False) -> dict[str, float]:
    """{"fitness": …, plus map50/map50_95 or top1}; fitness is what the promotion gate compares."""
    mapping = _class_ids(adapter, dataset, label_map, case_sensitive)
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
        outs = adapter.predict(images) if adapter.task is not ModelTask.CLASSIFY else [None] * len(part)
        preds, targets = [], []
        for f, img, out in zip(part, images, outs, strict=True):
            targets.append(_read_targets(root / "labels" / "val" / f"{f.stem}.txt", *img.size))
            det = out.detections if out is not None else None
            if det is None or len(det) == 0:
                preds.append(sv.Detections.empty())
                continue
            keep = np.array([n in mapping for n in det.data["class_name"]], dtype=bool)
            ids = np.array([mapping[n] for n in det.data["class_name"][keep]], dtype=int)
            preds.append(sv.Detections(xyxy=det.xyxy[keep], confidence=det.confidence[keep], class_id=ids))
        metric.update(preds, targets)
    result = metric.compute()
    map50, map50_95 = max(float(result.map50), 0.0), max(float(result.map50_95), 0.0)
    return {"fitness": map50_95, "map50": map50, "map50_95": map50_95, "images": len(files)}
