"""Every supported VLM family, as a tiny random-weight checkpoint built here, loaded through Tandem's real
loading path (`load_vlm`: config.json -> Auto* classes) and run on real images.

Random weights say nothing about quality, so these tests check what the adapters promise regardless:
shapes, distributions that sum to 1, boxes inside the image, labels from the config. The generative
families are then fine-tuned here for a few seconds on one image until they write its boxes (and answer
its class), which checks the whole path — prompt, generation, parsing, rescaling, token-probability
confidences and label scoring — against known truth.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend.errors import ModelLoadError
from backend.labeling.results import WRITERS
from backend.models.base import ModelTask
from backend.models.vlm.base import BoundModel, Vocabulary
from backend.models.vlm.loader import load_vlm
from backend.models.vlm.source import resolve_source
from backend.predict import plan_for
from tests.test_server import CHOICES, RECT
from tests.tiny_vlms import teach

FAMILIES = {  # name -> tasks it serves
    "owlv2": {"detect"}, "grounding_dino": {"detect"}, "clip": {"classify"}, "siglip": {"classify"},
    "siglip2": {"classify"},
    "llava": {"classify"}, "idefics3": {"classify"}, "qwen2_5_vl": {"classify", "detect"},
    "qwen3_vl": {"classify", "detect"}, "paligemma": {"classify", "detect"}, "florence2": {"classify", "detect"},
}
GROUNDING = ["qwen2_5_vl", "qwen3_vl", "paligemma", "florence2"]
LABELS = ["square", "circle", "triangle"]


def scene() -> tuple[Image.Image, list[tuple[float, float, float, float]], list[str]]:
    image = Image.new("RGB", (320, 240), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle([40, 30, 140, 120], fill=(200, 0, 0))
    draw.ellipse([180, 100, 280, 200], fill=(0, 0, 200))
    return image, [(40, 30, 140, 120), (180, 100, 280, 200)], ["square", "circle"]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_loads_and_predicts(tiny_vlm, name):
    model = load_vlm(str(tiny_vlm(name)), device="cpu", **({"threshold": 0.0} if name in ("owlv2",) else {}))
    assert {t.value for t in model.tasks} == FAMILIES[name]
    assert model.version.startswith(f"{name}-") and len(model.version) == len(name) + 9
    image, _, _ = scene()
    images = [image, image.resize((120, 260))]
    vocab = Vocabulary.from_labels(LABELS)
    if ModelTask.CLASSIFY in model.tasks:
        outputs = model.bind(ModelTask.CLASSIFY, vocab).predict(images)
        assert len(outputs) == 2
        for out in outputs:
            assert out.probabilities.shape == (3,) and (out.probabilities >= 0).all()
            assert out.probabilities.sum() == pytest.approx(1.0)
    if ModelTask.DETECT in model.tasks:
        outputs = model.bind(ModelTask.DETECT, vocab).predict(images)
        for out, im in zip(outputs, images, strict=True):
            det = out.detections
            assert det.xyxy.shape[1] == 4
            assert (det.xyxy[:, [0, 2]] <= im.width).all() and (det.xyxy[:, [1, 3]] <= im.height).all()
            assert (det.xyxy >= 0).all() and set(det.data["class_name"]) <= set(LABELS)
            assert ((det.confidence > 0) & (det.confidence <= 1)).all()


def test_owlv2_boxes_are_clipped_to_the_image(tiny_vlm, tmp_path):
    """OWLv2 pads to a square and scales by max(h, w): raw boxes run past a wide image's bottom edge."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    image = Image.new("RGB", (320, 224), (120, 60, 200))
    processor = AutoProcessor.from_pretrained(tiny_vlm("owlv2"))
    raw_model = AutoModelForZeroShotObjectDetection.from_pretrained(tiny_vlm("owlv2")).eval()
    # random box-head weights saturate into zero-width boxes; zeroing the last layer leaves OWLv2's
    # own per-patch box prior: one real box per patch, as a trained model's boxes sit near their patches
    torch.nn.init.zeros_(raw_model.box_head.dense2.weight)
    torch.nn.init.zeros_(raw_model.box_head.dense2.bias)
    path = tmp_path / "owlv2-patch-prior"
    raw_model.save_pretrained(path)
    processor.save_pretrained(path)
    with torch.no_grad():
        raw = processor.post_process_grounded_object_detection(
            raw_model(**processor(text=[LABELS], images=image, return_tensors="pt")), threshold=0.0,
            target_sizes=[(224, 320)], text_labels=[LABELS])[0]
    assert raw["boxes"][:, 3].max() > 224  # the trap is real

    model = load_vlm(str(path), device="cpu", threshold=0.0, iou=1.0, max_det=10_000)
    det = model.bind(ModelTask.DETECT, Vocabulary.from_labels(LABELS)).predict([image])[0].detections
    assert len(det) > 0 and det.xyxy[:, 3].max() <= 224 and det.xyxy[:, 2].max() <= 320
    assert set(det.data["class_name"]) <= set(LABELS)


