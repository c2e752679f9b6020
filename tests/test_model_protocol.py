"""One `Model` protocol for YOLO and VLMs: both declare capabilities and answer `predict(images, request)`,
and serving (`served_tasks`, `registry_task`, `plan_for`) reads capabilities, never the class."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from backend.core.prediction import Prediction
from backend.errors import ConfigError
from backend.models.base import (
    BoundModel,
    Capability,
    Model,
    ModelAdapter,
    ModelRequest,
    ModelTask,
    SupportsEmbedding,
    Vocabulary,
    bind,
    tasks_of,
)
from backend.models.vlm.base import make_detections
from backend.models.vlm.loader import load_vlm
from backend.predict import describe, plan_for, registry_task, served_tasks
from tests.test_server import CHOICES, RECT

VOCAB = Vocabulary.from_labels(["square", "circle"], {"circle": "a round disc"})


def scene() -> Image.Image:
    image = Image.new("RGB", (320, 240), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle([40, 30, 140, 120], fill=(200, 0, 0))
    draw.ellipse([180, 100, 280, 200], fill=(0, 0, 200))
    return image


def test_yolo_is_a_model_with_its_task_and_embeddings(detect_adapter, classify_adapter):
    image = scene()
    for adapter, task in ((detect_adapter, ModelTask.DETECT), (classify_adapter, ModelTask.CLASSIFY)):
        assert isinstance(adapter, Model) and isinstance(adapter, ModelAdapter)
        assert adapter.capabilities == {Capability(task.value), Capability.EMBED}
        assert isinstance(adapter, SupportsEmbedding)
        vectors = adapter.embed([image, image])
        assert vectors.shape[0] == 2 and vectors.shape[1] > 0 and np.isfinite(vectors).all()
        assert tasks_of(adapter) == served_tasks(adapter) == {task}
        assert registry_task(adapter) == describe(adapter) == task.value
        assert bind(adapter, task, VOCAB) is adapter  # its own classes answer; the labels are mapped afterwards
    plain = detect_adapter.predict([image])[0].detections
    asked = detect_adapter.predict([image], ModelRequest(ModelTask.DETECT, VOCAB))[0].detections  # vocab ignored
    np.testing.assert_array_equal(asked.xyxy, plain.xyxy)
    np.testing.assert_array_equal(asked.class_id, plain.class_id)
    with pytest.raises(ValueError, match="not classify"):
        detect_adapter.predict([image], ModelRequest(ModelTask.CLASSIFY))
    assert plan_for(detect_adapter, RECT).controls[0].adapter is detect_adapter


@pytest.mark.parametrize(("name", "tasks"), [("owlv2", {ModelTask.DETECT}),
                                              ("qwen2_5_vl", {ModelTask.CLASSIFY, ModelTask.DETECT})])
def test_a_vlm_is_a_promptable_model(tiny_vlm, name, tasks):
    vlm = load_vlm(str(tiny_vlm(name)), device="cpu", **({"threshold": 0.0} if name == "owlv2" else {}))
    assert isinstance(vlm, Model)
    assert vlm.capabilities == {Capability.PROMPTABLE, *(Capability(t.value) for t in tasks)}
    assert served_tasks(vlm) == tasks
    assert registry_task(vlm) == "vlm:" + "+".join(sorted(t.value for t in tasks))
    image = scene()
    for task in tasks:
        request = ModelRequest(task, VOCAB)
        direct = vlm.predict([image], request)[0]
        bound = bind(vlm, task, VOCAB)
        assert isinstance(bound, BoundModel) and isinstance(bound, ModelAdapter) and isinstance(bound, Model)
        assert bound.capabilities == {Capability(task.value)} and bound.class_names == ("square", "circle")
        via_bound = bound.predict([image])[0]
        via_vocab = vlm.predict_vocab([image], task, VOCAB)[0]
        for a, b in ((direct, via_bound), (direct, via_vocab)):
            if task is ModelTask.CLASSIFY:
                np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-5)
            else:
                np.testing.assert_allclose(a.detections.xyxy, b.detections.xyxy, rtol=1e-5)
                assert list(a.detections.data["class_name"]) == list(b.detections.data["class_name"])
    with pytest.raises(ValueError, match="vocabulary"):
        vlm.predict([image], ModelRequest(next(iter(tasks))))
    if ModelTask.CLASSIFY not in tasks:
        with pytest.raises(ValueError, match="cannot classify"):
            vlm.predict([image], ModelRequest(ModelTask.CLASSIFY, VOCAB))
        with pytest.raises(ValueError, match="cannot classify"):
            bind(vlm, ModelTask.CLASSIFY, VOCAB)


class OpenVocabularyDetector:
    """A promptable detector that is not an OpenVocabularyModel (a YOLOE-like model): one box per label asked."""

    name, version, device = "fake-open", "fake-open-1", "cpu"
    capabilities = frozenset({Capability.DETECT, Capability.PROMPTABLE})

    def __init__(self) -> None:
        self.requests: list[ModelRequest] = []

    def predict(self, images, request=None):
        self.requests.append(request)
        n = len(request.vocabulary.names)
        boxes = [[10.0 * i, 10.0, 10.0 * i + 20.0, 40.0] for i in range(n)]
        return [Prediction(detections=make_detections(boxes, [0.9] * n, list(range(n)), request.vocabulary.names))
                for _ in images]


def test_serving_joins_models_by_capability_not_by_class():
    model = OpenVocabularyDetector()
    assert isinstance(model, Model) and registry_task(model) == "vlm:detect"
    plan = plan_for(model, RECT, prompts={"Circle": "a round disc"})
    (planned,) = plan.controls
    assert planned.adapter.class_names == ("Square", "Circle", "Triangle")
    (out,) = planned.adapter.predict([scene()])
    (request,) = model.requests
    assert request.task is ModelTask.DETECT
    assert request.vocabulary.prompts == ("Square", "a round disc", "Triangle")
    assert list(out.detections.data["class_name"]) == ["Square", "Circle", "Triangle"]
    with pytest.raises(ConfigError, match="VLM detect model and cannot fill"):
        plan_for(model, CHOICES)
