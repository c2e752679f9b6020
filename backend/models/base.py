"""What every model adapter gives the server: typed outputs in pixels of the image it was handed."""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol, runtime_checkable

from PIL import Image

from backend.core.prediction import Prediction


class ModelTask(StrEnum):
    DETECT = "detect"
    SEGMENT = "segment"
    CLASSIFY = "classify"


ModelOutput = Prediction  # the name adapters used before the prediction type moved to backend.core


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
