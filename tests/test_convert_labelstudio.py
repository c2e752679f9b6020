"""Label Studio results <-> Prediction, and YOLO label files <-> pixels: hand-computed cases and round trips
(results -> Prediction -> results gives the same regions)."""

import numpy as np
import pytest
import supervision as sv
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.convert import yolo_txt
from backend.convert.labelstudio import WRITERS, from_results, to_results
from backend.core.labels import LabelSpace
from backend.core.prediction import CLASS_NAME, POLYGON, Prediction
from backend.labeling import results as legacy_results
from backend.labeling.config import ControlKind, parse_label_config

CONFIG = parse_label_config("""<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="Square"/><Label value="Circle" alias="C"/></RectangleLabels>
<PolygonLabels name="poly" toName="image"><Label value="Square"/><Label value="Circle"/></PolygonLabels>
<Choices name="shape" toName="image"><Choice value="Square"/><Choice value="Circle"/><Choice value="Triangle"/></Choices>
</View>""")
BOX, POLY, CHOICE = CONFIG.controls


def rect(x, y, w, h, label, score=None, from_name="box", size=(640, 480)):
    region = {"from_name": from_name, "to_name": "image", "type": "rectanglelabels", "original_width": size[0],
              "original_height": size[1], "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                                                    "rectanglelabels": [label]}}
    if score is not None:
        region["score"] = score
    return region


def test_rectangles_to_pixels_hand_computed():
    results = [rect(10, 10, 40, 40, "Square"), rect(50, 25, 25, 50, "C", score=0.42),
               rect(0, 0, 10, 10, "Square", from_name="other"),  # another control: ignored
               {"from_name": "shape", "type": "choices", "value": {"choices": ["Square"]}}]
    p = from_results(results, BOX, (640, 480))
    np.testing.assert_allclose(p.detections.xyxy, [[64, 48, 320, 240], [320, 120, 480, 360]])
    np.testing.assert_allclose(p.detections.confidence, [1.0, 0.42])  # an annotation has no score: certain
    assert p.detections.class_id.tolist() == [0, 1]
    assert list(p.detections.data[CLASS_NAME]) == ["Square", "C"]  # result values: the alias
    assert p.class_names == ("Square", "C") and p.probabilities is None


def test_size_comes_from_each_region_when_not_given():
    p = from_results([rect(10, 10, 40, 40, "Square", size=(100, 200)), rect(10, 10, 40, 40, "C", size=(300, 50))],
                     BOX)
    np.testing.assert_allclose(p.detections.xyxy, [[10, 20, 50, 100], [30, 5, 150, 25]])
    bare = rect(1, 1, 1, 1, "Square")
    del bare["original_width"]
    with pytest.raises(ValueError, match="original_width"):
        from_results([bare], BOX)


def test_unknown_labels_are_skipped_or_raise_and_empty_boxes_are_skipped():
    results = [rect(10, 10, 40, 40, "Hexagon"), rect(10, 10, 0, 40, "Square"), rect(10, 10, 40, 40, "Square")]
    p = from_results(results, BOX, (640, 480))
    assert len(p.detections) == 1 and p.detections.class_id.tolist() == [0]
    with pytest.raises(ValueError, match="'Hexagon' is not one of Square, C"):
        from_results(results, BOX, (640, 480), unknown="raise")
    # label_names choose what class_id indexes
    q = from_results(results, BOX, (640, 480), label_names=["C", "Square"])
    assert q.detections.class_id.tolist() == [1] and q.class_names == ("C", "Square")


def test_empty_result_is_an_empty_prediction():
    p = from_results([], BOX, (640, 480))
    assert len(p.detections) == 0 and p.detections.xyxy.shape == (0, 4) and list(p.detections.data[CLASS_NAME]) == []
    assert to_results(p, BOX, (640, 480)) == []


def test_every_rectangle_control_by_kind():
    results = [rect(10, 10, 40, 40, "Square"), rect(0, 0, 50, 50, "Dog", from_name="other")]
    p = from_results(results, ControlKind.RECTANGLE, (100, 100), ["Square", "Dog"])
    np.testing.assert_allclose(p.detections.xyxy, [[10, 10, 50, 50], [0, 0, 50, 50]])
    with pytest.raises(ValueError, match="label_names"):
        from_results(results, ControlKind.RECTANGLE, (100, 100))


def test_polygons_to_pixels_with_their_bounding_box():
    results = [{"from_name": "poly", "type": "polygonlabels", "score": 0.8,
                "value": {"points": [[10, 10], [50, 10], [30, 60]], "closed": True, "polygonlabels": ["Circle"]}},
               {"from_name": "poly", "type": "polygonlabels",
                "value": {"points": [[1, 1], [2, 2]], "polygonlabels": ["Square"]}}]  # 2 points: not an area
    p = from_results(results, POLY, (200, 100))
    assert len(p.detections) == 1 and p.detections.class_id.tolist() == [1]
    np.testing.assert_allclose(p.detections.data[POLYGON][0], [[20, 10], [100, 10], [60, 60]])
    np.testing.assert_allclose(p.detections.xyxy, [[20, 10, 100, 60]])
    np.testing.assert_allclose(p.detections.confidence, [0.8])


def test_choices_to_a_probability_vector():
    chosen = from_results([{"from_name": "shape", "type": "choices", "value": {"choices": ["Circle"]}}], CHOICE)
    np.testing.assert_array_equal(chosen.probabilities, [0, 1, 0])
    assert chosen.class_names == ("Square", "Circle", "Triangle") and chosen.detections is None
    scored = from_results([{"from_name": "shape", "type": "choices", "score": 0.6, "value": {"choices": ["Triangle"]}}],
                          CHOICE)
    np.testing.assert_allclose(scored.probabilities, [0, 0, 0.6])
    zero = [{"from_name": "shape", "to_name": "image", "type": "choices", "score": 0.0, "value": {"choices": ["Circle"]}}]
    _same(to_results(from_results(zero, CHOICE), CHOICE), zero)  # a zero score keeps its choice
    none = from_results([{"from_name": "shape", "type": "choices", "value": {"choices": ["Hexagon"]}}], CHOICE)
    assert none.probabilities is None and to_results(none, CHOICE) == []


def test_a_choice_the_model_places_outside_the_labels_is_not_pre_annotated():
    """A square/star project, a circle/square/triangle classifier: on a circle its best label is Square at
    0.16, which is no answer; on a square it answers Square with the class's own probability."""
    control = parse_label_config("""<View><Image name="image" value="$image"/><Choices name="shape" toName="image">
<Choice value="Square"/><Choice value="Star"/></Choices></View>""").controls[0]
    classes = ("circle", "square", "triangle")
    space = LabelSpace.build(control, classes)
    circle, square = (Prediction(probabilities=np.array(p)) for p in ([0.84, 0.156, 0.004], [0.3, 0.6, 0.1]))
    assert to_results(circle, control, labels=space, class_names=classes) == []
    (region,) = to_results(square, control, labels=space, class_names=classes)
    assert region["value"] == {"choices": ["Square"]} and region["score"] == pytest.approx(0.6)


def _same(a, b):
    """Regions equal apart from their random ids."""
    assert [{k: v for k, v in r.items() if k != "id"} for r in a] == [{k: v for k, v in r.items() if k != "id"} for r in b]


def test_round_trip_hand_written_regions():
    boxes = [dict(rect(10.5, 20.25, 30.125, 40.0, "Square", score=0.9), image_rotation=0),
             dict(rect(0, 0, 100, 100, "C", score=0.3), image_rotation=0)]
    _same(to_results(from_results(boxes, BOX), BOX, (640, 480)), boxes)

    polygons = [{"from_name": "poly", "to_name": "image", "type": "polygonlabels", "original_width": 640,
                 "original_height": 480, "image_rotation": 0, "score": 0.75,
                 "value": {"points": [[10.125, 20.5], [50.0, 20.5], [30.333, 60.001]], "closed": True,
                           "polygonlabels": ["Circle"]}}]
    _same(to_results(from_results(polygons, POLY), POLY, (640, 480)), polygons)

    choice = [{"from_name": "shape", "to_name": "image", "type": "choices", "score": 0.55,
               "value": {"choices": ["Triangle"]}}]
    _same(to_results(from_results(choice, CHOICE), CHOICE), choice)


@settings(max_examples=60, deadline=None)
@given(w=st.integers(16, 4000), h=st.integers(16, 4000),
       boxes=st.lists(st.tuples(st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.01, 0.1), st.floats(0.01, 0.1),
                                st.sampled_from(["square", "circle"]), st.floats(0.05, 1.0)), max_size=6))
