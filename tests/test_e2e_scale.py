"""Label Studio sends every selected task in one /predict call and waits 100 s: 1,000 tasks must fit."""

from __future__ import annotations

import time

import httpx
import pytest
from label_studio_sdk import LabelStudio

from backend.datasets.shapes import generate_samples
from backend.labelstudio.local import upload_images
from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings
from tests.harness import ServerThread, png_bytes
from tests.test_server import RECT

# Measured here: 84 s of Label Studio's 100 s, most of it Label Studio serving 1,000 uploads and storing
# 1,000 predictions on 2 cores. Too close to the limit to gate every CI run on; run with `-m scale`.
pytestmark = [pytest.mark.e2e, pytest.mark.scale, pytest.mark.timeout(1200)]


def test_retrieve_predictions_for_1000_tasks_within_label_studios_100_s(label_studio, detect_adapter, tmp_path):
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem e2e 1000 tasks", label_config=RECT)
    items = generate_samples(1000, seed=1000, size=(320, 240))
    upload_images(label_studio.url, label_studio.token, project.id,
                  {f"{s.name}.png": png_bytes(img) for img, s in items})  # in requests of 100 files
    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url, label_studio_api_key=label_studio.token)
    with ServerThread(create_app(settings, ModelHolder(detect_adapter), training=False)) as srv:
        client.ml.create(project=project.id, url=srv.url, title="Tandem", is_interactive=False)
        t0 = time.perf_counter()
        client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                              selected_items={"all": True, "excluded": []},
                              request_options={"timeout_in_seconds": 300})
        seconds = time.perf_counter() - t0
    listed = httpx.get(f"{label_studio.url}/api/projects/{project.id}",
                       headers={"Authorization": f"Token {label_studio.token}"}).json()
    predicted = listed.get("total_predictions_number")
    print(f"\nRetrieve predictions for 1,000 tasks: {seconds:.1f} s, {predicted} predictions stored")
    assert predicted == 1000
    assert seconds < 100, f"{seconds:.0f} s: Label Studio would have timed out"
