"""YOLOE and YOLO-World through ultralytics' own classes, built from their YAMLs (no weights offline), with class
embeddings set directly (their text encoders are downloads): predictions are named by the config's labels."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from backend.errors import ModelLoadError
from backend.models.base import Capability, ModelRequest, ModelTask, Vocabulary
from backend.models.open_vocab import is_open_vocab, load_open_vocab
from backend.predict import plan_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="Grape cluster"/><Label value="Leaf"/></RectangleLabels>
<PolygonLabels name="poly" toName="image"><Label value="Grape cluster"/><Label value="Leaf"/></PolygonLabels>
</View>"""


def embed(prompts: list[str]) -> torch.Tensor:
    """A fixed 512-d vector per prompt (what a text encoder would give), from its hash."""
    rows = [torch.from_numpy(np.random.default_rng(int(hashlib.sha256(p.encode()).hexdigest()[:8], 16))
                             .standard_normal(512).astype(np.float32)) for p in prompts]
    return torch.stack(rows)[None]


def _image(seed=0, w=160, h=120):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(("yaml", "tasks"), [("yoloe-11s-seg.yaml", {"detect", "segment"}),
                                             ("yolov8s-worldv2.yaml", {"detect"})])
def test_predictions_are_named_by_the_config_labels(yaml, tasks):
    assert is_open_vocab(yaml)
    model = load_open_vocab(yaml, device="cpu", embed=embed, conf=0.0, imgsz=160)
    assert Capability.PROMPTABLE in model.capabilities and {t.value for t in model.tasks} == tasks
    plan = plan_for(model, CONFIG, prompts={"Grape cluster": "grape cluster"})
    served = {p.control.name: p for p in plan.controls}
    assert set(served) == ({"box", "poly"} if "segment" in tasks else {"box"})
    image = _image()
    det = served["box"].adapter.predict([image])[0].detections
    assert len(det) > 0 and set(det.data["class_name"]) <= {"Grape cluster", "Leaf"}
    assert model.yolo.model.names == {0: "grape cluster", 1: "Leaf"}  # the prompts were its classes
    assert (det.xyxy[:, 2] <= image.width + 1e-3).all() and (det.xyxy[:, 3] <= image.height + 1e-3).all()
    if "segment" in tasks:
        seg = served["poly"].adapter.predict([image])[0].detections
        assert any(p is not None and p.shape[1] == 2 for p in seg.data["polygon"])
    # another project's labels: the classes follow the request
    other = model.predict([image], ModelRequest(ModelTask.DETECT, Vocabulary.from_labels(["cat", "dog", "bird"])))
    assert set(other[0].detections.data["class_name"]) <= {"cat", "dog", "bird"} and len(other[0].detections)


def test_without_a_text_encoder_offline_the_error_is_one_clear_line():
    """The text encoder is a separate download (ultralytics' CLIP package and MobileCLIP weights), absent here and
    never auto-installed by the tests (YOLO_AUTOINSTALL=false): the load fails at start, in one line."""
    with pytest.raises(ModelLoadError, match="needs its text encoder") as err:
        load_open_vocab("yoloe-11s-seg.yaml", device="cpu")
    assert "\n" not in str(err.value) and "run once with internet" in str(err.value)
    with pytest.raises(ModelLoadError, match="no such weights file"):
        load_open_vocab("/nowhere/yoloe-11s-seg.pt", device="cpu")


def test_served_weights_named_yoloe_or_world_load_as_open_vocabulary(tmp_path):
    """`--model yoloe-11s-seg.pt` (or as the second opinion) goes to `load_open_vocab`, not the closed-set adapter:
    here, offline, its one-line text-encoder error."""
    from backend.settings import Settings

    with pytest.raises(ModelLoadError, match="YOLOE yoloe-11s-seg.yaml needs its text encoder"):
        Settings(home=tmp_path).load_cnn("yoloe-11s-seg.yaml")
