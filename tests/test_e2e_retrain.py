"""The whole loop on a real Label Studio: predictions -> annotations (Label Studio's own webhooks) ->
debounced trigger -> a real fine-tune in a separate process -> promotion on the frozen split -> hot swap
-> new predictions carry the new version. And a `kill -9` of a running job."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from label_studio_sdk import LabelStudio

from backend.datasets.shapes import generate_samples
from backend.dev.local_label_studio import upload_images
from backend.demo import ground_truth_result
from backend.models.starter import StarterRecipe, train_starter_model
from backend.models.yolo import YoloAdapter
from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.training.jobs import JobStatus
from backend.training.runner import wait
from tests.conftest import CACHE
from tests.harness import ServerThread, png_bytes
from tests.test_e2e_label_studio import _connect, _retrieve_predictions, _tasks_by_name
from tests.test_server import CHOICES, RECT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def weak_weights():
    """A real detector with a blind spot: it never saw a triangle, so corrections must improve it."""
    return train_starter_model(CACHE / "blind-home", "detect", StarterRecipe("detect", epochs=8,
                                                                           classes=("square", "circle")))


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_corrections_retrain_promote_and_serve(label_studio, weak_weights, classify_weights, tmp_path):
    """Two projects on one server, each bound to its own model: a retrain on the detection project promotes into
    that project only; the Choices project keeps its classifier and its version."""
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem e2e loop", label_config=RECT)
    items = generate_samples(44, seed=8080)
    upload_images(label_studio.url, label_studio.token, project.id, {f"{s.name}.png": png_bytes(img) for img, s in items})
    other = client.projects.create(title="tandem e2e loop, second project", label_config=CHOICES)
    upload_images(label_studio.url, label_studio.token, other.id,
                  {f"{s.name}.png": png_bytes(img) for img, s in generate_samples(4, seed=8081)})
    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url,
                        label_studio_api_key=label_studio.token, train_after=36, train_epochs=30, train_imgsz=160)
    weak = YoloAdapter(weak_weights, device="cpu")
    classifier = YoloAdapter(classify_weights, device="cpu")
    app = create_app(settings, ModelHolder(weak))  # the server's default: the weak detector
    with ServerThread(app) as srv:
        _connect(client, project.id, srv.url, extra_params={"model": str(weak_weights)})
        _connect(client, other.id, srv.url, extra_params={"model": str(classify_weights)})
        _retrieve_predictions(client, project.id)
        _retrieve_predictions(client, other.id)
        tasks = _tasks_by_name(client, project.id)
        assert all(p.model_version == weak.version for t in tasks.values()
                   for p in client.predictions.list(task=t["id"]))
        other_tasks = list(client.tasks.list(project=other.id))

        def other_versions() -> set[str]:
            return {p.model_version for t in other_tasks for p in client.predictions.list(task=t.id)}

        assert other_versions() == {classifier.version}

        # annotators correct 40 tasks; Label Studio itself posts ANNOTATION_CREATED to Tandem's /webhook
        for _, sample in items[:40]:
            client.annotations.create(id=tasks[f"{sample.name}.png"]["id"], result=ground_truth_result(sample))
        store = app.state.training.store
        jobs = _wait_for(lambda: store.list(project.id), 30, "a job triggered by webhooks")
        assert len(jobs) == 1 and "36 new corrections" in jobs[0].reason
        job = wait(store, jobs[0].id, timeout=900)
        log = httpx.get(f"{srv.url}/jobs/{job.id}/logs").text
        assert job.status is JobStatus.SUCCEEDED, f"{job.error}\n{log}"
        assert "Epoch" in log or "epoch" in log  # ultralytics' progress is streamed to the job log
        new, old = job.metrics["candidate"]["fitness"], job.metrics["serving"]["fitness"]
        assert job.promoted and new > old, (new, old)
        assert job.metrics["gate_metric"] == "map50_95"  # drawn corrections: not the serving model's own boxes
        assert len(store.list(project.id)) == 1  # 40 events, threshold 36: one job, no second

        health = f"{srv.url}/health?project={project.id}"
        _wait_for(lambda: httpx.get(health).json()["model_version"] == job.version, 60, "the hot swap")
        assert httpx.get(f"{srv.url}/health?project={other.id}").json()["model_version"] == classifier.version
        assert httpx.get(f"{srv.url}/health").json()["model_version"] == weak.version  # the default is untouched
        assert {weak.version, job.version} <= set(httpx.get(f"{srv.url}/versions").json()["versions"])

        _retrieve_predictions(client, project.id)  # a new version makes every task eligible again
        fresh = [p for _, s in items[40:] for p in client.predictions.list(task=tasks[f"{s.name}.png"]["id"])]
        assert {p.model_version for p in fresh} == {weak.version, job.version}
        assert app.state.sync.wait_idle(60)
        assert client.projects.get(id=project.id).model_version == job.version
        for task in other_tasks:  # the other project's predictions are asked again: still its own classifier
            client.predictions.delete(id=client.predictions.list(task=task.id)[0].id)
        _retrieve_predictions(client, other.id)
        assert other_versions() == {classifier.version}

        # a coalesced follow-up whose corrections the job before it already had: nothing new, no retrain
        follow_up = store.create(project.id, "yolo", "local", "coalesced: 3 new corrections", {"epochs": 30})
        app.state.training.runner.start(follow_up)
        skipped = wait(store, follow_up.id, timeout=300)
        log = httpx.get(f"{srv.url}/jobs/{follow_up.id}/logs").text
        assert skipped.status is JobStatus.SUCCEEDED and skipped.version is None, log
        assert f"nothing new since {job.version}" in log and "Epoch" not in log
        assert httpx.get(health).json()["model_version"] == job.version


def test_kill_9_of_a_running_job_fails_it_and_keeps_serving(label_studio, weak_weights, detect_weights, tmp_path):
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem e2e kill", label_config=RECT)
    items = generate_samples(12, seed=99)
    upload_images(label_studio.url, label_studio.token, project.id, {f"{s.name}.png": png_bytes(img) for img, s in items})
    tasks = _tasks_by_name(client, project.id)
    for _, sample in items:
        client.annotations.create(id=tasks[f"{sample.name}.png"]["id"], result=ground_truth_result(sample))
    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url,
                        label_studio_api_key=label_studio.token, train_after=1000)
    serving = YoloAdapter(detect_weights, device="cpu")
    app = create_app(settings, ModelHolder(serving))
    with ServerThread(app) as srv:
        job = httpx.post(f"{srv.url}/train", json={"project": project.id, "params": {"epochs": 500, "imgsz": 160}}).json()
        store = app.state.training.store
        _wait_for(lambda: "Epoch" in httpx.get(f"{srv.url}/jobs/{job['id']}/logs").text, 240, "training to start")
        running = store.get(job["id"])
        assert running.status is JobStatus.RUNNING
        os.kill(running.pid, signal.SIGKILL)
        failed = wait(store, job["id"], timeout=30)
        assert failed.status is JobStatus.FAILED and "signal 9" in failed.error
        health = httpx.get(f"{srv.url}/health").json()
        assert health["ready"] and health["model_version"] == serving.version
        r = httpx.post(f"{srv.url}/predict", json={"tasks": [{"id": 1, "data": tasks[f"{items[0][1].name}.png"]["data"]}],
                                                   "label_config": RECT}, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["model_version"] == serving.version


def test_a_retrain_that_cannot_start_says_why_in_one_line(label_studio, detect_weights, tmp_path):
    """No annotations, no such project, a wrong key: the job fails with Label Studio's reason, never its headers."""
    from backend.registry import Registry
    from backend.training.jobs import JobStore
    from backend.training.runner import LocalRunner, log_path

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    empty = client.projects.create(title="tandem e2e nothing annotated", label_config=RECT)
    upload_images(label_studio.url, label_studio.token, empty.id,
                  {f"{s.name}.png": png_bytes(img) for img, s in generate_samples(3, seed=5)})
    good = Settings(home=tmp_path / "home", label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)
    wrong_key = Settings(home=good.home, label_studio_url=label_studio.url, label_studio_api_key="not-a-token")
    Registry(good.database_url).record_served("start", "start", "detect", str(detect_weights))
    store = JobStore(good.database_url)
    choices = client.projects.create(title="tandem e2e wrong task", label_config=CHOICES)
    expected = {(empty.id, "good"): "0 usable annotated tasks (0 train, 0 validation)",
                (choices.id, "good"): f"the serving model start is a detect model, but project {choices.id}'s "
                                      "choices control 'shape' needs a classify model",  # before any download
                (99999, "good"): "Label Studio answered 404: No Project matches the given query. (check the project id)",
                (empty.id, "wrong"): "Label Studio answered 401"}
    for (project_id, key), message in expected.items():
        settings = good if key == "good" else wrong_key
        job = store.create(project_id, "yolo", "local", "test", {})
        LocalRunner(settings, store).start(job)
        failed = wait(store, job.id, timeout=120)
        assert failed.status is JobStatus.FAILED and message in failed.error, failed.error
        for leak in ("set-cookie", "sessionid", "headers:", "Traceback"):
            assert leak not in failed.error
        assert "Traceback" not in log_path(good.home, job.id).read_text()


