"""Per-project models: bindings persist across restarts, the pool shares and evicts, and each project is
served by its own model with its own label map."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from backend.errors import ModelLoadError
from backend.models.yolo import YoloAdapter
from backend.server.app import create_app
from backend.server.pool import ModelPool, estimate_bytes
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.storage.predictions import PredictionRepo
from backend.storage.projects import ProjectRepo
from tests.harness import ServerThread
from tests.test_server import CHOICES, RECT, samples  # noqa: F401 - the module fixture


def _wait(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_pool_loads_each_spec_once_shares_it_and_evicts_the_least_recently_used(detect_weights, classify_weights):
    calls: list[str] = []
    gate = threading.Event()

    def load(spec: str):
        calls.append(spec)
        gate.wait(30)
        return YoloAdapter(spec, device="cpu")

    one = estimate_bytes(YoloAdapter(detect_weights, device="cpu"))
    assert one > 100_000  # a real parameter count, not a placeholder
    pool = ModelPool(load, budget_bytes=one + 1000)  # room for one of the two models, not both
    assert pool.ensure(str(detect_weights)) is None  # loading in the background: never blocks
    assert pool.ensure(str(detect_weights)) is None  # and not started twice
    gate.set()
    first = pool.get(str(detect_weights), timeout=60)
    assert pool.get(str(detect_weights), timeout=1) is first and calls == [str(detect_weights)]
    second = pool.get(str(classify_weights), timeout=60)
    assert second.task.value == "classify"
    assert set(pool.loaded()) == {str(classify_weights)}  # the least recently used went over the budget
    assert pool.used_bytes <= pool.budget_bytes


def test_a_failed_load_says_why_and_is_retried(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    pool = ModelPool(lambda spec: YoloAdapter(spec, device="cpu"), budget_bytes=10**9, retry_after_s=2.0)
    with pytest.raises(ModelLoadError, match="cannot load YOLO weights"):
        pool.get(str(broken), timeout=60)
    assert "cannot load YOLO weights" in pool.error(str(broken))
    # until the retry is due the error stands: a poll of /health must not restart the load and show "loading"
    assert pool.ensure(str(broken)) is None and not pool.is_loading(str(broken)) and pool.error(str(broken))
    time.sleep(2.1)
    assert pool.ensure(str(broken)) is None  # a new try is started, not the failure cached forever
    assert pool.is_loading(str(broken)) or "cannot load YOLO weights" in pool.error(str(broken))


def test_a_file_that_is_not_weights_is_an_error_once_not_loading_forever(tmp_path, caplog):
    """A path that exists but holds text is a one-line load error (ultralytics' TypeError once escaped as a
    crash); a loader that crashes the same way again logs one line, not another traceback."""
    text = tmp_path / "hostname"
    text.write_text("a-host\n")
    pool = ModelPool(lambda spec: YoloAdapter(spec, device="cpu"), budget_bytes=10**9, retry_after_s=60.0)
    with pytest.raises(ModelLoadError, match="it is not a supported model format") as caught:
        pool.get(str(text), timeout=60)
    assert str(text) in str(caught.value) and len(str(caught.value)) < 300
    assert not pool.is_loading(str(text)) and pool.error(str(text)) == str(caught.value)

    def crash(spec):
        raise RuntimeError(f"no such thing as {spec}")

    crashing = ModelPool(crash, budget_bytes=10**9, retry_after_s=0.0)
    with caplog.at_level("ERROR", logger="tandem.pool"):
        for _ in range(3):
            with pytest.raises(ModelLoadError, match="could not load x: RuntimeError: no such thing as x"):
                crashing.get("x", timeout=60)
    mine = [r for r in caplog.records if r.name == "tandem.pool" and " x" in r.getMessage()]
    assert len(mine) == 3 and [bool(r.exc_info) for r in mine] == [True, False, False]


def test_bindings_label_maps_and_prompts_survive_a_restart(tmp_path, samples, detect_adapter,  # noqa: F811
                                                          detect_weights, classify_weights):
    root, _, _ = samples
    settings = Settings(home=tmp_path / "home", local_files_root=root)
    renamed = RECT.replace("Square", "Box")
    extra = {"model": str(detect_weights), "label_map": {"square": "Box"}, "prompts": {"Box": "a square"},
             "pre_annotator": "cnn"}
    with ServerThread(create_app(settings, ModelHolder(YoloAdapter(classify_weights, device="cpu")),
                                 training=False)) as srv:
        r = httpx.post(f"{srv.url}/setup", json={"project": "41.17", "schema": renamed, "extra_params": extra})
        assert r.status_code == 200
        other = httpx.post(f"{srv.url}/setup", json={"project": "42.1", "schema": CHOICES})
        assert other.status_code == 200  # the default classifier serves the Choices project
    state = ProjectRepo(settings.database_url).get(41)
    assert (state.model, state.label_map, state.prompts, state.label_config) == (
        str(detect_weights), {"square": "Box"}, {"Box": "a square"}, renamed)

    # a new server on the same home: project 41 gets its bound detector and its label map, 42 the default
    with ServerThread(create_app(settings, ModelHolder(YoloAdapter(classify_weights, device="cpu")),
                                 training=False)) as srv:
        polled = []
        health = _wait(lambda: polled.append(h := httpx.get(f"{srv.url}/health", params={"project": 41}).json())
                       or (h["ready"] and h))
        for h in polled:  # not ready only while the bound detector loads, and then it says so
            assert h["ready"] or h["loading"] == [str(detect_weights)], h
        assert health["loading"] == [] and health["model_version"] == detect_adapter.version and health["model_task"] == "detect"
        task = {"id": 1, "data": {"image": f"/data/local-files/?d={samples[1][0].name}.png"}}
        r = httpx.post(f"{srv.url}/predict", json={"tasks": [task], "label_config": renamed, "project": "41.2"},
                       timeout=120)
        result = r.json()["results"][0]
        assert result["model_version"] == detect_adapter.version
        labels = {reg["value"]["rectanglelabels"][0] for reg in result["result"]}
        assert labels and "Square" not in labels and labels <= {"Box", "Circle", "Triangle"}
        default = httpx.get(f"{srv.url}/health", params={"project": 42}).json()
        assert default["model_task"] == "classify"
        metrics = httpx.get(f"{srv.url}/metrics").text  # which project's bound model is up, per project
        assert 'tandem_project_model_loaded{project="41",role="model"} 1.0' in metrics
        assert 'project="42"' not in metrics  # served by the defaults: tandem_model_ready covers it


def test_setup_records_a_bounded_number_of_projects(tmp_path, detect_adapter):
    """/setup names any project id: the server records up to TANDEM_MAX_PROJECTS of them, then refuses new ones."""
    settings = Settings(home=tmp_path / "home", max_projects=3)
    with ServerThread(create_app(settings, ModelHolder(detect_adapter), training=False)) as srv:
        for pid in (1, 2, 3):
            assert httpx.post(f"{srv.url}/setup", json={"project": f"{pid}.1", "schema": RECT}).status_code == 200
        refused = httpx.post(f"{srv.url}/setup", json={"project": "4.1", "schema": RECT})
        assert refused.status_code == 422 and "TANDEM_MAX_PROJECTS" in refused.text
        assert httpx.post(f"{srv.url}/setup", json={"project": "2.9", "schema": RECT}).status_code == 200  # known
        # /predict names any id too, and would record what served it and store its predictions
        task = {"id": 1, "data": {"image": "/data/local-files/?d=none.png"}}
        refused = httpx.post(f"{srv.url}/predict", json={"tasks": [task], "label_config": RECT, "project": "5.1"})
        assert refused.status_code == 422 and "TANDEM_MAX_PROJECTS" in refused.text and "never connected" in refused.text
        known = httpx.post(f"{srv.url}/predict", json={"tasks": [task], "label_config": RECT, "project": "3.1"},
                           timeout=60)
        assert known.status_code == 200 and "error" in known.json()["results"][0]  # predicted: the image is missing
    assert ProjectRepo(settings.database_url).count() == 3
    assert PredictionRepo(settings.database_url).count(5) == 0


def test_a_project_whose_bound_model_no_longer_loads_is_served_by_the_default_after_a_restart(
        tmp_path, samples, detect_adapter, detect_weights, caplog):  # noqa: F811
    """Its weights truncated (a full disk, a bad copy) and the server restarted: no last good model of the
    project is in memory, so the server's default serves it, said once, with the fix; /health?project= names
    the error. Before, every /predict of the project was a 503 while plain /health said ready."""
    import shutil

    root, _, _ = samples
    damaged = tmp_path / "p1-job1.pt"
    shutil.copyfile(detect_weights, damaged)
    settings = Settings(home=tmp_path / "home", local_files_root=root)
    ProjectRepo(settings.database_url).update(51, model=str(damaged), label_config=RECT)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    task = {"id": 1, "data": {"image": f"/data/local-files/?d={samples[1][0].name}.png"}}
    with ServerThread(create_app(settings, ModelHolder(detect_adapter), training=False)) as srv, \
            caplog.at_level("WARNING", logger="tandem.projects"):
        for _ in range(3):
            r = httpx.post(f"{srv.url}/predict", json={"tasks": [task], "label_config": RECT, "project": "51.1"},
                           timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["results"][0]["model_version"] == detect_adapter.version
            assert r.json()["results"][0]["result"]
        health = httpx.get(f"{srv.url}/health", params={"project": 51}).json()
        assert health["ready"] and health["model_version"] == detect_adapter.version
        assert "cannot load YOLO weights" in health["error"] and str(damaged) in health["error"]
    said = [r.getMessage() for r in caplog.records if "serves it until it does" in r.getMessage()]
    assert len(said) == 1 and str(damaged) in said[0] and "tandem models rollback --project 51" in said[0], said
