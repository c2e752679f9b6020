"""Batched VLM inference answers exactly as one image at a time, in fewer forward passes.

Every family runs as its tiny checkpoint through Tandem's loader on CPU, in fp32, on images of mixed sizes
(so Qwen's prefixes differ in length and are left-padded, and Grounding DINO's processor would pad).
Forward passes are counted with a hook on the real model: the claim "as few passes as memory allows" is
checked, not assumed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend.models.base import ModelTask
from backend.models.vlm.base import Vocabulary
from backend.models.vlm.batching import CPU_IMAGES, CPU_SEQUENCES, fit, same_size_groups, text_cost
from backend.models.vlm.loader import load_vlm
from backend.models.vlm.zero_shot import CPU_CLASSIFIER_IMAGES, CPU_DETECTOR_IMAGES
from tests.tiny_vlms import teach

GENERATIVE = ["llava", "idefics3", "qwen2_5_vl", "qwen3_vl", "paligemma", "florence2"]
# one pass for the B prefixes (decoder-only: KV cache; Florence-2: encoder states), one for the B x K answers;
# the tiny LLaVA's vocab merges across the answer boundary, PaliGemma's prefix attends both ways: B x K sequences
SHARED_PREFIX = {"idefics3", "qwen2_5_vl", "qwen3_vl", "florence2"}
GROUNDING = ["qwen2_5_vl", "qwen3_vl", "paligemma", "florence2"]
ZERO_SHOT = ["owlv2", "grounding_dino", "clip", "siglip", "siglip2"]
LABELS = ["square", "circle", "circle red", "a big triangle"]


def images() -> list[Image.Image]:
    out = []
    for i, size in enumerate([(320, 240), (120, 260), (224, 224), (320, 240), (300, 200)]):
        image = Image.new("RGB", size, (255, 255, 255))
        draw = ImageDraw.Draw(image)
        draw.rectangle([10 + 7 * i, 12, 80 + 5 * i, 90], fill=(200, 40 * i, 0))
        draw.ellipse([60, 100 - 10 * i, 110, 160 - 10 * i], fill=(0, 20 * i, 200))
        out.append(image)
    return out


class Passes:
    """Counts forward calls of the real model (a forward hook: nothing is replaced)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *_) -> None:
        self.count += 1

    def close(self) -> None:
        self._handle.remove()