def test_prompts_reword_labels_and_results_use_the_config_labels(tiny_vlm):
    model = load_vlm(str(tiny_vlm("clip")), device="cpu")
    plan = plan_for(model, CHOICES, prompts={"Circle": "a round disc"})
    (planned,) = plan.controls
    assert isinstance(planned.adapter, BoundModel)
    assert planned.adapter.vocabulary.prompts == ("Square", "a round disc", "Triangle")
    image, _, _ = scene()
    out = planned.adapter.predict([image])[0]
    regions = WRITERS[planned.control.kind].regions(planned.control, planned.labels, out, planned.adapter.class_names,
                                                    image.size)
    assert regions[0]["value"]["choices"][0] in ("Square", "Circle", "Triangle")
    assert regions[0]["score"] == pytest.approx(out.probabilities.max())


def test_a_detector_cannot_fill_choices_and_says_so(tiny_vlm):
    from backend.errors import ConfigError

    model = load_vlm(str(tiny_vlm("owlv2")), device="cpu")
    with pytest.raises(ConfigError, match="VLM detect model"):
        plan_for(model, CHOICES)
    assert plan_for(model, RECT).controls[0].adapter.task is ModelTask.DETECT


@pytest.mark.parametrize("name", GROUNDING)
def test_generative_grounding_finds_the_boxes_it_was_taught(tiny_vlm, name):
    torch.manual_seed(0)
    model = load_vlm(str(tiny_vlm(name)), device="cpu", max_new_tokens=96)
    image, boxes, labels = scene()
    vocab = Vocabulary.from_labels(["square", "circle"])
    answer = model.grounding_answer(image, boxes, labels)
    first, last = teach(model, [(image, model.question(ModelTask.DETECT, vocab), answer)])
    assert last < 0.05 < first

    det = model.bind(ModelTask.DETECT, vocab).predict([image])[0].detections
    assert list(det.data["class_name"]) == labels
    np.testing.assert_allclose(det.xyxy, boxes, atol=4.0)
    # confidences come from the tokens' probabilities: high after training, but not a constant 1.0
    assert ((det.confidence > 0.5) & (det.confidence < 1.0)).all()


@pytest.mark.parametrize("name", ["llava", "idefics3", "qwen2_5_vl", "paligemma", "florence2"])
def test_label_scores_follow_what_the_model_says(tiny_vlm, name):
    """After teaching the answer 'circle', the label distribution puts its mass there — and 'circles' or
    'circle red' (sharing its first tokens) do not steal it: the end of turn is scored too."""
    torch.manual_seed(0)
    model = load_vlm(str(tiny_vlm(name)), device="cpu")
    image, _, _ = scene()
    vocab = Vocabulary.from_labels(["square", "circle", "circle red"])
    question = model.question(ModelTask.CLASSIFY, vocab)
    teach(model, [(image, question, "circle")])
    p = model.bind(ModelTask.CLASSIFY, vocab).predict([image])[0].probabilities
    assert p.sum() == pytest.approx(1.0)
    assert p.argmax() == 1 and p[1] > 0.9, p


def test_an_uncached_hub_id_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1"):
        load_vlm("google/owlv2-base-patch16-ensemble")
    assert time.perf_counter() - t0 < 1.0


def test_an_unreachable_hub_fails_fast_without_offline_mode(tmp_path, monkeypatch):
    from backend.dev.local_label_studio import free_port

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        resolve_source("IDEA-Research/grounding-dino-tiny")
    assert time.perf_counter() - t0 < 1.0


