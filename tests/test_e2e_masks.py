"""Masks on a real Label Studio: a BrushLabels project stores SAM 3's mask pre-annotations (read back through
the API and decoded), and a PolygonLabels project gets a review queue ranked by the mask disagreement of the
starter YOLO-seg model and the tiny SAM 3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import decode_rle

from active_learning.masks import score_masks
from active_learning.pipeline import run_selection, write_queue
from active_learning.queue import LabelStudioQueue
from active_learning.scoring import SELECT_AGGREGATE, SharedIds
from active_learning.selection import SelectionConfig, Strategy
from backend.datasets.shapes import generate_samples
from backend.dev.local_label_studio import upload_images
from backend.media.fetch import MediaFetcher, MediaSettings
from backend.models.base import ModelTask, Vocabulary
from backend.models.vlm.loader import load_vlm
from backend.predict import plan_for
from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings
from tests.harness import ServerThread, png_bytes
from tests.test_e2e_label_studio import _connect, _retrieve_predictions, _tasks_by_name
from tests.tiny_sam3 import scene, teach, tiny_sam3

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900), pytest.mark.filterwarnings("ignore::UserWarning")]

BRUSH = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Square"/><Label value="Circle"/></BrushLabels></View>"""
POLY = """<View><Image name="image" value="$image"/>
<PolygonLabels name="outline" toName="image"><Label value="Square"/><Label value="Circle"/><Label value="Triangle"/>
</PolygonLabels></View>"""


def test_a_brush_project_stores_sam3_masks(label_studio, segment_adapter, tmp_path):
    """SAM 3 (taught on the scene in seconds) pre-annotates; Label Studio stores its RLE masks, which decode to
    exactly the masks it predicted, the top one on the square."""
    torch.manual_seed(0)
    sam = load_vlm(str(tiny_sam3(tmp_path)), device="cpu")
    image, truth = scene()
    teach(sam, image, truth, present="square", absent="circle")
    direct = sam.predict([image], _request(["Square", "Circle"]))[0].detections

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem e2e brush", label_config=BRUSH)
    upload_images(label_studio.url, label_studio.token, project.id, {"scene.png": png_bytes(image)})
    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url,
                        label_studio_api_key=label_studio.token, pre_annotator="vlm")
    app = create_app(settings, ModelHolder(segment_adapter), training=False, vlm=ModelHolder(sam))
    with ServerThread(app) as srv:
        assert _connect(client, project.id, srv.url).model_version == sam.version
        _retrieve_predictions(client, project.id)
        assert app.state.deferred.wait_idle(120)
    (task,) = _tasks_by_name(client, project.id).values()
    (pred,) = client.predictions.list(task=task["id"])
    assert pred.model_version == sam.version
    regions = pred.result
    assert regions and {r["type"] for r in regions} == {"brushlabels"}
    assert len(regions) == len(direct)
    w, h = image.size
    for region, mask, name, score in zip(regions, direct.mask, direct.data["class_name"], direct.confidence,
                                         strict=True):
        stored = decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 127  # the SDK's decoder
        assert np.array_equal(stored, mask)
        assert region["value"]["brushlabels"] == [name] and region["score"] == pytest.approx(float(score), abs=1e-6)
    top = decode_rle(regions[0]["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 127
    assert regions[0]["value"]["brushlabels"] == ["Square"]
    assert (top & truth).sum() / (top | truth).sum() >= 0.8


def _request(labels):
    from backend.models.base import ModelRequest

    return ModelRequest(ModelTask.SEGMENT, Vocabulary.from_labels(labels))


def test_a_polygon_project_is_queued_by_mask_disagreement(label_studio, segment_adapter, tmp_path):
    """The YOLO-seg starter (outlines) is ranked against the tiny SAM 3 (masks): the queue's order is the mask
    disagreement computed from the two models' own predictions, and its reasons speak of masks."""
    sam = load_vlm(str(tiny_sam3(tmp_path)), device="cpu", threshold=0.0, max_det=2)
    items = generate_samples(6, seed=4242, size=(160, 120))
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem e2e mask queue", label_config=POLY)
    upload_images(label_studio.url, label_studio.token, project.id, {f"{s.name}.png": png_bytes(img) for img, s in items})
    queue = LabelStudioQueue(client, project.id)
    fetcher = MediaFetcher(MediaSettings(label_studio_url=label_studio.url, api_key=label_studio.token))
    tasks = queue.tasks()
    config = SelectionConfig(strategy=Strategy.DISAGREEMENT, budget=4, control_fraction=0.0, seed=1)
    bound = plan_for(sam, POLY).controls[0].adapter  # as `tandem select --second` binds a VLM to the config
    outcome, table, ids = run_selection(tasks, POLY, fetcher, segment_adapter, config, second=bound)
    assert len(outcome.entries) == 4 and table.disagreement is not None
    write_queue(queue, outcome, tasks, run="masks")

    # the same numbers from the two models' own predictions, scored by mask IoU
    by_name = {s.name: img for img, s in items}
    names = _tasks_by_name(client, project.id)
    id_to_image = {names[f"{n}.png"]["id"]: by_name[n] for n in by_name}
    images = [id_to_image[t] for t in ids]
    p1, p2 = plan_for(segment_adapter, POLY).controls[0], plan_for(sam, POLY).controls[0]
    cnn = p1.in_labels(p1.adapter.predict(images), "cnn", "pre-annotation")
    opinion = p2.in_labels(p2.adapter.predict(images), "sam", "second-opinion")
    labels = list(cnn[0].class_names)
    expected = score_masks(cnn, opinion, SharedIds(labels), ("CNN", "SAM 3"), aggregate=SELECT_AGGREGATE)
    np.testing.assert_allclose(table.disagreement, expected.disagreement, atol=1e-6)
    assert len(set(np.round(expected.disagreement, 6))) > 1  # the ranking has something to order
    picked = [e.task_id for e in sorted(outcome.entries, key=lambda e: e.rank)]
    order = [ids[i] for i in np.argsort(-expected.disagreement, kind="stable")]
    assert [expected.disagreement[ids.index(t)] for t in picked] == sorted(
        (expected.disagreement[ids.index(t)] for t in order[:4]), reverse=True)

    stored = {t["id"]: t["data"] for t in queue.tasks()}
    for e in outcome.entries:
        assert stored[e.task_id]["tandem_rank"] == e.rank and stored[e.task_id]["tandem_reason"] == e.reason
    assert any(" mask" in e.reason for e in outcome.entries)  # disagreement said of masks