def test_round_trip_model_output_through_label_studio(w, h, boxes):
    """A model's detections written as regions, read back and written again: the same regions."""
    xyxy = np.array([[x * w, y * h, (x + bw) * w, (y + bh) * h] for x, y, bw, bh, _, _ in boxes]).reshape(-1, 4)
    names = np.array([b[4] for b in boxes], dtype=object)
    outlines = np.empty(len(boxes), dtype=object)
    for i, (x1, y1, x2, y2) in enumerate(xyxy):
        outlines[i] = np.array([[x1, y1], [x2, y1], [(x1 + x2) / 2, y2]])
    det = sv.Detections(xyxy=xyxy, confidence=np.array([b[5] for b in boxes]), class_id=np.zeros(len(boxes), int),
                        data={CLASS_NAME: names, POLYGON: outlines})
    for control in (BOX, POLY):
        labels = LabelSpace.build(control, ["square", "circle"])
        first = WRITERS[control.kind].regions(control, labels, Prediction(detections=det), (), (w, h))
        assert len(first) == len(boxes)
        back = from_results(first, control)  # the size from each region's original_width/height
        _same(to_results(back, control, (w, h)), first)
        # pixels survive to within the 4 (boxes) or 3 (points) decimals of percent Label Studio is sent
        np.testing.assert_allclose(back.detections.xyxy, xyxy, atol=1e-3 / 100 * max(w, h))


