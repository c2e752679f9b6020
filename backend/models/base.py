"""One model contract for YOLO and VLMs alike: typed predictions in pixels of the image each model was handed.

A model says what it can do through `capabilities` (detect, segment, classify, promptable = open
vocabulary, embed) and answers `predict(images, request)`. The request names the task and, for a
promptable model, the vocabulary it is asked about; a model with its own classes ignores the vocabulary.
Serving asks `capabilities`, never the class: a new kind of model (YOLOE, SAM) only has to declare them.

`ModelAdapter` (a model fixed to one task and one class list) is what the predictor, the result writers and
active learning consume; `bind` turns any `Model` into one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from backend.core.prediction import Prediction


class ModelTask(StrEnum):
    DETECT = "detect"
    SEGMENT = "segment"
    CLASSIFY = "classify"


class Capability(StrEnum):
    DETECT = "detect"
    SEGMENT = "segment"
    CLASSIFY = "classify"
    PROMPTABLE = "promptable"  # open vocabulary: the request's labels (and their prompts) are its classes
    EMBED = "embed"  # `embed(images) -> (N, D)` image embeddings (diversity sampling)


TASK_CAPABILITY = {task: Capability(task.value) for task in ModelTask}

ModelOutput = Prediction  # the name adapters used before the prediction type moved to backend.core


@dataclass(frozen=True)
class Vocabulary:
    """`names[i]` is the class reported (a label value); `prompts[i]` is the text the model is asked."""

    names: tuple[str, ...]
    prompts: tuple[str, ...]

    @classmethod
    def from_labels(cls, labels: Sequence[str], prompts: Mapping[str, str] | None = None) -> Vocabulary:
        from backend.core.labels import LabelSpace  # the one place label names and prompts are matched

        return cls(*LabelSpace.vocabulary(list(labels), prompts))

    def __post_init__(self) -> None:
        if not self.names or len(self.names) != len(self.prompts):
            raise ValueError("a vocabulary needs one prompt per label and at least one label")


@dataclass(frozen=True)
class ModelRequest:
    """What one `predict` call asks: the task, and for a promptable model the labels it is asked about."""

    task: ModelTask
    vocabulary: Vocabulary | None = None


@runtime_checkable
class Model(Protocol):
    name: str
    version: str
    device: str
    capabilities: frozenset[Capability]

    def predict(self, images: list[Image.Image], request: ModelRequest | None = None) -> list[Prediction]:
        """One prediction per image, in order; batched internally."""
        ...


@runtime_checkable
class SupportsEmbedding(Protocol):
    """What `Capability.EMBED` promises beside `predict`."""

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """(N, D) float32 image embeddings, one row per image, in order."""
        ...


def tasks_of(model: Model) -> frozenset[ModelTask]:
    """The tasks a model can serve, read from its capabilities."""
    return frozenset(task for task, cap in TASK_CAPABILITY.items() if cap in model.capabilities)


def is_promptable(model: Model) -> bool:
    return Capability.PROMPTABLE in model.capabilities


@runtime_checkable
class ModelAdapter(Protocol):
    """A model fixed to one task and one class list: what the predictor and the result writers use."""

    name: str
    version: str
    task: ModelTask
    class_names: tuple[str, ...]
    device: str

    def predict(self, images: list[Image.Image]) -> list[ModelOutput]:
        """One output per image, in order; batched internally."""
        ...


@dataclass(frozen=True)
class BoundModel:
    """A promptable model fixed to one task and one label set: a plain ModelAdapter (and a one-task Model)."""

    model: Model
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

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset({TASK_CAPABILITY[self.task]})

    def predict(self, images: list[Image.Image], request: ModelRequest | None = None) -> list[ModelOutput]:
        if request is not None and request.task is not self.task:
            raise ValueError(f"{self.name} is bound to {self.task.value}, not {request.task.value}")
        return self.model.predict(images, ModelRequest(self.task, self.vocabulary))


def bind(model: Model, task: ModelTask, vocabulary: Vocabulary) -> ModelAdapter:
    """The model as a ModelAdapter for one task: a promptable model bound to the vocabulary, any other as it is
    (its own classes answer; the vocabulary only names the labels a control has)."""
    if task not in tasks_of(model):
        raise ValueError(f"{model.name} cannot {task.value}")
    if is_promptable(model):
        return BoundModel(model, task, vocabulary)
    return model  # type: ignore[return-value]  # a closed-vocabulary model is a ModelAdapter of its one task
