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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import supervision as sv
from PIL import Image

from backend.core.prediction import CLASS_NAME
from backend.models.base import (
    TASK_CAPABILITY,
    BoundModel,
    Capability,
    ModelOutput,
    ModelRequest,
    ModelTask,
    Vocabulary,
)
from backend.models.families import Family, family_for

__all__ = ["BoundModel", "OpenVocabularyModel", "Vocabulary", "checkpoint_version", "chunks", "make_detections"]


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
        data={CLASS_NAME: np.array([names[i] for i in class_ids], dtype=object)},
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


# No open-vocabulary model here looks at more pixels than this (OWLv2 960, Grounding DINO 1333, Florence-2 768,
# SmolVLM 1536 a side), but their processors resize whatever they are given, some slowly: OWLv2's blurs the
# whole image in float first (a 4032x3024 photo: 68 s and 3.4 GB; a 72 MP one grew the server past 13 GB).
MAX_INPUT_SIDE = 2048


def bounded_input(image: Image.Image, side: int = MAX_INPUT_SIDE) -> tuple[Image.Image, tuple[float, float]]:
    """The image shrunk to at most `side` pixels on its longer edge, and the (x, y) factors back to its pixels."""
    w, h = image.size
    if max(w, h) <= side:
        return image, (1.0, 1.0)
    k = side / max(w, h)
    small = image.resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return small, (w / small.width, h / small.height)


class OpenVocabularyModel(ABC):
    """A promptable `Model`: the request's vocabulary is its classes. Loaded once; `predict_vocab` is
    serialised by a lock (transformers models are not re-entrant on GPU). What differs between families
    (prompts, box format, thresholds) is read from the family's entry in `backend.models.families`."""

    family: str = ""  # the loader kind, in words ("zero-shot detector", ...)
    tasks: frozenset[ModelTask] = frozenset()

    def __init__(self, model, processor, name: str, version: str, device: str) -> None:
        self.model = model.eval()
        self.processor = processor
        self.name, self.version, self.device = name, version, device
        self.source = name  # the hub id or folder it was loaded from (set by the loader)
        self._lock = threading.Lock()
        spec = family_for(self.model_type)
        if spec is None:
            raise ValueError(f"no family is registered for model type {self.model_type!r}")
        self.spec: Family = spec

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.PROMPTABLE, *(TASK_CAPABILITY[t] for t in self.tasks)})

    def _to_device(self, batch) -> dict:
        """A processor's output on the model's device; floating tensors (pixels) in the model's dtype."""
        import torch

        return {k: (v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def bind(self, task: ModelTask, vocabulary: Vocabulary) -> BoundModel:
        if task not in self.tasks:
            raise ValueError(f"{self.name} ({self.family}) cannot {task.value}")
        return BoundModel(self, task, vocabulary)

    def predict(self, images: list[Image.Image], request: ModelRequest | None = None) -> list[ModelOutput]:
        """The `Model` call: the request must carry the task and the vocabulary to ask about."""
        if request is None or request.vocabulary is None:
            raise ValueError(f"{self.name} is open-vocabulary: its request needs a task and a vocabulary")
        if request.task not in self.tasks:
            raise ValueError(f"{self.name} ({self.family}) cannot {request.task.value}")
        return self.predict_vocab(images, request.task, request.vocabulary)

    def predict_vocab(self, images: list[Image.Image], task: ModelTask, vocabulary: Vocabulary) -> list[ModelOutput]:
        """Images larger than MAX_INPUT_SIDE go in shrunk; their boxes and outlines come back in whole pixels."""
        if not images:
            return []
        import torch

        bounded = [bounded_input(im) for im in images]
        with self._lock, torch.inference_mode():
            outs = self._predict([im for im, _ in bounded], task, vocabulary)
        return [out if scale == (1.0, 1.0) else out.scaled(*scale) for out, (_, scale) in zip(outs, bounded, strict=True)]

    @abstractmethod
    def _predict(self, images: list[Image.Image], task: ModelTask, vocabulary: Vocabulary) -> list[ModelOutput]: ...
