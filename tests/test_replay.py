"""Replay for fine-tunes on a few corrections: the frozen split stays human, classes map by name, the
schedule follows what was measured, and the gate says what its split can resolve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.convert.yolo_txt import box_lines
from backend.datasets.shapes import CLASS_NAMES, generate_samples, write_yolo_dataset
from backend.models.yolo import YoloAdapter
from backend.training.evaluate import evaluate, gate_scores, paired_bootstrap, top1_bootstrap
from backend.training.export import ExportedDataset, add_replay, pseudo_labels
from backend.training.replay import (
    FROZEN_LAYERS,
    choose_schedule,
    dataset_replay,
    existing_task_ids,
    find_parent_dataset,
    gather_replay,
    parent_dataset,
    pseudo_replay,
    replay_count,
)


def _dataset(root: Path, classes: list[str], train: list[int], val: list[int], seed: int = 3) -> ExportedDataset:
    """An exported dataset as the job writes it (task<id>_<digest> stems, tandem_export.json)."""
    samples = generate_samples(len(train) + len(val), seed=seed)
    for split, ids in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for task, split, (image, s) in zip(train + val, ["train"] * len(train) + ["val"] * len(val), samples, strict=True):
        lines = box_lines(np.array([o.box for o in s.objects], float).reshape(-1, 4),
                          [classes.index(o.label) for o in s.objects], image.size)
        image.save(root / "images" / split / f"task{task}_abc.png")
        (root / "labels" / split / f"task{task}_abc.txt").write_text("\n".join(lines) + "\n")
    body = "\n".join(f"  {i}: {json.dumps(n)}" for i, n in enumerate(classes))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{body}\n")
    (root / "tandem_export.json").write_text(json.dumps({"classes": classes}))
    return ExportedDataset(root=root, task="detect", class_names=classes, data=str(root / "data.yaml"),
                           train=len(train), val=len(val))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_add_replay_never_touches_the_frozen_validation_split(tmp_path):
    ds = _dataset(tmp_path / "child", list(CLASS_NAMES), train=[1, 2, 3], val=[4, 5])
    val_before = {k: v for k, v in _snapshot(ds.root).items() if "/val/" in k}
    image = Image.new("RGB", (64, 48))
    added = add_replay(ds, [("a", image, ["0 0.5 0.5 0.2 0.2"]), ("b", image, [])])
    after = _snapshot(ds.root)
    assert added == 2
    assert {k: v for k, v in after.items() if "/val/" in k} == val_before
    assert after["labels/train/replay_a.txt"] == b"0 0.5 0.5 0.2 0.2\n" and after["labels/train/replay_b.txt"] == b""
    assert len(list((ds.root / "images" / "train").glob("*.png"))) == 5


def test_dataset_replay_remaps_classes_and_leaves_out_the_childs_tasks(tmp_path):
    parent_classes = ["circle", "square", "triangle"]  # another order than the child's labels
    parent = _dataset(tmp_path / "parent", parent_classes, train=[1, 2, 3, 4, 5, 6], val=[7])
    child_classes = ["square", "circle", "triangle"]
    items = dataset_replay(parent.root, child_classes, exclude_tasks={2, 3}, count=10)
    assert sorted(i.stem for i in items) == ["dtask1_abc", "dtask4_abc", "dtask5_abc", "dtask6_abc"]
    for item in items:  # the same boxes, each class id now the child's id of the same name
        original = (parent.root / "labels" / "train" / f"{item.stem[1:]}.txt").read_text().split("\n")
        expected = [" ".join([str(child_classes.index(parent_classes[int(r.split()[0])])), *r.split()[1:]])
                    for r in original if r.strip()]
        assert item.lines == expected
    assert len(dataset_replay(parent.root, child_classes, set(), count=2)) == 2
    # a parent class the child lacks: those images are not replayed (a dropped box would teach background)
    narrow = dataset_replay(parent.root, ["square", "circle"], set(), count=10)
    labels = {p.stem: p.read_text() for p in (parent.root / "labels" / "train").glob("*.txt")}
    assert {i.stem[1:] for i in narrow} == {s for s, t in labels.items() if all(r.split()[0] != "2" for r in t.split("\n") if r)}


def test_parent_dataset_is_found_from_the_version_or_its_job_folder(tmp_path):
    ds = _dataset(tmp_path / "jobs" / "7" / "dataset", list(CLASS_NAMES), train=[1], val=[2])
    assert parent_dataset({}, "p3-job7", tmp_path) == ds.root
    assert parent_dataset({"dataset_root": str(ds.root)}, "starter", tmp_path / "elsewhere") == ds.root
    assert parent_dataset({}, "shapes-yolov8n-detect", tmp_path) is None
    assert existing_task_ids(ds.root) == {1, 2}


def test_pseudo_labels_map_the_models_classes_onto_the_datasets_labels(detect_weights):
    model = YoloAdapter(detect_weights, device="cpu", conf=0.25)
    images = [img for img, _ in generate_samples(4, seed=11)]
    labels = {"Triangle": 0, "Square": 1, "Circle": 2}  # the project's labels, another case and order
    got = pseudo_labels(model, images, labels, conf=0.5)
    for out, lines in zip(model.predict(images), got, strict=True):
        det = out.detections
        keep = det.confidence >= 0.5
        names = [model.class_names[int(c)].capitalize() for c in det.class_id[keep]]
        assert sorted(int(ln.split()[0]) for ln in lines) == sorted(labels[n] for n in names)
    assert sum(map(len, got)) > 0
    # through a label map; a class the dataset lacks is dropped
    mapped = pseudo_labels(model, images, {"Box": 0}, conf=0.5, label_map={"square": "Box"})
    for out, lines in zip(model.predict(images), mapped, strict=True):
        det = out.detections
        squares = sum(model.class_names[int(c)] == "square" for c in det.class_id[det.confidence >= 0.5])
        assert len(lines) == squares and all(ln.startswith("0 ") for ln in lines)
    items = pseudo_replay(model, [("u1", images[0]), ("u2", images[1])], labels, count=1)
    assert [i.stem for i in items] == ["pu1"]
    assert items[0].lines == pseudo_labels(model, [images[0]], labels, conf=0.5)[0]  # batch of one: same floats


def test_the_schedule_trains_the_whole_network_only_with_replay():
    base = {"epochs": 30, "lr0": 0.001, "freeze": None}
    assert choose_schedule(base, 8, 0, "detect").params["freeze"] == FROZEN_LAYERS
    with_replay = choose_schedule(base, 8, replay_count(8), "detect")
    assert with_replay.params["freeze"] is None and "32 replayed" in with_replay.reason
    assert choose_schedule({**base, "freeze": 3}, 8, 0, "detect").params["freeze"] == 3  # the user's choice wins
    assert choose_schedule(base, 40, 0, "detect").params["freeze"] is None
    assert choose_schedule(base, 8, 0, "classify").params["freeze"] is None
    assert replay_count(8) == 32 and replay_count(100) == 64


def test_the_gate_says_what_a_small_frozen_split_can_resolve(tmp_path, detect_weights):
    ds = _dataset(tmp_path / "d", list(CLASS_NAMES), train=[1], val=[2, 3, 4])
    model = YoloAdapter(detect_weights, device="cpu", conf=0.001)
    same = paired_bootstrap(model, model, ds, margin=0.01, resamples=30)
    assert same.images == 3 and same.difference == 0 and same.low == same.high == 0
    assert "frozen split of 3 images" in same.describe()
    strict = YoloAdapter(detect_weights, device="cpu", conf=0.9)  # drops its less sure boxes: scores differ
    other = paired_bootstrap(model, strict, ds, margin=0.01, resamples=50)
    half = (other.high - other.low) / 2
    assert other.resolves_margin == (max(half, 1 / 3) <= 0.01) is False  # 3 images: no finer than a third
    assert not same.resolves_margin and "cannot tell differences smaller than about 0.333" in same.describe()
    text = other.describe()
    assert f"[{other.low:+.3f}, {other.high:+.3f}]" in text
    assert ("cannot tell differences smaller than" in text) == (not other.resolves_margin)


def test_top1_bootstrap_hand_computed():
    """Top-1 is a mean over images: the candidate right on 3 of 4, the serving model on 1 of the same 4."""
    res = top1_bootstrap(np.array([1, 1, 1, 0], bool), np.array([1, 0, 0, 0], bool), margin=0.05, resamples=400)
    assert res.images == 4 and res.difference == 0.5 and res.metric == "top1"
    assert 0 <= res.low <= 0.5 <= res.high <= 1  # no image where the serving model alone is right: never below 0
    assert not res.resolves_margin and "frozen split of 4 images: candidate − serving top-1 +0.500" in res.describe()
    assert top1_bootstrap(np.zeros(0, bool), np.zeros(0, bool), margin=0.05) is None
    one = top1_bootstrap(np.array([True]), np.array([True]), margin=0.05)  # a zero-width interval from one image
    assert one.low == one.high == 0 and not one.resolves_margin
    assert "cannot tell differences smaller than about 1.000" in one.describe()
    many = top1_bootstrap(np.ones(400, bool), np.ones(400, bool), margin=0.01)  # 400 images: 1/400 < the margin
    assert many.resolves_margin


def test_the_gate_says_what_a_classify_frozen_split_can_resolve(tmp_path, classify_weights):
    """A classify job's gate scores top-1 per image, so it can say what its split resolves, as a detect job's does."""
    root = write_yolo_dataset(tmp_path / "cls", task="classify", train=2, val=12, size=(64, 64))
    ds = ExportedDataset(root=root, task="classify", class_names=sorted(p.name for p in (root / "val").iterdir()),
                         data=str(root), train=2, val=12)
    model = YoloAdapter(classify_weights, device="cpu")
    scores = gate_scores(model, model, ds, margin=0.01, resamples=50)
    assert scores.metric == "top1" and scores.candidate == scores.serving == evaluate(model, ds)
    assert scores.resolution.images == 12 and scores.resolution.difference == 0 == scores.resolution.low
    assert "candidate − serving top-1 +0.000" in scores.resolution.describe()


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_a_job_on_a_few_corrections_replays_the_parents_boxes_and_says_what_the_gate_resolves(
        label_studio, detect_weights, tmp_path):
    """A new project's first retrain on 12 corrections (a starter parent: no dataset of its own in Tandem), as
    a new user meets it: the job replays the parent's confident boxes on unlabelled tasks, fine-tunes the whole
    network, and its log says what the frozen split can and cannot resolve."""
    import httpx
    from label_studio_sdk import LabelStudio

    from backend.demo import ground_truth_result
    from backend.dev.local_label_studio import upload_images
    from backend.server.app import create_app
    from backend.serving import ModelHolder
    from backend.settings import Settings
    from backend.training.jobs import JobStatus
    from backend.training.runner import wait
    from tests.harness import ServerThread, png_bytes
    from tests.test_server import RECT

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem replay", label_config=RECT)
    items = generate_samples(30, seed=7070)
    upload_images(label_studio.url, label_studio.token, project.id, {f"{s.name}.png": png_bytes(img) for img, s in items})
    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url,
                        label_studio_api_key=label_studio.token, train_after=10_000, train_epochs=3, train_imgsz=160)
    app = create_app(settings, ModelHolder(YoloAdapter(detect_weights, device="cpu")))
    from backend.training.export import is_validation

    sample_of = {f"{s.name}.png": s for _, s in items}
    tasks = list(client.tasks.list(project=project.id))
    # 12 corrections on both sides of the frozen split, whatever ids Label Studio handed out (12 tasks taken in
    # upload order can all fall on one side, and the job then stops before training)
    val = [t for t in tasks if is_validation(project.id, t.id)][:3]
    chosen = val + [t for t in tasks if not is_validation(project.id, t.id)][: 12 - len(val)]
    assert val and len(chosen) == 12
    for t in chosen:
        sample = sample_of[t.data["image"].rsplit("/", 1)[-1].split("-", 1)[-1]]
        client.annotations.create(id=t.id, result=ground_truth_result(sample))
    with ServerThread(app) as srv:
        job = app.state.training.trigger(project.id, "test: 12 corrections")
        job = wait(app.state.training.store, job.id, timeout=900)
        log = httpx.get(f"{srv.url}/jobs/{job.id}/logs").text
    assert job.status is JobStatus.SUCCEEDED, f"{job.error}\n{log}"
    m = job.metrics
    assert m["train"] + m["val"] == 12 and m["replay"] == min(replay_count(m["train"]), 18)  # 18 left unlabelled
    assert f"replaying {m['replay']} unlabelled tasks with" in log and "pseudo-labels" in log
    assert "the whole network is fine-tuned" in log
    from backend.storage.artifacts import exists  # the export is in the store, where any replica replays it from
    assert m["dataset_uri"].endswith(".tar") and exists(m["dataset_uri"]) and f"dataset stored at {m['dataset_uri']}" in log
    assert f"/datasets/p{project.id}/{m['dataset']}-" in m["dataset_uri"]
    res = m["gate_resolution"]
    assert res["images"] == m["val"] and res["low"] <= res["high"]
    assert f"what the gate can resolve: frozen split of {m['val']} images" in log
    assert f"[{res['low']:+.3f}, {res['high']:+.3f}]" in log


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_classify_job_on_a_few_corrections_says_it_replays_nothing_and_what_the_gate_resolves(
        label_studio, classify_weights, tmp_path):
    """The Choices twin of the test above, through a real Label Studio: a classify fine-tune has no replay or
    frozen backbone (the schedule is measured for boxes), and its log says so, and what its top-1 gate resolves."""
    import httpx
    from label_studio_sdk import LabelStudio

    from backend.dev.local_label_studio import upload_images
    from backend.server.app import create_app
    from backend.serving import ModelHolder
    from backend.settings import Settings
    from backend.training.export import frozen_split, is_validation
    from backend.training.jobs import JobStatus
    from backend.training.runner import wait
    from tests.harness import ServerThread, png_bytes
    from tests.test_server import CHOICES

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="tandem classify retrain", label_config=CHOICES)
    items = generate_samples(30, seed=7171, size=(96, 96), classification=True)
    upload_images(label_studio.url, label_studio.token, project.id, {f"{s.name}.png": png_bytes(img) for img, s in items})
    label = {f"{s.name}.png": s.objects[0].label.capitalize() for _, s in items}
    tasks = list(client.tasks.list(project=project.id))

    def choice_of(t):
        return label[t.data["image"].rsplit("/", 1)[-1].split("-", 1)[-1]]

    val = [t for t in tasks if is_validation(project.id, t.id)]
    val = [t for t in val if choice_of(t) == choice_of(val[0])][:2]  # one class, as a small project may draw
    chosen = val + [t for t in tasks if not is_validation(project.id, t.id)][: 12 - len(val)]
    assert val and len(chosen) == 12  # both sides of the frozen split (30 tasks: none on one side is ~0.1%)
    for t in chosen:
        choice = choice_of(t)
        client.annotations.create(id=t.id, result=[{"from_name": "shape", "to_name": "image", "type": "choices",
                                                    "value": {"choices": [choice]}}])
    settings = Settings(home=tmp_path / "home", label_studio_url=label_studio.url,
                        label_studio_api_key=label_studio.token, train_after=10_000, train_epochs=2, train_imgsz=64)
    app = create_app(settings, ModelHolder(YoloAdapter(classify_weights, device="cpu")))
    with ServerThread(app) as srv:
        job = app.state.training.trigger(project.id, "test: 12 corrections")
        job = wait(app.state.training.store, job.id, timeout=600)
        log = httpx.get(f"{srv.url}/jobs/{job.id}/logs").text
    assert job.status is JobStatus.SUCCEEDED, f"{job.error}\n{log}"
    m = job.metrics
    frozen = frozen_split(project.id, [t.id for t in chosen])  # the hash rule, topped up to 2 tasks
    assert {t.id for t in val} <= frozen and len(frozen) >= 2
    assert (m["train"], m["val"], m["replay"]) == (12 - len(frozen), len(frozen), 0) and m["gate_metric"] == "top1"
    assert f"{m['train']} corrections: a classify fine-tune replays nothing and trains the whole network" in log
    classes = {choice_of(t) for t in chosen if t.id in frozen}
    ours = log.index(f"the frozen split has images of {len(classes)} of the 3 classes (")
    assert ours < log.index(f"requires 3 classes, not {len(classes)}")  # said before ultralytics' own ERROR line
    res = m["gate_resolution"]
    assert res["images"] == m["val"] and res["metric"] == "top1" and res["low"] <= res["high"]
    assert res["difference"] == pytest.approx(m["candidate"]["top1"] - m["serving"]["top1"])
    assert f"what the gate can resolve: frozen split of {m['val']} images: candidate − serving top-1" in log


def _no_pseudo_labels():
    raise AssertionError("the parent's dataset was there: no pseudo-labels")


@pytest.mark.parametrize("remote", [False, True], ids=["local-root", "memory-root"])
def test_a_parents_dataset_put_by_one_replica_is_replayed_by_another(tmp_path, memory_root, remote):
    """Replica A's job stored its export (before its own replay) and recorded `dataset_uri`; replica B (another
    home, the same artifact store, A's folder gone) replays the same images with the same labels."""
    from backend.settings import Settings
    from backend.storage.artifacts import ArtifactStore

    artifacts = memory_root if remote else str(tmp_path / "shared-artifacts")
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    parent = _dataset(home_a / "jobs" / "7" / "dataset", ["circle", "square", "triangle"],
                      train=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], val=[13, 14])
    uri = ArtifactStore.from_settings(Settings(home=home_a, artifacts=artifacts)).put_dataset(parent.root, 3, "5eed")
    add_replay(parent, [("ptask99_x", Image.new("RGB", (32, 32)), ["0 0.5 0.5 0.2 0.2"])])  # A's own replay
    metrics = {"dataset_root": str(parent.root), "dataset_uri": uri}
    child = _dataset(tmp_path / "child", ["square", "circle", "triangle"], train=[2, 11], val=[12])

    on_a, said_a = gather_replay(child, metrics, "p3-job7", home_a, _no_pseudo_labels, None)
    assert f"({parent.root})" in said_a
    train_a = {p.relative_to(parent.root).as_posix(): p.read_bytes()
               for p in parent.root.glob("*/train/task*") if p.is_file()}
    shutil.rmtree(home_a / "jobs")  # replica B has no such folder; here A's work folder is cleaned as well

    found = find_parent_dataset(metrics, "p3-job7", home_b)
    assert found.root is not None and found.root.is_relative_to(home_b / "cache" / "datasets") and found.source == uri
    train_b = {p.relative_to(found.root).as_posix(): p.read_bytes()
               for p in found.root.glob("*/train/*") if p.is_file()}
    assert train_b == train_a and len(train_b) == 20  # the export's train split, byte for byte; no replay_* files
    on_b, said_b = gather_replay(child, metrics, "p3-job7", home_b, _no_pseudo_labels, None)
    assert said_b == f"replaying {len(on_b)} images of p3-job7's own training data ({uri})"
    assert len(on_a) == len(on_b) == replay_count(child.train) == 8
    assert [(i.stem, i.lines, i.image.tobytes()) for i in on_a] == [(i.stem, i.lines, i.image.tobytes()) for i in on_b]
    assert not any(i.stem.startswith("dreplay_") for i in on_a)  # a job's own replay is never replayed again


