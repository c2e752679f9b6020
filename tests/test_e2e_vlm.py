"""A real Label Studio project receives VLM pre-annotations from Tandem, with the CNN's opinion kept beside.

The VLM is a tiny PaliGemma built here and taught, in a few seconds, to ground the shapes of the two
uploaded images, so what Label Studio stores can be checked against the generated ground truth.
"""

from __future__ import annotations

import time

import pytest
import torch
from label_studio_sdk import LabelStudio

from backend.datasets.shapes import generate_samples
from backend.dev.local_label_studio import upload_images
from backend.models.base import ModelTask
from backend.models.vlm.base import Vocabulary
from backend.models.vlm.loader import load_vlm
from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings
from tests.conftest import assert_matches_truth, region_boxes
from tests.harness import ServerThread, png_bytes
from tests.test_e2e_label_studio import _connect, _retrieve_predictions, _tasks_by_name
from tests.test_server import RECT
from tests.tiny_vlms import teach

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_label_studio_receives_vlm_predictions(label_studio, detect_adapter, tiny_vlm, tmp_path):
    items = generate_samples(2, seed=31)
    torch.manual_seed(0)
    student = load_vlm(str(tiny_vlm("paligemma")), device="cpu")
    vocab = Vocabulary.from_labels(["Square", "Circle", "Triangle"])
    question = student.question(ModelTask.DETECT, vocab)
    examples = [(img, question, student.grounding_answer(img, [o.box for o in s.objects],
                                                         [o.label.capitalize() for o in s.objects]))
                for img, s in items]
    _, loss = teach(student, examples, steps=400)
    assert loss < 0.05
    taught = tmp_path / "paligemma-shapes"
    student.model.save_pretrained(taught)
    student.processor.save_pretrained(taught)
    vlm = load_vlm(str(taught), device="cpu", max_new_tokens=64)

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem e2e vlm", label_config=RECT)
    upload_images(label_studio.url, label_studio.token, project.id, {f"{s.name}.png": png_bytes(img) for img, s in items})
    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url,
                        label_studio_api_key=label_studio.token, pre_annotator="vlm")
    app = create_app(settings, ModelHolder(detect_adapter), training=False, vlm=ModelHolder(vlm))
    with ServerThread(app) as srv:
        backend = _connect(client, project.id, srv.url)
        assert backend.model_version == vlm.version
        _retrieve_predictions(client, project.id)
        assert app.state.deferred.wait_idle(120)
        kept = app.state.store.for_project(project.id, role="second-opinion")
    tasks = _tasks_by_name(client, project.id)
    for _, sample in items:
        (pred,) = client.predictions.list(task=tasks[f"{sample.name}.png"]["id"])
        assert pred.model_version == vlm.version
        xyxy, labels = region_boxes(pred.result, sample.width, sample.height)
        assert_matches_truth(xyxy, labels, sample)
        assert all(0 < r["score"] < 1 for r in pred.result)  # token-probability confidences, not a constant
    assert sorted(p.task_id for p in kept) == sorted(t["id"] for t in tasks.values())
    assert {p.model_version for p in kept} == {detect_adapter.version}


def test_vlm_lora_job_from_label_studio_annotations_is_promoted_and_served(label_studio, detect_adapter, tiny_vlm,
                                                                          tmp_path):
    """Annotations in Label Studio -> POST /train model=vlm -> a LoRA job in its own process -> a new VLM
    version registered with its frozen-split loss -> the server swaps its VLM to it."""
    import httpx

    from backend.demo import ground_truth_result
    from backend.training.jobs import JobStatus
    from backend.training.runner import wait

    items = generate_samples(8, seed=77)
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem e2e vlm lora", label_config=RECT)
    upload_images(label_studio.url, label_studio.token, project.id, {f"{s.name}.png": png_bytes(img) for img, s in items})
    tasks = _tasks_by_name(client, project.id)
    for _, sample in items:
        client.annotations.create(id=tasks[f"{sample.name}.png"]["id"], result=ground_truth_result(sample))

    base = tiny_vlm("qwen2_5_vl")
    vlm = load_vlm(str(base), device="cpu")
    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url,
                        label_studio_api_key=label_studio.token, vlm=str(base), train_after=1000)
    app = create_app(settings, ModelHolder(detect_adapter), vlm=ModelHolder(vlm))
    with ServerThread(app) as srv:
        job = httpx.post(f"{srv.url}/train", json={"project": project.id, "model": "vlm",
                                                    "params": {"epochs": 6, "lr": 1e-2, "val_percent": 30}}).json()
        done = wait(app.state.training.store, job["id"], timeout=600)
        logs = httpx.get(f"{srv.url}/jobs/{job['id']}/logs").text
        assert done.status is JobStatus.SUCCEEDED, logs
        assert "LoRA r=16" in logs and "validation loss after" in logs
        version = app.state.registry.get(done.version)
        assert version.task == "vlm:classify+detect" and version.parent == vlm.version
        assert version.metrics["candidate"]["val_loss"] < version.metrics["serving"]["val_loss"]
        assert version.status == "promoted"
        deadline = time.monotonic() + 60
        # promoted into this project's binding (the server-wide default is untouched): ask about the project
        while httpx.get(f"{srv.url}/health", params={"project": project.id}).json()["second_opinion"] != done.version:
            assert time.monotonic() < deadline, "the server did not swap to the new VLM version"
            time.sleep(0.5)
        assert app.state.holder.adapter.version == detect_adapter.version  # the CNN is untouched
