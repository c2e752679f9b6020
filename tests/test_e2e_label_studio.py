"""A real Label Studio 1.23 (isolated install, started by the session fixture) drives Tandem end to end:
create a project, upload images, connect Tandem as its ML backend, "Retrieve predictions" through the Data
Manager actions API, and check what Label Studio stored against the generated ground truth."""

from __future__ import annotations

import time

import httpx
import pytest
from label_studio_sdk import LabelStudio

from backend.datasets.shapes import generate_samples
from backend.dev.local_label_studio import upload_images
from backend.media.fetch import MediaFetcher, MediaSettings
from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings
from tests.conftest import assert_matches_truth, region_boxes
from tests.harness import ServerThread, png_bytes
from tests.test_media import exif_rotated_jpeg_bytes
from tests.test_server import CHOICES, RECT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _tasks_by_name(client: LabelStudio, project: int) -> dict[str, dict]:
    out = {}
    for t in client.tasks.list(project=project, fields="all"):
        data = t.data
        url = data.get("image", "")
        out[url.rsplit("/", 1)[-1].split("-", 1)[-1]] = {"id": t.id, "data": data}
    return out


def _retrieve_predictions(client: LabelStudio, project: int) -> float:
    t0 = time.perf_counter()
    client.actions.create(id="retrieve_tasks_predictions", project=project, selected_items={"all": True, "excluded": []})
    return time.perf_counter() - t0


def _connect(client: LabelStudio, project: int, url: str, **kw):
    return client.ml.create(project=project, url=url, title="Tandem", is_interactive=False, **kw)


def test_rectangles_from_a_real_label_studio(label_studio, detect_adapter, tmp_path):
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem e2e detect", label_config=RECT)
    items = generate_samples(5, seed=2024)
    files = {f"{s.name}.png": png_bytes(img) for img, s in items}
    rotated_image, rotated_truth = items[0]
    files["rotated.jpg"] = exif_rotated_jpeg_bytes(rotated_image)
    upload_images(label_studio.url, label_studio.token, project.id, files)
    # a task whose image does not exist: it must get no prediction, and not spoil the others
    client.projects.import_tasks(id=project.id, request=[{"image": f"/data/upload/{project.id}/missing.png"}])

    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)
    app = create_app(settings, ModelHolder(detect_adapter))
    with ServerThread(app) as srv:
        backend = _connect(client, project.id, srv.url)
        assert backend.model_version == detect_adapter.version
        seconds = _retrieve_predictions(client, project.id)
        assert app.state.sync.wait_idle(60)

        tasks = _tasks_by_name(client, project.id)
        truth = {f"{s.name}.png": s for _, s in items} | {"rotated.jpg": rotated_truth}
        for name, sample in truth.items():
            preds = client.predictions.list(task=tasks[name]["id"])
            assert len(preds) == 1, name
            pred = preds[0]
            assert pred.model_version == detect_adapter.version
            assert 0 < pred.score <= 1
            xyxy, labels = region_boxes(pred.result, sample.width, sample.height)
            assert_matches_truth(xyxy, labels, sample)
            assert all(0 < r["score"] <= 1 for r in pred.result)
        assert client.predictions.list(task=tasks["missing.png"]["id"]) == []

        # Tandem set the project's model_version, so the Data Manager's "Prediction score" column works
        assert client.projects.get(id=project.id).model_version == detect_adapter.version
        listed = httpx.get(f"{label_studio.url}/api/tasks", params={"project": project.id, "fields": "all"},
                           headers={"Authorization": f"Token {label_studio.token}"}).json()["tasks"]
        scored = [t["predictions_score"] for t in listed if t["total_predictions"]]
        assert len(scored) == 6 and all(s is not None and 0 < s <= 1 for s in scored)

        versions = httpx.get(f"{label_studio.url}/api/ml/{backend.id}/versions",
                             headers={"Authorization": f"Token {label_studio.token}"}).json()
        assert detect_adapter.version in versions["versions"]
    print(f"\nRetrieve predictions for 7 tasks took {seconds:.2f} s")


