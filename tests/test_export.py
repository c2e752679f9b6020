"""Annotations -> training targets (YOLO label files, VLM examples) through the Label Studio reader, checked
against the generator's ground truth; no model, no Label Studio (media from a local-files root)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.convert.yolo_txt import read_detections
from backend.datasets.shapes import generate_samples
from backend.labeling.config import parse_label_config
from backend.media.fetch import MediaFetcher, MediaSettings
from backend.training.export import _lines, export_yolo_dataset, is_validation
from backend.training.vlm_examples import collect_annotations

CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="Square"/><Label value="Circle"/><Label value="Triangle"/></RectangleLabels>
<PolygonLabels name="poly" toName="image"><Label value="Square"/><Label value="Circle"/><Label value="Triangle"/></PolygonLabels>
<Choices name="main" toName="image"><Choice value="Square"/><Choice value="Circle"/><Choice value="Triangle"/></Choices>
</View>"""
NAMES = ["Square", "Circle", "Triangle"]
BOX, POLY, _ = parse_label_config(CONFIG).controls


def rect(x, y, w, h, label, from_name="box"):
    return {"from_name": from_name, "to_name": "image", "type": "rectanglelabels",
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}


def test_export_lines_hand_computed():
    results = [rect(10, 20, 30, 40, "Square"), rect(50, 50, 20, 10, "Circle"), rect(1, 1, 0, 5, "Square"),
               rect(1, 1, 5, 5, "Hexagon"), rect(1, 1, 5, 5, "Square", from_name="other")]
    assert _lines(BOX, results, (640, 480)) == ["0 0.250000 0.400000 0.300000 0.400000",
                                                "1 0.600000 0.550000 0.200000 0.100000"]
    polygons = [{"from_name": "poly", "type": "polygonlabels",
                 "value": {"points": [[10, 20], [110, 20], [50, -5]], "polygonlabels": ["Circle"]}},
                {"from_name": "poly", "type": "polygonlabels", "value": {"points": [[1, 1], [2, 2]],
                                                                         "polygonlabels": ["Square"]}}]
    assert _lines(POLY, polygons, (640, 480)) == ["1 0.100000 0.200000 1.000000 0.200000 0.500000 0.000000"]


@settings(max_examples=80, deadline=None)
@given(x=st.floats(0, 90), y=st.floats(0, 90), w=st.floats(0.01, 10), h=st.floats(0.01, 10),
       width=st.integers(8, 5000), height=st.integers(8, 5000))
def test_export_lines_match_the_percent_formula_they_replaced(x, y, w, h, width, height):
    """The old exporter went straight from percent to normalised centre/size; through pixels it is the same."""
    (line,) = _lines(BOX, [rect(x, y, w, h, "Square")], (width, height))
    cls, *vals = line.split()
    assert cls == "0"
    np.testing.assert_allclose([float(v) for v in vals], [(x + w / 2) / 100, (y + h / 2) / 100, w / 100, h / 100],
                               atol=1.01e-6)