@pytest.mark.parametrize("name", GENERATIVE)
def test_batched_classification_equals_one_image_at_a_time(tiny_vlm, name):
    model = load_vlm(str(tiny_vlm(name)), device="cpu")
    bound = model.bind(ModelTask.CLASSIFY, Vocabulary.from_labels(LABELS))
    pics = images()[:4]  # sizes A, B, C, A
    question = model.question(ModelTask.CLASSIFY, bound.vocabulary)
    with torch.inference_mode():  # what predict([image]) computes, one image at a time
        lp_alone = np.concatenate([model.batch_logprobs([im], bound.vocabulary.prompts, question) for im in pics])
        lp_together = model.batch_logprobs(pics, bound.vocabulary.prompts, question)
    alone = np.exp(lp_alone - lp_alone.max(1, keepdims=True))
    alone /= alone.sum(1, keepdims=True)
    passes = Passes(model.model)
    together = np.array([o.probabilities for o in bound.predict(pics)])
    passes.close()
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-4)
    np.testing.assert_allclose(together.sum(1), 1.0)
    # random weights saturate the softmax: the log-likelihoods say more, and they agree as closely
    np.testing.assert_allclose(lp_together, lp_alone, rtol=0, atol=1e-4)
    # no row was reused for another image: the images' answers differ by more than batching changes them
    assert np.abs(lp_together[0] - lp_together[1]).max() > 10 * np.abs(lp_together - lp_alone).max()
    if name in SHARED_PREFIX:  # every prefix in one pass, every candidate of every image in a second
        assert passes.count == 2
    else:  # B x K teacher-forced sequences, CPU_SEQUENCES per pass
        assert passes.count == -(-len(pics) * len(LABELS) // CPU_SEQUENCES)


@pytest.mark.parametrize("name", sorted(SHARED_PREFIX))
def test_a_small_image_budget_splits_the_batch_without_changing_answers(tiny_vlm, name):
    model = load_vlm(str(tiny_vlm(name)), device="cpu", max_images=2)
    bound = model.bind(ModelTask.CLASSIFY, Vocabulary.from_labels(LABELS))
    pics = images()
    passes = Passes(model.model)
    split = [o.probabilities for o in bound.predict(pics)]
    passes.close()
    assert passes.count == 2 * 3  # 5 images at 2 per pass: 3 prefills and 3 scoring passes
    model.max_images = None
    np.testing.assert_allclose(split, [o.probabilities for o in bound.predict(pics)], rtol=0, atol=1e-4)


def _scene(size, boxes, colours) -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for (x0, y0, x1, y1), colour in zip(boxes, colours, strict=True):
        draw.rectangle([x0, y0, x1, y1], fill=colour)
    return image


@pytest.mark.parametrize("name", GROUNDING)
def test_batched_grounding_parses_each_image_against_its_own_size(tiny_vlm, name):
    """Two images of different sizes, each taught its own boxes: one `generate` call for both returns each
    image's boxes (in its own pixels), the same boxes and confidences as one image at a time."""
    torch.manual_seed(0)
    model = load_vlm(str(tiny_vlm(name)), device="cpu", max_new_tokens=96)
    vocab = Vocabulary.from_labels(["square", "circle"])
    a_boxes, b_boxes = [(40, 30, 140, 120), (180, 100, 280, 200)], [(20, 150, 120, 260)]
    a = _scene((320, 240), a_boxes, [(200, 0, 0), (0, 0, 200)])
    b = _scene((200, 300), b_boxes, [(0, 0, 200)])
    question = model.question(ModelTask.DETECT, vocab)
    teach(model, [(a, question, model.grounding_answer(a, a_boxes, ["square", "circle"])),
                  (b, question, model.grounding_answer(b, b_boxes, ["circle"]))], steps=400)
    bound = model.bind(ModelTask.DETECT, vocab)
    alone_a, alone_b = (bound.predict([im])[0].detections for im in (a, b))
    alone = [alone_a, alone_b, alone_a]

    calls = []
    generate = model.model.generate
    model.model.generate = lambda *args, **kw: calls.append(kw["input_ids"].shape[0]) or generate(*args, **kw)
    try:
        together = [o.detections for o in bound.predict([a, b, a])]
    finally:
        del model.model.generate
    assert calls == [3]  # one generate call for the three images
    for one, batched in zip(alone, together, strict=True):
        assert list(batched.data["class_name"]) == list(one.data["class_name"])
        np.testing.assert_allclose(batched.xyxy, one.xyxy, atol=1e-3)
        np.testing.assert_allclose(batched.confidence, one.confidence, atol=1e-4)
    assert list(together[0].data["class_name"]) == ["square", "circle"]
    assert list(together[1].data["class_name"]) == ["circle"]
    np.testing.assert_allclose(together[0].xyxy, a_boxes, atol=4.0)
    np.testing.assert_allclose(together[1].xyxy, b_boxes, atol=4.0)


@pytest.mark.parametrize("name", ZERO_SHOT)
def test_zero_shot_batches_equal_one_image_at_a_time(tiny_vlm, name):
    model = load_vlm(str(tiny_vlm(name)), device="cpu", **({"threshold": 0.0} if name == "owlv2" else {}))
    (task,) = model.tasks
    bound = model.bind(task, Vocabulary.from_labels(["square", "circle", "triangle"]))
    pics = images()[:4]  # sizes A, B, C, A
    model.batch_size = 1
    alone = bound.predict(pics)
    model.batch_size = None  # the default: CPU_*_IMAGES per pass on a CPU
    passes = Passes(model.model)
    together = bound.predict(pics)
    passes.close()
    for one, batched in zip(alone, together, strict=True):
        if task is ModelTask.CLASSIFY:
            np.testing.assert_allclose(batched.probabilities, one.probabilities, rtol=0, atol=1e-5)
        else:
            assert len(one.detections) > 0
            assert list(batched.detections.data["class_name"]) == list(one.detections.data["class_name"])
            np.testing.assert_allclose(batched.detections.xyxy, one.detections.xyxy, atol=1e-3)
            np.testing.assert_allclose(batched.detections.confidence, one.detections.confidence, atol=1e-5)
    if name == "grounding_dino":  # its processor pads a batch to the largest image: one pass per size
        assert passes.count == 3
    else:
        assert passes.count == 1 and len(pics) <= min(CPU_DETECTOR_IMAGES, CPU_CLASSIFIER_IMAGES)


def test_batch_sizes_follow_free_gpu_memory_and_are_fixed_on_a_cpu(tiny_vlm):
    """The CUDA arithmetic runs here with the free-memory reading given; the reading itself needs a GPU."""
    assert fit("cpu", item_bytes=10**12, cpu_default=CPU_IMAGES) == CPU_IMAGES
    assert fit("cuda:0", item_bytes=10**9, cpu_default=8, free=10 * 10**9) == 5  # half the free memory planned
    assert fit("cuda:0", item_bytes=10**12, cpu_default=8, free=10**9) == 1  # never below one
    assert fit("cuda:0", item_bytes=1, cpu_default=8, free=10**12, cap=64) == 64

    model = load_vlm(str(tiny_vlm("qwen2_5_vl")), device="cpu")
    text = model.model.config.text_config
    cost = text_cost(model.model)
    head_dim = text.hidden_size // text.num_attention_heads
    assert cost.kv_per_token == 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 4  # fp32
    assert cost.vocab == text.vocab_size
    assert cost.sequence_bytes(100, 5) == 100 * (cost.kv_per_token + cost.activation_per_token) + 5 * cost.vocab * 4
    assert model._images_per_pass(images()[0], 4, 3) == CPU_IMAGES
    model.max_images = 3
    assert model._images_per_pass(images()[0], 4, 3) == 3


def test_same_size_groups_keep_order():
    assert same_size_groups([(2, 1), (3, 3), (2, 1), (5, 5), (3, 3)]) == [[0, 2], [1, 4], [3]]
