"""LoRA fine-tuning of a tiny generative VLM on Label-Studio-shaped annotations: the loss goes down, only
the language model is adapted, and the saved adapter reloads through `load_vlm` to the same outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend.datasets.shapes import generate_samples
from backend.media.fetch import MediaFetcher, MediaSettings
from backend.models.base import ModelTask
from backend.models.vlm.base import Vocabulary
from backend.models.vlm.loader import load_vlm
from backend.training.export import is_validation
from backend.training.vlm_examples import examples_from_tasks
from backend.training.vlm_lora import lora_fine_tune

CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="square"/><Label value="circle"/><Label value="triangle"/></RectangleLabels>
<Choices name="main" toName="image"><Choice value="square"/><Choice value="circle"/><Choice value="triangle"/></Choices></View>"""


def annotated_tasks(root, n=8, seed=3):
    tasks = []
    for i, (image, sample) in enumerate(generate_samples(n, seed=seed), start=1):
        image.save(root / f"{sample.name}.png")
        result = [{"from_name": "box", "to_name": "image", "type": "rectanglelabels",
                   "value": {"x": o.box[0] / sample.width * 100, "y": o.box[1] / sample.height * 100,
                             "width": (o.box[2] - o.box[0]) / sample.width * 100,
                             "height": (o.box[3] - o.box[1]) / sample.height * 100, "rectanglelabels": [o.label]}}
                  for o in sample.objects]
        result.append({"from_name": "main", "to_name": "image", "type": "choices",
                       "value": {"choices": [sample.objects[0].label]}})
        tasks.append({"id": i, "data": {"image": f"/data/local-files/?d={sample.name}.png"},
                      "annotations": [{"id": 100 + i, "result": result, "was_cancelled": False}]})
    return tasks


@pytest.mark.parametrize("name", ["qwen2_5_vl", "florence2"])
def test_lora_lowers_the_loss_adapts_only_the_language_model_and_reloads(tiny_vlm, tmp_path, name):
    torch.manual_seed(0)
    (tmp_path / "media").mkdir()
    tasks = annotated_tasks(tmp_path / "media")
    fetcher = MediaFetcher(MediaSettings(local_files_root=tmp_path / "media"))
    base = str(tiny_vlm(name))
    vlm = load_vlm(base, device="cpu")
    data = examples_from_tasks(tasks, CONFIG, project_id=5, fetcher=fetcher, vlm=vlm, val_percent=50)
    n_val = sum(is_validation(5, t["id"], 50) for t in tasks)
    assert len(data.val) == 2 * n_val and len(data.train) == 2 * (len(tasks) - n_val)  # a box and a choice each
    questions = {q for _, q, _ in data.train}
    assert len(questions) == 2  # one grounding question, one classification question

    logs = []
    # on random tiny weights, "validation" is the training data itself: the point is that training works.
    # A rank-8 adapter on a 32-wide model in front of a random output layer learns slowly: ~7% in 20 epochs.
    result = lora_fine_tune(vlm, data.train, data.train, tmp_path / "adapter", base_source=base,
                            params={"epochs": 20, "lr": 1e-2, "batch": 4, "lora_dropout": 0.0, "lora_r": 8,
                                    "lora_alpha": 16}, log=logs.append)
    assert result["val_loss_after"] < 0.97 * result["val_loss_before"]
    assert result["train_loss"][-1] < result["train_loss"][0]
    assert any("validation loss after" in line for line in logs)
    adapted = [n for n, _ in vlm.model.named_modules() if n.endswith("lora_A")]
    assert adapted and all(("language_model" in n) or ("text_model" in n) for n in adapted)
    assert not any("vision" in n or "visual" in n for n in adapted)
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "tandem_base.json"} <= set(files)
    assert json.loads((tmp_path / "adapter" / "tandem_base.json").read_text())["base"] == base

    image, question, answer = data.train[0]
    vlm.model.eval()
    with torch.no_grad():
        trained = vlm.model(**vlm._to_device(vlm.teacher_forced([(image, question, answer)]))).logits
    reloaded = load_vlm(str(tmp_path / "adapter"), device="cpu")
    assert reloaded.version.startswith("adapter-") and reloaded.version != load_vlm(base).version
    with torch.no_grad():
        again = reloaded.model(**reloaded._to_device(reloaded.teacher_forced([(image, question, answer)]))).logits
    np.testing.assert_allclose(again.numpy(), trained.numpy(), atol=1e-4)
    vocab = Vocabulary.from_labels(["square", "circle", "triangle"])
    assert reloaded.bind(ModelTask.CLASSIFY, vocab).predict([image])[0].probabilities.sum() == pytest.approx(1.0)
