"""Open-vocabulary models: the labeling config's labels are their classes.

A YOLO model brings its own class list; a VLM is asked about whatever labels the project has. So a VLM
adapter is *bound* to a vocabulary (the config's label values, each with the text it is asked as) and
the binding is an ordinary `ModelAdapter` that the predictor, the result writers and active learning
use unchanged.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import supervision as sv
from PIL import Image

from backend.models.base import ModelOutput, ModelTask


@dataclass(frozen=True)
class Vocabulary:
    """`names[i]` is the class reported (a label value); `prompts[i]` is the text the model is asked."""

    names: tuple[str, ...]
    prompts: tuple[str, ...]

    @classmethod
    def from_labels(cls, labels: Sequence[str], prompts: Mapping[str, str] | None = None) -> Vocabulary:
        prompts = {k.lower(): v for k, v in (prompts or {}).items()}
        return cls(tuple(labels), tuple(prompts.get(label.lower(), label) for label in labels))

    def __post_init__(self) -> None:
        if not self.names or len(self.names) != len(self.prompts):
            raise ValueError("a vocabulary needs one prompt per label and at least one label")


def chunks(items: Sequence, size: int):
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def make_detections(xyxy, confidence, class_ids, names: Sequence[str]) -> sv.Detections:
    """Detections with `data["class_name"]` always present, also when empty (the result writers read it)."""
    class_ids = np.asarray(class_ids, dtype=int).reshape(-1)
    return sv.Detections(
        xyxy=np.asarray(xyxy, dtype=np.float32).reshape(-1, 4),
        confidence=np.asarray(confidence, dtype=np.float32).reshape(-1),
        class_id=class_ids,
        data={"class_name": np.array([names[i] for i in class_ids], dtype=object)},
    )


def checkpoint_version(path: Path, name: str, config: str = "config.json") -> str:
    """`<name>-<8 hex>` from the config and the weight files' names and sizes (hashing GBs would be slow);
    small files (LoRA adapters) are hashed whole."""
    digest = hashlib.sha256((path / config).read_bytes())
    for file in sorted(path.iterdir()):
        if file.suffix in (".safetensors", ".bin", ".json") and file.is_file():
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}".encode())
            if size < 64 * 1024 * 1024:
                digest.update(file.read_bytes())
    return f"{name}-{digest.hexdigest()[:8]}"


class OpenVocabularyModel(ABC):
    """Loaded once; `predict_vocab` is serialised by a lock (transformers models are not re-entrant on GPU)."""

    family: str = ""
    tasks: frozenset[ModelTask] = frozenset()

    def __init__(self, model, processor, name: str, version: str, device: str) -> None:
        self.model = model.eval()
        self.processor = processor
        self.name, self.version, self.device = name, version, device
        self.source = name  # the hub id or folder it was loaded from (set by the loader)
        self._lock = threading.Lock()

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    def _to_device(self, batch) -> dict:
        """A processor's output on the model's device; floating tensors (pixels) in the model's dtype."""
        import torch

        return {k: (v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def bind(self, task: ModelTask, vocabulary: Vocabulary) -> BoundModel:
        if task not in self.tasks:
            raise ValueError(f"{self.name} ({self.family}) cannot {task.value}")
        return BoundModel(self, task, vocabulary)

    def predict_vocab(self, images: list[Image.Image], task: ModelTask, vocabulary: Vocabulary) -> list[ModelOutput]:
        if not images:
            return []
        import torch

        with self._lock, torch.inference_mode():
            return self._predict(images, task, vocabulary)

    @abstractmethod
    def _predict(self, images: list[Image.Image], task: ModelTask, vocabulary: Vocabulary) -> list[ModelOutput]: ...


@dataclass(frozen=True)
class BoundModel:
    """An open-vocabulary model fixed to one task and one label set: a plain ModelAdapter."""

    model: OpenVocabularyModel
    task: ModelTask
    vocabulary: Vocabulary
    class_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", self.vocabulary.names)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def device(self) -> str:
        return self.model.device

    def predict(self, images: list[Image.Image]) -> list[ModelOutput]:
        return self.model.predict_vocab(images, self.task, self.vocabulary)