def test_a_missing_dataset_archive_falls_back_to_pseudo_labels_and_says_why(tmp_path, memory_root, detect_weights):
    child = _dataset(tmp_path / "child", list(CLASS_NAMES), train=[1, 2], val=[3])
    uri = f"{memory_root}/datasets/p3/5eed-000000000000.tar"
    metrics = {"dataset_root": str(tmp_path / "gone" / "dataset"), "dataset_uri": uri}
    found = find_parent_dataset(metrics, "p3-job7", tmp_path / "home")
    assert found.root is None and found.problem.startswith("p3-job7's dataset archive could not be read")
    assert uri in found.problem
    assert parent_dataset(metrics, "p3-job7", tmp_path / "home") is None
    images = [(f"task{20 + k}", img) for k, (img, _) in enumerate(generate_samples(10, seed=5))]
    asked = []

    def unlabelled(exclude, count):
        asked.append((exclude, count))
        return images[:count]

    items, said = gather_replay(child, metrics, "p3-job7", tmp_path / "home",
                                lambda: YoloAdapter(detect_weights, device="cpu"), unlabelled)
    assert asked == [({1, 2, 3}, 8)]
    assert [i.stem for i in items] == [f"ptask{20 + k}" for k in range(8)]
    assert said.startswith(f"p3-job7's dataset archive could not be read (no dataset archive at {uri}); "
                           "replaying 8 unlabelled tasks with p3-job7's own confident boxes")
    assert "pseudo-labels" in said
    # no archive recorded (a version from before the store): the same fallback, with nothing to explain
    _, plain = gather_replay(child, {"dataset_root": metrics["dataset_root"]}, "p3-job7", tmp_path / "home",
                             lambda: YoloAdapter(detect_weights, device="cpu"), unlabelled)
    assert plain.startswith("replaying 8 unlabelled tasks with p3-job7's own confident boxes")


