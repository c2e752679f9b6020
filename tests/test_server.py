"""The ML backend over real HTTP with real trained models; media from LOCAL_FILES_DOCUMENT_ROOT."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import supervision as sv

from backend.datasets.shapes import generate_samples
from backend.registry import Registry
from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.storage.projects import ProjectRepo
from backend.training.jobs import JobStatus
from tests.conftest import assert_matches_truth, region_boxes
from tests.harness import ServerThread
from tests.test_media import exif_rotated_jpeg_bytes

RECT = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="Square"/><Label value="Circle"/><Label value="Triangle"/></RectangleLabels></View>"""
POLY = """<View><Image name="image" value="$image"/><PolygonLabels name="poly" toName="image">
<Label value="square"/><Label value="circle"/><Label value="triangle"/></PolygonLabels>
<RectangleLabels name="box" toName="image"><Label value="square"/><Label value="circle"/><Label value="triangle"/></RectangleLabels></View>"""
CHOICES = """<View><Image name="image" value="$image"/><Choices name="shape" toName="image">
<Choice value="Square"/><Choice value="Circle"/><Choice value="Triangle"/></Choices></View>"""


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    items = generate_samples(6, seed=777)
    for image, sample in items:
        image.save(root / f"{sample.name}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return root, [s for _, s in items], items


def _serve(tmp_path, root, adapter, **env):
    settings = Settings(home=tmp_path / "home", local_files_root=root, **env)
    return ServerThread(create_app(settings, ModelHolder(adapter)))


def task(i, name):
    return {"id": i, "data": {"image": f"/data/local-files/?d={name}"}}


def test_health_setup_versions(tmp_path, samples, detect_adapter):
    root, _, _ = samples
    with _serve(tmp_path, root, detect_adapter) as srv:
        health = httpx.get(f"{srv.url}/health").json()
        assert health == {**health, "status": "UP", "ready": True, "device": "cpu", "model_task": "detect"}
        assert health["model_version"] == detect_adapter.version and health["engine"] == detect_adapter.engine
        for extra in ({"conf": 0.3}, None, [1, 2], "", '{"conf": 0.3}'):
            t0 = time.perf_counter()
            r = httpx.post(f"{srv.url}/setup", json={"project": "3.1700000000", "schema": RECT, "extra_params": extra})
            assert r.status_code == 200 and time.perf_counter() - t0 < 1.0
            assert r.json() == {"model_version": detect_adapter.version}
        r = httpx.post(f"{srv.url}/setup", json={"project": "3.1700000000", "schema": RECT, "extra_params": "x"})
        assert r.status_code == 422 and "not valid JSON" in r.text  # text that is not JSON is said, not ignored
        assert httpx.get(f"{srv.url}/versions").json() == {"versions": [detect_adapter.version]}
        registry = Registry(tmp_path / "home" / "tandem.sqlite3")  # a candidate the gate rejected was never served
        registry.add_candidate("p3-job1-rejected", "p3-job1", "detect", "x.pt", detect_adapter.version, "d", {})
        registry.set_status("p3-job1-rejected", "rejected")
        assert httpx.get(f"{srv.url}/versions").json() == {"versions": [detect_adapter.version]}
        # weights bound to one project (tandem models bind) serve it: listed
        registry.add_candidate("bound-cls", "bound-cls", "classify", "cls.pt", None, "", {}, project_id=2)
        registry.set_status("bound-cls", "bound")
        assert set(httpx.get(f"{srv.url}/versions").json()["versions"]) == {detect_adapter.version, "bound-cls"}
        # ?project=: that project's own and the server-wide ones, not another project's
        assert set(httpx.get(f"{srv.url}/versions", params={"project": 2}).json()["versions"]) == {
            detect_adapter.version, "bound-cls"}
        assert httpx.get(f"{srv.url}/versions", params={"project": 3}).json() == {"versions": [detect_adapter.version]}
        # a version the gate rejected, then promoted into project 3 by hand, serves it: listed for it alone
        ProjectRepo(tmp_path / "home" / "tandem.sqlite3").update(3, model="p3-job1-rejected")
        assert set(httpx.get(f"{srv.url}/versions", params={"project": 3}).json()["versions"]) == {
            detect_adapter.version, "p3-job1-rejected"}
        assert "p3-job1-rejected" not in httpx.get(f"{srv.url}/versions").json()["versions"]


def test_setup_records_what_serves_the_project(tmp_path, samples, detect_adapter, segment_adapter):
    """`tandem select` ranks with what served the project; a restart with another default second opinion is
    recorded at Label Studio's next /setup, not only at the next /predict (which may never come)."""
    root, _, _ = samples
    settings = Settings(home=tmp_path / "home", local_files_root=root)
    app = create_app(settings, ModelHolder(detect_adapter), training=False, vlm=ModelHolder(segment_adapter))
    with ServerThread(app) as srv:
        assert httpx.post(f"{srv.url}/setup", json={"project": "7.1", "schema": RECT}).status_code == 200
    state = ProjectRepo(settings.database_url).get(7)
    assert state.served_model == str(detect_adapter.path) and state.served_second_opinion == str(segment_adapter.path)

    # after a restart whose default second opinion is still loading, /setup keeps the recorded one (a select in
    # that window ranks with it), and records the new one once it has loaded
    import threading

    release = threading.Event()
    second = ModelHolder()
    loaded = second.load_in_background(lambda: release.wait(60) and detect_adapter)
    app = create_app(settings, ModelHolder(detect_adapter), training=False, vlm=second)
    with ServerThread(app) as srv:
        assert httpx.post(f"{srv.url}/setup", json={"project": "7", "schema": RECT}).status_code == 200
        assert ProjectRepo(settings.database_url).get(7).served_second_opinion == str(segment_adapter.path)
        release.set()
        loaded.join(60)
        assert httpx.post(f"{srv.url}/setup", json={"project": "7", "schema": RECT}).status_code == 200
    assert ProjectRepo(settings.database_url).get(7).served_second_opinion == str(detect_adapter.path)


def test_predict_boxes_match_ground_truth_and_bad_tasks_do_not_spoil_the_batch(tmp_path, samples, detect_adapter):
    root, truth, _ = samples
    tasks = [task(i, f"{s.name}.png") for i, s in enumerate(truth)]
    tasks.insert(2, task(100, "corrupt.png"))
    tasks.insert(4, task(101, "missing.png"))
    tasks.insert(5, {"id": 102, "data": {"other": "x"}})
    tasks.insert(6, {"id": 103, "data": {"image": 12345}})
    with _serve(tmp_path, root, detect_adapter) as srv:
        r = httpx.post(f"{srv.url}/predict", json={"tasks": tasks, "label_config": RECT, "project": "3.17"}, timeout=60)
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == len(tasks)
    by_id = dict(zip([t["id"] for t in tasks], results, strict=True))
    assert "result" not in by_id[100] and "corrupt or not an image" in by_id[100]["error"]
    assert "result" not in by_id[101] and "not found" in by_id[101]["error"]
    assert "result" not in by_id[102] and "the task's data has no 'image' field" in by_id[102]["error"]
    assert "result" not in by_id[103] and "data.image must be an image URL (text), not int" in by_id[103]["error"]
    for i, sample in enumerate(truth):
        item = by_id[i]
        assert item["model_version"] == detect_adapter.version
        assert 0 < item["score"] <= 1
        for region in item["result"]:
            assert region["from_name"] == "label" and region["to_name"] == "image"
            assert (region["original_width"], region["original_height"]) == (320, 240)
            assert region["value"]["rectanglelabels"][0] in {"Square", "Circle", "Triangle"}  # config's case
        xyxy, labels = region_boxes(item["result"], 320, 240)
        assert_matches_truth(xyxy, labels, sample)


def test_exif_rotated_image_boxes_land_where_the_annotator_sees_them(tmp_path, samples, detect_adapter):
    root, _, items = samples
    image, sample = items[0]
    (root / "rotated.jpg").write_bytes(exif_rotated_jpeg_bytes(image))
    with _serve(tmp_path, root, detect_adapter) as srv:
        item = httpx.post(f"{srv.url}/predict", json={"tasks": [task(1, "rotated.jpg")], "label_config": RECT},
                          timeout=60).json()["results"][0]
    assert {(r["original_width"], r["original_height"]) for r in item["result"]} == {(320, 240)}
    xyxy, labels = region_boxes(item["result"], 320, 240)
    assert_matches_truth(xyxy, labels, sample)


def test_segment_model_fills_polygons_and_boxes(tmp_path, samples, segment_adapter):
    root, truth, _ = samples
    with _serve(tmp_path, root, segment_adapter) as srv:
        results = httpx.post(f"{srv.url}/predict", json={"tasks": [task(i, f"{s.name}.png") for i, s in enumerate(truth)],
                                                          "label_config": POLY}, timeout=60).json()["results"]
    for item, sample in zip(results, truth, strict=True):
        polys = [r for r in item["result"] if r["type"] == "polygonlabels"]
        assert polys and all(r["from_name"] == "poly" and r["value"]["closed"] for r in polys)
        hull = np.array([[np.min([p[0] for p in r["value"]["points"]]) * 3.2, np.min([p[1] for p in r["value"]["points"]]) * 2.4,
                          np.max([p[0] for p in r["value"]["points"]]) * 3.2, np.max([p[1] for p in r["value"]["points"]]) * 2.4]
                         for r in polys])
        assert_matches_truth(hull, [r["value"]["polygonlabels"][0] for r in polys], sample)
        xyxy, labels = region_boxes(item["result"], 320, 240)
        assert_matches_truth(xyxy, labels, sample)


def test_classify_model_fills_choices(tmp_path, classify_adapter):
    from backend.datasets.shapes import generate_samples as gen

    root = tmp_path / "cls"
    root.mkdir()
    items = gen(12, seed=4242, classification=True)
    for image, sample in items:
        image.save(root / f"{sample.name}.png")
    with _serve(tmp_path, root, classify_adapter) as srv:
        results = httpx.post(f"{srv.url}/predict", json={"tasks": [task(i, f"{s.name}.png") for i, (_, s) in enumerate(items)],
                                                          "label_config": CHOICES}, timeout=60).json()["results"]
    correct = 0
    for item, (_, sample) in zip(results, items, strict=True):
        (region,) = item["result"]
        assert region["type"] == "choices" and region["from_name"] == "shape"
        assert 1 / 3 <= region["score"] <= 1 and item["score"] == region["score"]
        correct += region["value"]["choices"][0].lower() == sample.objects[0].label
    assert correct >= 10, f"{correct}/12 correct"


def test_unservable_configs_are_4xx_with_the_reason(tmp_path, samples, detect_adapter, classify_adapter):
    root, truth, _ = samples
    unknown_labels = RECT.replace("Square", "Car").replace("Circle", "Bus").replace("Triangle", "Person")
    with _serve(tmp_path, root, detect_adapter) as srv:
        r = httpx.post(f"{srv.url}/setup", json={"project": "1.1", "schema": unknown_labels})
        assert r.status_code == 422 and "square, circle, triangle" in r.json()["detail"]
        assert "--pre-annotator vlm" in r.json()["detail"]  # the other way out: a model that names any label
        # refused: Label Studio connects nothing, so the server records no project (it would warn about it later)
        assert ProjectRepo(Settings(home=tmp_path / "home").database_url).get(1) is None
        r = httpx.post(f"{srv.url}/predict", json={"tasks": [task(0, f"{truth[0].name}.png")], "label_config": CHOICES})
        assert r.status_code == 422 and "cannot fill choices 'shape'" in r.json()["detail"]
        no_control = '<View><Image name="i" value="$image"/><TextArea name="t" toName="i"/></View>'
        r = httpx.post(f"{srv.url}/setup", json={"schema": no_control})
        assert r.status_code == 422 and "no control Tandem can fill" in r.json()["detail"]
        # an explicit label map (as the backend's extra_params) makes the same config servable
        mapped = {"square": "Car", "circle": "Bus", "triangle": "Person"}
        r = httpx.post(f"{srv.url}/setup", json={"project": "1.1", "schema": unknown_labels, "extra_params": {"label_map": mapped}})
        assert r.status_code == 200
        r = httpx.post(f"{srv.url}/predict", json={"project": "1.1", "tasks": [task(0, f"{truth[0].name}.png")],
                                                   "label_config": unknown_labels}, timeout=60)
        assert {reg["value"]["rectanglelabels"][0] for reg in r.json()["results"][0]["result"]} <= {"Car", "Bus", "Person"}
        assert httpx.get(f"{srv.url}/health").json()["ready"]


def test_malformed_bodies_are_rejected_and_server_keeps_serving(tmp_path, samples, detect_adapter):
    root, truth, _ = samples
    with _serve(tmp_path, root, detect_adapter) as srv:
        bad = [b"{not json", b"[]", b'{"tasks": "nope"}', b'{"label_config": "<View/>"}']
        for body in bad:
            r = httpx.post(f"{srv.url}/predict", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422, body
        assert httpx.post(f"{srv.url}/predict", json={"tasks": [task(0, f"{truth[0].name}.png")]}).status_code == 422
        r = httpx.post(f"{srv.url}/predict", json={"tasks": [task(0, f"{truth[0].name}.png")], "label_config": RECT}, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["result"]


def test_webhook_answers_fast_for_any_action(tmp_path, samples, detect_adapter):
    root, _, _ = samples
    with _serve(tmp_path, root, detect_adapter) as srv:
        for action in ("ANNOTATION_CREATED", "ANNOTATIONS_DELETED", "START_TRAINING", "SOMETHING_NEW"):
            t0 = time.perf_counter()
            r = httpx.post(f"{srv.url}/webhook", json={"action": action, "project": {"id": 5}})
            assert r.status_code == 200 and time.perf_counter() - t0 < 0.5
        assert httpx.post(f"{srv.url}/webhook", json={"no": "action"}).status_code == 422
    from backend.registry import Registry

    assert Registry(tmp_path / "home" / "tandem.sqlite3").event_counts(5) == {
        "ANNOTATION_CREATED": 1, "ANNOTATIONS_DELETED": 1, "START_TRAINING": 1, "SOMETHING_NEW": 1}


def test_basic_auth_guards_every_route(tmp_path, samples, detect_adapter):
    root, _, _ = samples
    with _serve(tmp_path, root, detect_adapter, basic_auth_user="u", basic_auth_pass="p") as srv:
        calls = [("GET", "/health", None), ("GET", "/", None), ("GET", "/versions", None),
                 ("POST", "/setup", {"schema": RECT}), ("POST", "/predict", {"tasks": [], "label_config": RECT}),
                 ("POST", "/webhook", {"action": "X"})]
        for method, path, body in calls:
            assert httpx.request(method, srv.url + path, json=body).status_code == 401, path
            assert httpx.request(method, srv.url + path, json=body, auth=("u", "wrong")).status_code == 401, path
            assert httpx.request(method, srv.url + path, json=body, auth=("u", "p")).status_code == 200, path


def test_iou_helper_is_not_vacuous():
    """assert_matches_truth must fail on a shifted box (guards the guards used above)."""
    _, sample = generate_samples(1, seed=3)[0]
    boxes = np.array([o.box for o in sample.objects]) + 60
    with pytest.raises(AssertionError):
        assert_matches_truth(boxes, [o.label for o in sample.objects], sample)
    assert sv.box_iou_batch(boxes, boxes).diagonal().min() == pytest.approx(1.0)


def test_webhook_shared_secret_and_basic_auth(tmp_path, samples, detect_adapter):
    root, _, _ = samples
    with _serve(tmp_path, root, detect_adapter, basic_auth_user="u", basic_auth_pass="p", webhook_secret="s3cret") as srv:
        body = {"action": "ANNOTATION_CREATED", "project": {"id": 1}}
        assert httpx.post(f"{srv.url}/webhook", json=body).status_code == 401
        assert httpx.post(f"{srv.url}/webhook", json=body, headers={"X-Tandem-Webhook-Secret": "nope"}).status_code == 401
        assert httpx.post(f"{srv.url}/webhook", json=body, headers={"X-Tandem-Webhook-Secret": "s3cret"}).status_code == 200
        assert httpx.post(f"{srv.url}/webhook", json=body, auth=("u", "p")).status_code == 200  # Train button path
        # the secret opens /webhook only
        assert httpx.get(f"{srv.url}/versions", headers={"X-Tandem-Webhook-Secret": "s3cret"}).status_code == 401
    with _serve(tmp_path, root, detect_adapter, webhook_secret="s3cret") as srv:
        assert httpx.post(f"{srv.url}/webhook", json={"action": "X"}).status_code == 401
        assert httpx.get(f"{srv.url}/health").status_code == 200


def test_50_concurrent_predicts_and_metrics(tmp_path, samples, detect_adapter):
    from concurrent.futures import ThreadPoolExecutor

    root, truth, _ = samples
    with _serve(tmp_path, root, detect_adapter) as srv:
        def one(i):
            s = truth[i % len(truth)]
            return httpx.post(f"{srv.url}/predict", json={"tasks": [task(i, f"{s.name}.png")], "label_config": RECT},
                              timeout=120)

        with ThreadPoolExecutor(50) as pool:
            responses = list(pool.map(one, range(50)))
        assert all(r.status_code == 200 and r.json()["results"][0]["result"] for r in responses)
        text = httpx.get(f"{srv.url}/metrics").text
    assert f'tandem_predictions_total{{model_version="{detect_adapter.version}",outcome="ok"}} 50.0' in text
    assert 'tandem_http_requests_total{method="POST",route="/predict",status="200"} 50.0' in text
    assert "tandem_model_ready 1.0" in text and 'tandem_training_jobs{status="queued"} 0.0' in text
    assert "tandem_deferred_predictions 0.0" in text


def test_metrics_count_training_jobs_per_project(tmp_path, samples, detect_adapter):
    """Which project's retrains pile up or fail: the per-status total alone cannot say."""
    root, _, _ = samples
    app = create_app(Settings(home=tmp_path / "home", local_files_root=root), ModelHolder(detect_adapter))
    store = app.state.training.store
    def held(project):  # by another runner for an hour: it stays queued, nobody here runs it
        return store.create(project, "yolo", "local", "test", holder="elsewhere:1:ab", lease_s=3600)

    assert store.finish(held(7).id, JobStatus.FAILED, error="boom")
    held(7), held(8)
    with ServerThread(app) as srv:
        text = httpx.get(f"{srv.url}/metrics").text
    assert 'tandem_project_training_jobs{project="7",status="failed"} 1.0' in text
    assert 'tandem_project_training_jobs{project="7",status="queued"} 1.0' in text
    assert 'tandem_project_training_jobs{project="8",status="queued"} 1.0' in text
    assert 'tandem_training_jobs{status="queued"} 2.0' in text


def test_a_label_no_class_maps_to_is_said_once_at_setup(tmp_path, samples, detect_adapter, caplog):
    root, _, _ = samples
    with_star = RECT.replace('<Label value="Triangle"/>', '<Label value="Triangle"/><Label value="Star"/>')
    assert with_star != RECT
    with _serve(tmp_path, root, detect_adapter) as srv, caplog.at_level("WARNING", logger="tandem.server"):
        for _ in range(3):
            assert httpx.post(f"{srv.url}/setup", json={"project": "4.1", "schema": with_star}).status_code == 200
        assert httpx.post(f"{srv.url}/setup", json={"project": "4.1", "schema": RECT}).status_code == 200
    said = [r.getMessage() for r in caplog.records if "will not be pre-annotated" in r.getMessage()]
    assert len(said) == 1 and "Star of 'label'" in said[0] and "square, circle, triangle" in said[0]


def test_classes_no_choice_maps_to_are_said_once_at_setup(tmp_path, samples, classify_adapter, caplog):
    """A square/star project on the circle/square/triangle classifier: the circles and triangles it sees get
    no pre-annotation, and the console says so (not only that Star matches no class)."""
    root, _, _ = samples
    partial = CHOICES.replace('<Choice value="Circle"/><Choice value="Triangle"/>', '<Choice value="Star"/>')
    assert partial != CHOICES
    with _serve(tmp_path, root, classify_adapter) as srv, caplog.at_level("WARNING", logger="tandem.server"):
        for _ in range(2):
            assert httpx.post(f"{srv.url}/setup", json={"project": "6.1", "schema": partial}).status_code == 200
    said = [r.getMessage() for r in caplog.records if "map to no choice" in r.getMessage()]
    assert len(said) == 1 and "circle, triangle map to no choice of 'shape'" in said[0], said
    star = [r.getMessage() for r in caplog.records if "will not be pre-annotated" in r.getMessage()]
    assert len(star) == 1 and "Star of 'shape'" in star[0] and 'on its <Choice>' in star[0], star


def test_controls_the_model_leaves_to_the_annotator_are_said_once_at_setup(tmp_path, samples, detect_adapter, caplog):
    root, _, _ = samples
    both = RECT.replace("</View>", '<Choices name="shape" toName="image"><Choice value="Round"/></Choices>'
                                   '<TextArea name="notes" toName="image"/></View>')
    assert both.count("</View>") == 1 and "Choices" in both
    with _serve(tmp_path, root, detect_adapter) as srv, caplog.at_level("WARNING", logger="tandem.server"):
        for _ in range(3):
            assert httpx.post(f"{srv.url}/setup", json={"project": "5.1", "schema": both}).status_code == 200
    said = [r.getMessage() for r in caplog.records if "left to the annotator" in r.getMessage()]
    assert len(said) == 1 and "rectanglelabels 'label' only" in said[0], said
    assert "choices 'shape'" in said[0] and "TextArea 'notes'" in said[0]


def test_a_control_whose_labels_match_no_class_is_left_to_the_annotator_not_the_whole_project(
        tmp_path, samples, classify_adapter, caplog):
    """Two Choices on one image, the classifier's classes matching one: that one is pre-annotated, the other left
    to the annotator and said; a config where no control matches is still a 422 with the reason."""
    root, truth, _ = samples
    two = CHOICES.replace("</View>", '<Choices name="quality" toName="image"><Choice value="Good"/>'
                                     '<Choice value="Blurry"/></Choices></View>')
    with _serve(tmp_path, root, classify_adapter) as srv, caplog.at_level("WARNING", logger="tandem.server"):
        assert httpx.post(f"{srv.url}/setup", json={"project": "7.1", "schema": two}).status_code == 200
        body = httpx.post(f"{srv.url}/predict", json={"tasks": [task(1, f"{truth[0].name}.png")], "label_config": two,
                                                       "project": "7.1"}, timeout=60).json()
        only = CHOICES.replace('value="Square"', 'value="Good"').replace('value="Circle"', 'value="Blurry"') \
            .replace('value="Triangle"', 'value="Sharp"')
        refused = httpx.post(f"{srv.url}/setup", json={"project": "8.1", "schema": only})
    assert {r["from_name"] for r in body["results"][0]["result"]} == {"shape"}
    said = [r.getMessage() for r in caplog.records if "left to the annotator" in r.getMessage()]
    assert len(said) == 1 and "choices 'quality' (none of its labels matches a model class)" in said[0], said
    assert refused.status_code == 422 and "none of the model's classes" in refused.text


def test_serving_a_model_a_connected_project_cannot_use_is_said(tmp_path, samples, detect_adapter, classify_adapter,
                                                                 caplog):
    """A server-wide swap of the default model changes what every unbound project gets: say whom it leaves out,
    and how to give that project its own model."""
    root, _, _ = samples
    settings = Settings(home=tmp_path / "home", local_files_root=root)
    holder = ModelHolder(detect_adapter)
    with ServerThread(create_app(settings, holder)) as srv, caplog.at_level("WARNING", logger="tandem.server"):
        assert httpx.post(f"{srv.url}/setup", json={"project": "6.1", "schema": RECT}).status_code == 200
        holder.swap(detect_adapter)
        assert not [r for r in caplog.records if "cannot use" in r.getMessage()]
        holder.swap(classify_adapter)
        said = [r.getMessage() for r in caplog.records if "cannot use" in r.getMessage()]
        assert len(said) == 1 and "project 6 (connected to a server with this database)" in said[0]
        assert classify_adapter.version in said[0] and "cannot fill" in said[0]
        assert said[0].count("tandem models bind") == 1 and "tandem models bind --project 6 --model" in said[0]


def test_a_new_threshold_is_not_answered_from_items_made_under_the_old_one(tmp_path, samples, detect_adapter):
    """The store's key is shared by a task's two models, so thresholds are not in it; the serving cache checks
    the stamp they leave instead. A stored item made under another threshold is predicted again and overwritten;
    one from before stamps existed is served as it is."""
    from backend.media.fetch import MediaFetcher, MediaSettings
    from backend.predict import Predictor, plan_for, task_key
    from backend.storage.predictions import PredictionRepo

    root, truth, _ = samples
    store = PredictionRepo(f"sqlite:///{tmp_path / 'tandem.sqlite3'}")
    predictor = Predictor(MediaFetcher(MediaSettings(local_files_root=root)), store=store)
    one = task(1, f"{truth[0].name}.png")
    shown_all = plan_for(detect_adapter, RECT, min_confidence=0.0)
    strict = plan_for(detect_adapter, RECT, min_confidence=0.9999)
    assert shown_all.fingerprint == strict.fingerprint and shown_all.made_with != strict.made_with
    key = task_key(one, shown_all)
    first = predictor.predict([one], shown_all, project_id=1)[0]
    store.flush()
    assert first["result"] and store.for_project(1)[0].made_with == shown_all.made_with
    again = predictor.predict([one], strict, project_id=1)[0]  # not the stored item: made under 0.0
    store.flush()
    assert len(again["result"]) < len(first["result"])
    (row,) = store.for_project(1)
    assert row.key == key and row.made_with == strict.made_with  # overwritten in place
    assert store.get_items([key], strict.made_with)[key]["result"] == again["result"]
    assert store.get_items([key], shown_all.made_with) == {}
    # a row from before stamps (NULL) is served whatever the thresholds
    store.put_many([row.__class__(*[getattr(row, f) for f in ("task_id", "model_version", "fingerprint",
                                                               "project_id", "model_name", "role", "item",
                                                               "controls")])])
    assert store.get_items([key], "any-stamp")[key]["result"] == again["result"]
    predictor.close()
    store.close()


def test_tasks_past_the_budget_that_the_full_background_queue_refuses_say_so(tmp_path, samples, detect_adapter):
    """Past the time budget, tasks go to the background queue; those a full queue cannot take are not
    "still computing" (nothing computes them), and their item names `tandem predict`."""
    import time as _time

    from backend.media.fetch import MediaFetcher, MediaSettings
    from backend.predict import Predictor, plan_for
    from backend.server.deferred import DeferredPredictions

    root, truth, _ = samples
    predictor = Predictor(MediaFetcher(MediaSettings(local_files_root=root)), max_chunk=1)
    queue = DeferredPredictions(max_pending=2)
    plan = plan_for(detect_adapter, RECT)
    tasks = [task(i, f"{truth[i % len(truth)].name}.png") for i in range(6)]
    try:
        items = predictor.predict(tasks, plan, deadline=_time.monotonic() - 1, project_id=4,  # the budget is spent
                                  on_overflow=lambda rest: queue.submit(predictor, rest, plan, 4, "pre-annotation"))
        said = [item.get("error", "") for item in items]
        done = sum("result" in item for item in items)  # the first chunk is predicted whatever the budget
        assert done >= 1 and sum("still computing" in e for e in said) == 2, said  # the queue's room
        refused = sum("background queue is full" in e and "tandem predict --project 4" in e for e in said)
        assert refused == len(tasks) - done - 2, said
        assert queue.wait_idle(120)
    finally:
        queue.close()
        predictor.close()