@given(p=st.lists(st.floats(0, 1), min_size=3, max_size=3).filter(lambda p: sum(p) > 0 and max(p) > 0))
def test_round_trip_classifier_output(p):
    labels = LabelSpace.build(CHOICE, ["square", "circle", "triangle"])
    first = WRITERS[ControlKind.CHOICES].regions(CHOICE, labels, Prediction(probabilities=np.array(p)),
                                                 ("square", "circle", "triangle"), (10, 10))
    _same(to_results(from_results(first, CHOICE), CHOICE), first)


def test_to_results_needs_a_size_for_geometry():
    with pytest.raises(ValueError, match="image size"):
        to_results(Prediction(detections=sv.Detections.empty()), BOX)


def test_writers_are_still_importable_from_labeling_results():
    assert legacy_results.WRITERS is WRITERS and legacy_results.prediction_score([{"score": 0.5}, {"score": 1}]) == 0.75


# -- YOLO label files ------------------------------------------------------------------------------------------------


def test_yolo_lines_read_back_to_pixels(tmp_path):
    xyxy = np.array([[64, 48, 320, 240], [0, 0, 640, 480]], float)
    lines = yolo_txt.box_lines(xyxy, [2, 0], (640, 480))
    assert lines == ["2 0.300000 0.300000 0.400000 0.400000", "0 0.500000 0.500000 1.000000 1.000000"]
    (tmp_path / "a.txt").write_text("\n".join(lines + ["1 0.1 0.2 0.3 0.2 0.2 0.4"]) + "\n")
    det = yolo_txt.read_detections(tmp_path / "a.txt", (640, 480))
    np.testing.assert_allclose(det.xyxy, [*xyxy, [64, 96, 192, 192]], atol=1e-3)  # a polygon: its bounding box
    assert det.class_id.tolist() == [2, 0, 1]
    assert len(yolo_txt.read_detections(tmp_path / "missing.txt", (640, 480))) == 0