def test_copied_share_counts_boxes_that_are_the_models_own_on_hand_made_cases():
    import supervision as sv

    from backend.training.evaluate import copied_share

    target = sv.Detections(xyxy=np.array([[0, 0, 100, 100], [200, 200, 300, 300], [0, 0, 50, 50]], float),
                           class_id=np.array([0, 1, 0]))
    pred = sv.Detections(xyxy=np.array([[0, 0, 100, 100],  # the first box, to the pixel
                                        [202, 200, 300, 300],  # IoU 0.98 with the second: a copy
                                        [0, 0, 50, 50]], float),  # the third's edges but another class
                         class_id=np.array([0, 1, 1]), confidence=np.array([0.9, 0.8, 0.7]))
    assert copied_share([pred], [target]) == pytest.approx(2 / 3)
    assert copied_share([pred], [target], iou=0.99) == pytest.approx(1 / 3)
    assert copied_share([sv.Detections.empty(), pred], [target, target]) == pytest.approx(2 / 6)
    assert copied_share([], []) == 0.0


def test_the_gate_compares_map50_on_a_split_of_the_serving_models_own_boxes(tmp_path, detect_weights):
    """Labels a person accepted unchanged are the serving model's boxes to the pixel: mAP50-95 scores it near 1.0
    there, so the gate compares mAP50. On drawn labels (the generator's exact boxes) it stays mAP50-95."""
    from backend.training.evaluate import gate_scores

    drawn = _dataset(tmp_path / "drawn", list(CLASS_NAMES), train=[1], val=[2, 3, 4, 5, 6, 7])
    serving = YoloAdapter(detect_weights, device="cpu", conf=0.001)
    shown = YoloAdapter(detect_weights, device="cpu", conf=0.25)  # what annotators saw and accepted unchanged
    copies = _dataset(tmp_path / "copies", list(CLASS_NAMES), train=[1], val=[2, 3, 4, 5, 6, 7])
    for f in sorted((copies.root / "images" / "val").glob("*.png")):
        image = Image.open(f).convert("RGB")
        det = shown.predict([image])[0].detections
        lines = box_lines(det.xyxy, [CLASS_NAMES.index(shown.class_names[int(c)]) for c in det.class_id], image.size)
        (copies.root / "labels" / "val" / f"{f.stem}.txt").write_text("\n".join(lines) + "\n")
    strict = YoloAdapter(detect_weights, device="cpu", conf=0.9)  # a candidate that differs: its less sure boxes go
    on_drawn = gate_scores(strict, serving, drawn, margin=0.01, resamples=20)
    assert on_drawn.metric == "map50_95" and on_drawn.copied < 0.5 and on_drawn.describe_metric("v1") is None
    assert on_drawn.serving["fitness"] == on_drawn.serving["map50_95"] < 0.95
    assert on_drawn.resolution.metric == "map50_95" and "mAP50-95" in on_drawn.resolution.describe()
    on_copies = gate_scores(strict, serving, copies, margin=0.01, resamples=20)
    assert on_copies.copied == 1.0 and on_copies.metric == "map50"
    assert on_copies.serving["map50_95"] > 0.95  # the bias: near-perfect on its own boxes
    assert on_copies.serving["fitness"] == on_copies.serving["map50"]
    assert on_copies.candidate["fitness"] == on_copies.candidate["map50"]
    assert "100% of the frozen split's boxes are v1's own" in on_copies.describe_metric("v1")
    assert "candidate − serving mAP50 " in on_copies.resolution.describe()