def test_choices_from_a_real_label_studio(label_studio, classify_adapter, tmp_path):
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem e2e choices", label_config=CHOICES)
    items = generate_samples(9, seed=99, classification=True)
    upload_images(label_studio.url, label_studio.token, project.id, {f"{s.name}.png": png_bytes(img) for img, s in items})
    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)
    with ServerThread(create_app(settings, ModelHolder(classify_adapter))) as srv:
        _connect(client, project.id, srv.url)
        _retrieve_predictions(client, project.id)
    tasks = _tasks_by_name(client, project.id)
    correct = 0
    for _, sample in items:
        (pred,) = client.predictions.list(task=tasks[f"{sample.name}.png"]["id"])
        (region,) = pred.result
        assert region["from_name"] == "shape" and region["type"] == "choices"
        assert pred.model_version == classify_adapter.version and 0 < pred.score <= 1
        correct += region["value"]["choices"][0].lower() == sample.objects[0].label
    assert correct >= 8, f"{correct}/9"


def test_wrong_config_is_refused_at_connect_with_a_4xx(label_studio, detect_adapter, tmp_path):
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem e2e wrong config", label_config=CHOICES)
    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)
    with ServerThread(create_app(settings, ModelHolder(detect_adapter))) as srv:
        with pytest.raises(Exception) as info:
            _connect(client, project.id, srv.url)
    assert "422" in str(info.value)


def test_personal_access_token_downloads_uploads(label_studio):
    """Media auth with a PAT: exchanged at /api/token/refresh/ for a Bearer access token."""
    headers = {"Authorization": f"Token {label_studio.token}"}
    r = httpx.post(f"{label_studio.url}/api/token/", headers=headers)
    if r.status_code == 404:  # pragma: no cover - older LS
        pytest.skip("this Label Studio has no personal access tokens")
    r.raise_for_status()
    pat = r.json()["token"]
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem e2e pat", label_config=RECT)
    image, _ = generate_samples(1, seed=5)[0]
    upload_images(label_studio.url, label_studio.token, project.id, {"pat.png": png_bytes(image)})
    (task,) = client.tasks.list(project=project.id)
    url = task.data["image"]
    assert httpx.get(label_studio.url + url).status_code in (401, 403)  # uploads need credentials
    fetched = MediaFetcher(MediaSettings(label_studio_url=label_studio.url, api_key=pat)).load(url)
    assert fetched.size == image.size


def test_without_label_studio_url_media_comes_via_the_setup_hostname(label_studio, detect_adapter, tmp_path):
    """`tandem serve` with no environment: /setup's hostname and legacy token fetch the uploads."""
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem e2e no env", label_config=RECT)
    items = generate_samples(2, seed=4)
    upload_images(label_studio.url, label_studio.token, project.id, {f"{s.name}.png": png_bytes(img) for img, s in items})
    app = create_app(Settings(home=tmp_path / "home"), ModelHolder(detect_adapter), training=False)
    with ServerThread(app) as srv:
        _connect(client, project.id, srv.url)
        _retrieve_predictions(client, project.id)
    tasks = _tasks_by_name(client, project.id)
    for _, sample in items:
        (pred,) = client.predictions.list(task=tasks[f"{sample.name}.png"]["id"])
        xyxy, labels = region_boxes(pred.result, sample.width, sample.height)
        assert_matches_truth(xyxy, labels, sample)


def test_a_refused_model_version_is_one_line_once_without_the_session_cookie(label_studio, tmp_path, caplog):
    """Label Studio refuses a version no prediction carries: said once as a warning, later tries quietly."""
    import logging

    from backend.labelstudio.version_sync import SyncRequest, VersionSync
    from backend.registry import Registry

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem e2e version sync", label_config=RECT)
    sync = VersionSync(Registry(tmp_path / "tandem.db"), delays=())
    request = SyncRequest(project.id, "never-served-0000", label_studio.url, label_studio.token)
    with caplog.at_level(logging.INFO, logger="tandem.sync"):
        for _ in range(2):
            sync.schedule(request)
            assert sync.wait_idle(30)
    said = [r for r in caplog.records if "never-served-0000" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.INFO]
    text = said[0].getMessage()
    assert "Label Studio answered 400" in text and "\n" not in text
    assert "sessionid" not in text and "set-cookie" not in text.lower()
    sync.close()