@pytest.fixture
def annotated(tmp_path):
    """Tasks annotated from ground truth in all three controls, plus noise the readers must ignore."""
    media = tmp_path / "media"
    media.mkdir()
    tasks, truth = [], {}
    for i, (image, sample) in enumerate(generate_samples(6, seed=11), start=1):
        image.save(media / f"{sample.name}.png")
        w, h = sample.width, sample.height
        result = []
        for o in sample.objects:
            label = o.label.capitalize()
            result.append({"from_name": "box", "to_name": "image", "type": "rectanglelabels",
                           "value": {"x": o.box[0] / w * 100, "y": o.box[1] / h * 100,
                                     "width": (o.box[2] - o.box[0]) / w * 100,
                                     "height": (o.box[3] - o.box[1]) / h * 100, "rectanglelabels": [label]}})
            result.append({"from_name": "poly", "to_name": "image", "type": "polygonlabels",
                           "value": {"points": [[x / w * 100, y / h * 100] for x, y in o.polygon],
                                     "polygonlabels": [label]}})
        result.append({"from_name": "other", "to_name": "image", "type": "rectanglelabels",  # no such control
                       "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["Square"]}})
        result.append({"from_name": "main", "to_name": "image", "type": "choices",
                       "value": {"choices": [sample.objects[0].label.capitalize()]}})
        tasks.append({"id": i, "data": {"image": f"/data/local-files/?d={sample.name}.png"},
                      "annotations": [{"id": 100 + i, "result": result, "was_cancelled": False}]})
        truth[i] = sample
    return tasks, truth, MediaFetcher(MediaSettings(local_files_root=media))


def _label_files(root, split="*"):
    return {int(p.stem.split("_")[0].removeprefix("task")): p for p in root.glob(f"labels/{split}/*.txt")}


@pytest.mark.parametrize("control", ["box", "poly"])
def test_detect_and_segment_targets_are_the_ground_truth(tmp_path, annotated, control):
    tasks, truth, fetcher = annotated
    out = export_yolo_dataset(tasks, CONFIG, 7, fetcher, tmp_path / control, control_name=control, val_percent=50)
    assert out.task == ("detect" if control == "box" else "segment") and out.class_names == NAMES
    assert out.train + out.val == len(tasks) and out.train > 0 and out.val > 0
    files = _label_files(tmp_path / control)
    assert sorted(files) == sorted(truth)
    for task_id, path in files.items():
        sample = truth[task_id]
        lines = path.read_text().splitlines()
        assert len(lines) == len(sample.objects)  # the other control's box is not a target
        det = read_detections(path, (sample.width, sample.height))
        # six decimals of a normalised coordinate; the generator rounds its outlines to 2 decimals of a pixel
        np.testing.assert_allclose(det.xyxy, [o.box for o in sample.objects], atol=1e-3 if control == "box" else 1e-2)
        assert det.class_id.tolist() == [NAMES.index(o.label.capitalize()) for o in sample.objects]
        if control == "poly":  # outlines, normalised
            first = np.array(lines[0].split()[1:], dtype=float).reshape(-1, 2) * [sample.width, sample.height]
            np.testing.assert_allclose(first, sample.objects[0].polygon, atol=1e-3)


@pytest.mark.parametrize("control", ["box", "poly", "main"])
def test_a_task_with_a_label_the_config_no_longer_has_is_left_out_not_trained_as_background(tmp_path, annotated,
                                                                                             control):
    """A label renamed in Label Studio after annotating: its regions would be dropped and their objects trained
    as background. The task is left out, and the reason names the label."""
    import copy

    tasks, truth, fetcher = annotated
    tasks = copy.deepcopy(tasks)
    kind = {"box": "rectanglelabels", "poly": "polygonlabels", "main": "choices"}[control]
    renamed = next(r for r in tasks[1]["annotations"][0]["result"] if r["from_name"] == control)
    renamed["value"][kind] = ["Red, Square"]  # a label with a comma: quoted in the reason
    out = export_yolo_dataset(tasks, CONFIG, 7, fetcher, tmp_path / control, control_name=control, val_percent=50)
    assert out.train + out.val == len(tasks) - 1 and list(out.skipped) == [tasks[1]["id"]]
    assert '"Red, Square", which the labeling config no longer has' in out.skipped[tasks[1]["id"]]
    assert not list((tmp_path / control).rglob(f"task{tasks[1]['id']}_*"))
    vlm = collect_annotations(tasks, CONFIG, 7, fetcher, val_percent=50)
    if control != "poly":  # the VLM examples read boxes and choices
        assert tasks[1]["id"] in vlm.skipped and "Red, Square" in vlm.skipped[tasks[1]["id"]]
        assert not any(i.task_id == tasks[1]["id"] and i.kind == kind for i in vlm.items)


def test_classify_targets_are_class_folders(tmp_path, annotated):
    tasks, truth, fetcher = annotated
    out = export_yolo_dataset(tasks, CONFIG, 7, fetcher, tmp_path / "cls", control_name="main", val_percent=50)
    assert out.task == "classify"
    for task_id, sample in truth.items():
        (png,) = (tmp_path / "cls").glob(f"*/*/task{task_id}_*.png")
        assert png.parent.name == sample.objects[0].label.capitalize()
    # the classes the frozen split has images of, by hand from the split rule (every label has a folder there)
    by_hand = {truth[t["id"]].objects[0].label.capitalize() for t in tasks if is_validation(7, t["id"], 50)}
    assert out.val > 0 and set(out.val_classes()) == by_hand and len(by_hand) < len(NAMES)  # one class has none
    assert all((tmp_path / "cls" / "val" / n).is_dir() for n in out.class_names)


def test_vlm_examples_read_boxes_in_pixels_and_the_choice(annotated):
    tasks, truth, fetcher = annotated
    annotated_set = collect_annotations(tasks, CONFIG, 7, fetcher, val_percent=50)
    by_kind = {(item.task_id, item.kind): item for item in annotated_set.items}
    for task_id, sample in truth.items():
        boxes = by_kind[(task_id, "rectanglelabels")]
        np.testing.assert_allclose(boxes.boxes, [o.box for o in sample.objects], atol=1e-6)
        assert boxes.box_labels == [o.label.capitalize() for o in sample.objects]
        assert by_kind[(task_id, "choices")].choice == sample.objects[0].label.capitalize()


def test_auto_accepted_labels_train_only_when_asked_and_never_judge_the_gate(tmp_path, annotated):
    """`tandem accept`'s annotations (every region marked) stay out of the frozen split always, and out of
    training unless asked for; a human's annotation with the same boxes is exported as before."""
    from active_learning.queue import AUTO_MARKER
    from backend.training.export import is_validation

    tasks, truth, fetcher = annotated
    marked = {1, 2, 3, 4}
    for task in tasks:
        if task["id"] in marked:
            for region in task["annotations"][0]["result"]:
                region["meta"] = {"text": [AUTO_MARKER]}
    in_val = {t for t in marked if is_validation(7, t, 50)}
    assert in_val and in_val != marked  # the seeds put marked tasks on both sides of the split

    default = export_yolo_dataset(tasks, CONFIG, 7, fetcher, tmp_path / "default", control_name="box", val_percent=50)
    assert sorted(_label_files(tmp_path / "default")) == [5, 6]
    assert (default.auto_accepted, default.auto_left_out) == (0, len(marked))

    asked = export_yolo_dataset(tasks, CONFIG, 7, fetcher, tmp_path / "asked", control_name="box", val_percent=50,
                                auto_accepted=True)
    assert sorted(_label_files(tmp_path / "asked", "train")) == sorted((marked - in_val) | {t for t in (5, 6)
                                                                                          if not is_validation(7, t, 50)})
    assert not set(_label_files(tmp_path / "asked", "val")) & marked  # the gate judges on people's labels only
    assert (asked.auto_accepted, asked.auto_left_out) == (len(marked - in_val), len(in_val))


def test_the_export_counts_frozen_regions_accepted_unchanged_from_a_pre_annotation(tmp_path, annotated):
    """Label Studio's editor saves origin "prediction" on a region until someone moves or redraws it: the gate
    reads the frozen split's share of them. Counted per control, on the frozen split only."""
    from backend.training.export import is_validation

    tasks, truth, fetcher = annotated
    for task in tasks:  # every box region of task 1..3 accepted unchanged; the rest edited or drawn
        for region in task["annotations"][0]["result"]:
            region["origin"] = "prediction" if task["id"] <= 3 and region["from_name"] == "box" else (
                "prediction-changed" if task["id"] == 4 else "manual")
    out = export_yolo_dataset(tasks, CONFIG, 7, fetcher, tmp_path / "box", control_name="box", val_percent=50)
    val = [t for t in tasks if is_validation(7, t["id"], 50)]
    boxes = {t["id"]: sum(r["from_name"] == "box" for r in t["annotations"][0]["result"]) for t in val}
    assert out.val_regions == sum(boxes.values()) > 0  # the Hexagon region counts: a region the person kept
    assert out.val_unchanged == sum(n for t, n in boxes.items() if t <= 3)
    assert 0 < out.unchanged_share < 1
    poly = export_yolo_dataset(tasks, CONFIG, 7, fetcher, tmp_path / "poly", control_name="poly", val_percent=50)
    assert poly.val_unchanged == 0 and poly.val_regions > 0


@settings(max_examples=200, deadline=None)
@given(project=st.integers(1, 10_000), ids=st.lists(st.integers(1, 10**6), min_size=1, max_size=60, unique=True),
       cut=st.integers(1, 60))
def test_the_frozen_split_keeps_two_tasks_from_ten_on_and_never_moves_a_training_task_into_it(project, ids, cut):
    """The hash rule alone leaves 10 annotated tasks without a validation task 11% of the time. Topped up to 2
    from 10 tasks on, with the lowest-hash others; as annotations are added (a prefix grows to the whole list),
    a task once trained on never enters the split, and a task the hash rule puts in stays there."""
    from backend.training.export import MIN_VAL_TASKS, TOP_UP_FROM, frozen_split

    before, after = ids[: min(cut, len(ids))], ids
    val_before, val_after = frozen_split(project, before), frozen_split(project, after)
    hashed = {t for t in after if is_validation(project, t)}
    assert hashed <= val_after <= set(after)
    if len(after) >= TOP_UP_FROM:
        assert len(val_after) >= min(MIN_VAL_TASKS, len(after)) and (len(val_after) == len(hashed) or
                                                                      len(val_after) == MIN_VAL_TASKS)
    else:
        assert val_after == hashed
    if len(before) >= TOP_UP_FROM:  # a job on the smaller set trained on before − val_before
        assert not (val_after & (set(before) - val_before))


def test_the_frozen_split_tops_up_a_project_the_hash_left_without_one():
    from backend.training.export import frozen_split

    project = next(p for p in range(1, 10_000) if not any(is_validation(p, t) for t in range(1, 11)))
    val = frozen_split(project, range(1, 11))
    assert len(val) == 2 and frozen_split(project, range(1, 10)) == set()  # below 10 tasks: the hash alone
    assert frozen_split(project, range(1, 11), val_percent=0) == set()  # asked for no split: none


def test_an_auto_accepted_annotation_saved_again_by_a_person_is_theirs():
    """The editor keeps a moved region's meta, marker and all: what says the annotation is now a person's is
    that it was saved again after `tandem accept` wrote it."""
    from datetime import UTC, datetime

    from active_learning.queue import AUTO_MARKER, is_auto_accepted

    region = rect(10, 10, 20, 20, "Square")
    region["meta"] = {"text": [AUTO_MARKER]}
    written = {"result": [region], "created_at": "2026-12-07T10:00:00.100000Z", "updated_at": "2026-12-07T10:00:00.300000Z"}
    assert is_auto_accepted(written) and is_auto_accepted({"result": [region]})  # no times: the marker decides
    assert not is_auto_accepted({**written, "updated_at": "2026-12-07T10:03:00Z"})
    sdk = {"result": [region], "created_at": datetime(2026, 12, 7, 10, 0, tzinfo=UTC),  # the SDK's datetimes
           "updated_at": datetime(2026, 12, 7, 10, 3, tzinfo=UTC)}
    assert not is_auto_accepted(sdk)
    assert not is_auto_accepted({"result": [rect(10, 10, 20, 20, "Square")]})  # no marker


def test_the_export_tops_up_the_split_from_people_s_tasks_only(tmp_path):
    """Auto-accepted tasks never judge the gate, so they are not drawn to top the split up either."""
    from active_learning.queue import AUTO_MARKER
    from backend.training.export import frozen_split

    media = tmp_path / "media"
    media.mkdir()
    items = generate_samples(14, seed=3)
    project = next(p for p in range(1, 10_000) if not any(is_validation(p, t) for t in range(1, 15)))
    tasks = []
    for i, (image, sample) in enumerate(items, start=1):
        image.save(media / f"{sample.name}.png")
        w, h = sample.width, sample.height
        o = sample.objects[0]
        region = rect(o.box[0] / w * 100, o.box[1] / h * 100, (o.box[2] - o.box[0]) / w * 100,
                      (o.box[3] - o.box[1]) / h * 100, o.label.capitalize())
        if i <= 4:
            region["meta"] = {"text": [AUTO_MARKER]}
        tasks.append({"id": i, "data": {"image": f"/data/local-files/?d={sample.name}.png"},
                      "annotations": [{"id": 100 + i, "result": [region], "was_cancelled": False}]})
    fetcher = MediaFetcher(MediaSettings(local_files_root=media))
    out = export_yolo_dataset(tasks, CONFIG, project, fetcher, tmp_path / "ds", control_name="box")
    expected = frozen_split(project, range(5, 15))
    assert out.val == 2 and sorted(_label_files(tmp_path / "ds", "val")) == sorted(expected)
    assert out.train == 8 and out.auto_left_out == 4