def test_unsupported_checkpoints_are_refused_with_the_replacement(tmp_path):
    remote = tmp_path / "Florence-2-base"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "florence2", "auto_map": {"AutoConfig": "x.Y"}}))
    with pytest.raises(ModelLoadError, match="florence-community/Florence-2-base"):
        load_vlm(str(remote))
    with pytest.raises(ModelLoadError, match="Qwen2.5-VL"):
        load_vlm("Vision-CAIR/MiniGPT-v2")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="not supported"):
        load_vlm(str(tmp_path / "bert"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_vlm(str(tmp_path))


@pytest.mark.parametrize("name", ["idefics3", "qwen2_5_vl", "qwen3_vl", "llava"])
def test_one_prefill_scores_every_label_exactly_like_k_full_sequences(tiny_vlm, name):
    """The KV-cache path (image and question run once) gives the same log-likelihoods as K full passes;
    where the tokenizer merges across the prompt/answer boundary (this tiny LLaVA vocab has 'T:▁'), it
    declines and the plain path answers."""
    model = load_vlm(str(tiny_vlm(name)), device="cpu")
    image, _, _ = scene()
    vocab = Vocabulary.from_labels(["square", "circle", "circle red", "a big triangle"])
    question = model.question(ModelTask.CLASSIFY, vocab)
    with torch.inference_mode():
        full = model.label_logprobs(image, vocab.prompts, question, reuse_prompt=False)
        cached = model._logprobs_from_cache(image, vocab.prompts, question)
    if name == "llava":
        assert cached is None
    else:
        np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["grounding_dino", "owlv2"])
def test_a_detector_that_finds_nothing_returns_empty_detections(tiny_vlm, name, caplog):
    """Grounding DINO returns text_labels [''] beside zero boxes when nothing passes the threshold."""
    with caplog.at_level("INFO", logger="tandem.vlm"):
        model = load_vlm(str(tiny_vlm(name)), device="cpu", threshold=1.01)
    sdpa = [r.getMessage() for r in caplog.records if "SDPA" in r.getMessage()]
    if name == "grounding_dino":  # no SDPA kernel for its deformable attention: one short line, not a paragraph
        assert len(sdpa) == 1 and sdpa[0].endswith("GroundingDinoForObjectDetection has no SDPA attention; "
                                                   "loading it with its own"), sdpa
        assert "github.com" not in sdpa[0]
    else:
        assert sdpa == []
    image, _, _ = scene()
    (out,) = model.bind(ModelTask.DETECT, Vocabulary.from_labels(LABELS)).predict([image])
    assert len(out.detections) == 0 and list(out.detections.data["class_name"]) == []


def test_a_large_photo_goes_to_a_vlm_shrunk_and_its_boxes_come_back_in_whole_pixels(tiny_vlm):
    """OWLv2's processor blurs whatever it is given in float: a 72 MP photo grew a server past 13 GB. Images over
    MAX_INPUT_SIDE go in shrunk (as the model would see them anyway) and boxes are mapped back."""
    from PIL import Image

    from backend.models.base import ModelTask, Vocabulary
    from backend.models.vlm.base import MAX_INPUT_SIDE, bounded_input
    from backend.models.vlm.loader import load_vlm

    small, scale = bounded_input(Image.new("RGB", (640, 480)))
    assert small.size == (640, 480) and scale == (1.0, 1.0)
    small, scale = bounded_input(Image.new("RGB", (9000, 8000)))
    assert max(small.size) == MAX_INPUT_SIDE and small.size == (2048, 1820)
    assert scale == (9000 / 2048, 8000 / 1820)

    torch.manual_seed(0)
    model = load_vlm(str(tiny_vlm("paligemma")), device="cpu", max_new_tokens=96)
    image, boxes, labels = scene()
    vocab = Vocabulary.from_labels(["square", "circle"])
    teach(model, [(image, model.question(ModelTask.DETECT, vocab), model.grounding_answer(image, boxes, labels))])
    seen, inner = [], model._predict

    def watched(images, task, vocabulary):  # the family's own code, with the sizes it was handed noted
        seen.extend(im.size for im in images)
        return inner(images, task, vocabulary)

    model._predict = watched
    big = image.resize((3200, 2400), Image.Resampling.NEAREST)  # the taught scene as a 7.7 MP photo
    det = model.bind(ModelTask.DETECT, vocab).predict([big])[0].detections
    assert seen == [(2048, 1536)]
    assert list(det.data["class_name"]) == labels
    np.testing.assert_allclose(det.xyxy, np.array(boxes) * 10, atol=40.0)  # the whole photo's pixels