def test_a_split_of_pre_annotations_accepted_unchanged_is_judged_on_map50(label_studio, detect_weights, tmp_path):
    """Annotators accept every pre-annotation unchanged, as Label Studio's editor saves them (origin "prediction"):
    the frozen split is the serving model's own boxes, to the pixel, through Label Studio and the export. The job
    says so and the gate compares mAP50, on which a right candidate is not beaten by pixel-exact copies."""
    from backend.labeling.config import parse_label_config
    from backend.training.evaluate import _label_space, copied_share, detections_on_val
    from backend.training.export import ExportedDataset, frozen_split
    from backend.training.worker import scoring_adapter

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem e2e accepted unchanged", label_config=RECT)
    items = generate_samples(20, seed=4242)
    upload_images(label_studio.url, label_studio.token, project.id, {f"{s.name}.png": png_bytes(img) for img, s in items})
    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url,
                        label_studio_api_key=label_studio.token, train_after=1000)
    app = create_app(settings, ModelHolder(YoloAdapter(detect_weights, device="cpu")))
    with ServerThread(app) as srv:
        _connect(client, project.id, srv.url)
        _retrieve_predictions(client, project.id)
        shown = {}
        for task in _tasks_by_name(client, project.id).values():
            shown[task["id"]] = client.predictions.list(task=task["id"])[0].result
            client.annotations.create(id=task["id"], result=[{**r, "origin": "prediction"} for r in shown[task["id"]]])
        job = httpx.post(f"{srv.url}/train", json={"project": project.id, "params": {"epochs": 2, "imgsz": 160}}).json()
        done = wait(app.state.training.store, job["id"], timeout=600)
        log = httpx.get(f"{srv.url}/jobs/{job['id']}/logs").text
    assert done.status is JobStatus.SUCCEEDED, f"{done.error}\n{log}"
    m = done.metrics
    assert m["gate_metric"] == "map50" and m["copied_share"] == 1.0 and m["unchanged_share"] == 1.0, m
    assert m["serving"]["map50_95"] > 0.95 and m["serving"]["fitness"] == m["serving"]["map50"]
    assert "100% of the frozen split's boxes are pre-annotations accepted unchanged (Label Studio marks them)" in log
    assert "the gate compares mAP50" in log
    assert "fitness (mAP50)" in log and "candidate − serving mAP50 " in log
    # the copies survive Label Studio and the export to IoU 0.999 (what COPY_IOU's margin is measured against)
    root = Path(m["dataset_root"])
    ds = ExportedDataset(root=root, task="detect", data="", train=m["train"], val=m["val"],
                         class_names=json.loads((root / "tandem_export.json").read_text())["classes"],
                         control=parse_label_config(RECT).controls[0])
    adapter = scoring_adapter(detect_weights, "cpu")
    preds, targets = detections_on_val(adapter, ds, _label_space(adapter, ds, None, False))
    frozen = frozen_split(project.id, shown)  # every box of the frozen split's tasks, each a copy
    assert sum(map(len, targets)) == sum(len(shown[t]) for t in frozen) > 0
    assert copied_share(preds, targets, iou=0.999) == 1.0
