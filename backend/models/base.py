"""What every model adapter gives the server: typed outputs in pixels of the image it was handed."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

import numpy as np
import supervision as sv
from PIL import Image


class ModelTask(StrEnum):
    DETECT = "detect"
    SEGMENT = "segment"
    CLASSIFY = "classify"


@dataclass(frozen=True)
class ModelOutput:
    """One image's prediction.

    `detections` carries xyxy pixels, confidence, class_id and `data["class_name"]`; segmenters add
    `data["polygon"]` (an object array of (K, 2) pixel outlines). `probabilities` is the full
    class distribution of a classifier, aligned with the adapter's `class_names`. `candidate_peak` is a
    detector's highest class score over all its candidates before the confidence threshold: an image with
    no kept box can still rank for review by how near it came to one.
    """

    detections: sv.Detections | None = None
    probabilities: np.ndarray | None = None
    candidate_peak: float | None = None


@runtime_checkable
class ModelAdapter(Protocol):
    name: str
    version: str
    task: ModelTask
    class_names: tuple[str, ...]
    device: str

    def predict(self, images: list[Image.Image]) -> list[ModelOutput]:
        """One output per image, in order; batched internally."""
        ...