def _segment_dataset(root: Path, train: list[int], val: list[int], seed: int = 5) -> ExportedDataset:
    """A segment export as the job writes it: the corrections are outlines."""
    from backend.convert.yolo_txt import polygon_lines

    samples = generate_samples(len(train) + len(val), seed=seed)
    for split, ids in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for task, split, (image, s) in zip(train + val, ["train"] * len(train) + ["val"] * len(val), samples, strict=True):
        lines = polygon_lines([np.asarray(o.polygon, float) for o in s.objects],
                              [CLASS_NAMES.index(o.label) for o in s.objects], image.size)
        image.save(root / "images" / split / f"task{task}_abc.png")
        (root / "labels" / split / f"task{task}_abc.txt").write_text("\n".join(lines) + "\n")
    body = "\n".join(f"  {i}: {json.dumps(n)}" for i, n in enumerate(CLASS_NAMES))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{body}\n")
    (root / "tandem_export.json").write_text(json.dumps({"classes": list(CLASS_NAMES)}))
    return ExportedDataset(root=root, task="segment", class_names=list(CLASS_NAMES), data=str(root / "data.yaml"),
                           train=len(train), val=len(val))


def test_a_segment_projects_few_corrections_replay_outlines_and_fine_tune(tmp_path, segment_weights):
    """A PolygonLabels project's first retrains replayed boxes beside its outlines, and ultralytics refused the
    dataset ("Segment dataset requires equal numbers of boxes and segments"). Replay is outlines now, and the
    fine-tune runs on it."""
    from backend.training.yolo_finetune import fine_tune

    ds = _segment_dataset(tmp_path / "ds", train=[1, 2, 3, 4, 5, 6], val=[7, 8])
    unlabelled = [(f"task{100 + i}", img) for i, (img, _) in enumerate(generate_samples(12, seed=606))]
    parent = YoloAdapter(segment_weights, device="cpu")
    items, said = gather_replay(ds, {}, "shapes-yolov8n-segment", tmp_path / "home", lambda: parent,
                                lambda exclude, count: unlabelled[:count])
    assert items and "own confident outlines" in said
    assert all(len(line.split()) > 5 and (len(line.split()) - 1) % 2 == 0 for i in items for line in i.lines)
    assert sum(len(i.lines) for i in items) > 0
    assert add_replay(ds, items) == len(items)
    # a box line in a parent's segment dataset is not replayed into a segment child
    parent_ds = _segment_dataset(tmp_path / "parent", train=[20, 21], val=[22])
    (parent_ds.root / "labels" / "train" / "task21_abc.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    kept = dataset_replay(parent_ds.root, list(CLASS_NAMES), set(), count=5, segment=True)
    assert [i.stem for i in kept] == ["dtask20_abc"]
    result = fine_tune(str(segment_weights), ds.data, tmp_path / "run", {"epochs": 1, "imgsz": 64, "batch": 4}, "cpu")
    assert Path(result["weights"]).is_file()


def test_nothing_to_replay_says_why(tmp_path):
    """A parent whose every training image is in the child's export already is not 'not here'; and with
    nothing unlabelled left the log says that too."""
    parent = _dataset(tmp_path / "parent", ["circle", "square", "triangle"], train=[1, 2, 3], val=[4])
    child = _dataset(tmp_path / "child", ["circle", "square", "triangle"], train=[1, 2, 3, 5], val=[4])
    items, said = gather_replay(child, {"dataset_root": str(parent.root)}, "p3-job7", tmp_path / "home",
                                _no_pseudo_labels, lambda exclude, count: [])
    assert items == [] and said == ("nothing to replay: every image of p3-job7's training data is in this export "
                                    "already, and no task is left unlabelled")
    items, said = gather_replay(child, {}, "p3-job7", tmp_path / "home", _no_pseudo_labels,
                                lambda exclude, count: [])
    assert items == [] and said.endswith("nothing to replay: p3-job7's training data is not here, and no task is "
                                         "left unlabelled")
