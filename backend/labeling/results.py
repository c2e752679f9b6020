"""Model outputs -> Label Studio result regions, one writer per control tag.

Each writer knows which model tasks can fill its tag; everything is in percent of the image as the
annotator sees it (EXIF already applied by the media layer).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from backend.labeling.config import ControlKind, ControlSpec
from backend.labeling.geometry import points_to_percent, xyxy_to_percent_xywh
from backend.labeling.label_map import LabelMap
from backend.models.base import ModelOutput, ModelTask

Region = dict[str, Any]


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


class ControlWriter:
    kind: ClassVar[ControlKind]
    tasks: ClassVar[frozenset[ModelTask]]

    def regions(
        self, control: ControlSpec, labels: LabelMap, output: ModelOutput, class_names: Sequence[str], size: tuple[int, int]
    ) -> list[Region]:
        raise NotImplementedError

    @staticmethod
    def _base(control: ControlSpec, kind: ControlKind, size: tuple[int, int], score: float) -> Region:
        width, height = size
        return {
            "id": _region_id(),
            "from_name": control.name,
            "to_name": control.to_name,
            "type": kind.value,
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "score": round(float(score), 6),
        }


class RectangleLabelsWriter(ControlWriter):
    kind = ControlKind.RECTANGLE
    tasks = frozenset({ModelTask.DETECT, ModelTask.SEGMENT})

    def regions(self, control, labels, output, class_names, size):
        det = output.detections
        if det is None or len(det) == 0:
            return []
        pct = xyxy_to_percent_xywh(det.xyxy, *size)
        out = []
        for i, name in enumerate(det.data["class_name"]):
            label = labels(name)
            if label is None or pct[i, 2] <= 0 or pct[i, 3] <= 0:
                continue
            region = self._base(control, self.kind, size, det.confidence[i])
            x, y, w, h = (round(float(v), 4) for v in pct[i])
            region["value"] = {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}
            out.append(region)
        return out


class PolygonLabelsWriter(ControlWriter):
    kind = ControlKind.POLYGON
    tasks = frozenset({ModelTask.SEGMENT})

    def regions(self, control, labels, output, class_names, size):
        det = output.detections
        if det is None or len(det) == 0 or "polygon" not in det.data:
            return []
        out = []
        for i, name in enumerate(det.data["class_name"]):
            label = labels(name)
            outline = det.data["polygon"][i]
            if label is None or outline is None or len(outline) < 3:
                continue
            region = self._base(control, self.kind, size, det.confidence[i])
            points = np.round(points_to_percent(outline, *size), 3).tolist()
            region["value"] = {"points": points, "closed": True, "polygonlabels": [label]}
            out.append(region)
        return out


class ChoicesWriter(ControlWriter):
    """The top choice, scored by the summed probability of the classes mapped onto it."""

    kind = ControlKind.CHOICES
    tasks = frozenset({ModelTask.CLASSIFY})

    def regions(self, control, labels, output, class_names, size):
        if output.probabilities is None:
            return []
        totals: dict[str, float] = {}
        for name, p in zip(class_names, output.probabilities, strict=True):
            label = labels(name)
            if label is not None:
                totals[label] = totals.get(label, 0.0) + float(p)
        if not totals:
            return []
        best = max(totals, key=totals.__getitem__)
        region = self._base(control, self.kind, size, totals[best])
        for key in ("original_width", "original_height", "image_rotation"):
            region.pop(key)
        region["value"] = {"choices": [best]}
        return [region]


WRITERS: dict[ControlKind, ControlWriter] = {
    w.kind: w for w in (RectangleLabelsWriter(), PolygonLabelsWriter(), ChoicesWriter())
}


def prediction_score(regions: Sequence[Region]) -> float:
    """Task-level score = mean region score; Label Studio sorts the "Prediction score" column by it."""
    scores = [r["score"] for r in regions if "score" in r]
    return round(float(np.mean(scores)), 6) if scores else 0.0
