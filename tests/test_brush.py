"""BrushLabels: masks written as Label Studio's RLE by the SDK's encoder and read back by the SDK's decoder,
outlines from masks, and a BrushLabels config served by a mask-producing model (the starter YOLO-seg)."""

from __future__ import annotations

import numpy as np
import pytest
import supervision as sv
from label_studio_sdk.converter.brush import decode_from_annotation, decode_rle

from backend.convert.brush import mask_to_rle, polygon_to_mask, rle_to_mask
from backend.convert.labelstudio import WRITERS, from_results, to_results
from backend.core.prediction import CLASS_NAME, POLYGON, Prediction
from backend.labeling.config import ControlKind, parse_label_config
from backend.labeling.geometry import mask_to_polygon

CONFIG = parse_label_config("""<View><Image name="image" value="$image"/>
<BrushLabels name="brush" toName="image"><Label value="Square"/><Label value="Circle"/></BrushLabels>
</View>""")
(BRUSH,) = CONFIG.controls
W, H = 97, 61  # odd sizes: rows and columns must not be swapped


def _disc(cx, cy, r, w=W, h=H):
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _rect(x0, y0, x1, y1, w=W, h=H):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_brush_labels_is_a_control():
    assert BRUSH.kind is ControlKind.BRUSH and [lab.value for lab in BRUSH.labels] == ["Square", "Circle"]
    assert WRITERS[ControlKind.BRUSH].tasks == {"segment"}


@pytest.mark.parametrize("mask", [_disc(40, 30, 17), _rect(5, 7, 60, 50), _rect(0, 0, W, H), np.zeros((H, W), bool),
                                  np.random.default_rng(0).random((H, W)) > 0.5])
def test_rle_round_trip_through_the_sdk_decoder_equals_the_mask(mask):
    rle = mask_to_rle(mask)
    assert all(isinstance(v, int) and 0 <= v < 256 for v in rle)
    decoded = decode_rle(rle).reshape(H, W, 4)  # the SDK's own decoder, as Label Studio's converter reads it
    assert np.array_equal(decoded[:, :, 3] > 127, mask)
    assert np.array_equal(rle_to_mask(rle, W, H), mask)
    with pytest.raises(ValueError, match="not 96 x 61"):
        rle_to_mask(rle, W - 1, H)


@pytest.mark.parametrize("mask", [_disc(40, 30, 17), _disc(70, 20, 9), _rect(5, 7, 60, 50), _rect(30, 10, 34, 50)])
def test_polygons_from_masks_cover_the_mask(mask):
    outline = mask_to_polygon(mask)
    assert outline is not None and outline.shape[1] == 2
    assert _iou(polygon_to_mask(outline, W, H), mask) >= 0.9


def test_a_rectangle_outline_fills_back_to_exactly_its_pixels():
    mask = _rect(5, 7, 60, 50)
    assert np.array_equal(polygon_to_mask(mask_to_polygon(mask, tolerance=0.0), W, H), mask)


def _masks_prediction(masks, names, scores):
    masks = np.stack(masks)
    det = sv.Detections(xyxy=sv.mask_to_xyxy(masks).astype(float), mask=masks, confidence=np.array(scores),
                        class_id=np.arange(len(names)), data={CLASS_NAME: np.array(names, dtype=object)})
    return Prediction(detections=det, class_names=tuple(names))


def test_writer_then_reader_gives_back_the_masks_labels_and_scores():
    masks = [_disc(40, 30, 17), _rect(70, 5, 90, 25)]
    pred = _masks_prediction(masks, ["Square", "Circle"], [0.9, 0.35])
    regions = to_results(pred, BRUSH, (W, H))
    assert [r["type"] for r in regions] == ["brushlabels"] * 2
    assert [r["value"]["brushlabels"] for r in regions] == [["Square"], ["Circle"]]
    assert [r["value"]["format"] for r in regions] == ["rle", "rle"]
    assert [r["score"] for r in regions] == [0.9, 0.35]
    assert all(r["original_width"] == W and r["original_height"] == H for r in regions)
    # the SDK's converter reads what the writer wrote (it expects the value's keys at the region's top level)
    layers = decode_from_annotation("brush", [{**r, **r["value"]} for r in regions])
    assert [np.array_equal(layer > 127, m) for layer, m in zip(layers.values(), masks, strict=True)] == [True, True]
    back = from_results(regions, BRUSH)
    det = back.detections
    assert det.mask.shape == (2, H, W) and np.array_equal(det.mask, np.stack(masks))
    assert list(det.data[CLASS_NAME]) == ["Square", "Circle"] and det.class_id.tolist() == [0, 1]
    np.testing.assert_allclose(det.confidence, [0.9, 0.35])
    np.testing.assert_allclose(det.xyxy[1], [70, 5, 90, 25])
    assert all(_iou(polygon_to_mask(p, W, H), m) >= 0.9 for p, m in zip(det.data[POLYGON], masks, strict=True))


def test_outlines_alone_fill_brush_regions_and_empty_masks_or_unknown_labels_are_skipped():
    """A YOLO-seg model gives outlines, no masks: they are filled."""
    square = _rect(10, 10, 40, 30)
    det = sv.Detections(xyxy=np.array([[10, 10, 40, 30], [0, 0, 5, 5], [50, 10, 60, 20]], float),
                        confidence=np.array([0.8, 0.7, 0.6]), class_id=np.array([0, 1, 2]),
                        data={CLASS_NAME: np.array(["Square", "Circle", "Hexagon"], dtype=object)})
    outlines = np.empty(3, dtype=object)
    outlines[0] = mask_to_polygon(square)
    outlines[2] = mask_to_polygon(_rect(50, 10, 60, 20))
    det.data[POLYGON] = outlines  # the circle has no outline
    regions = to_results(Prediction(detections=det), BRUSH, (W, H))
    assert len(regions) == 1 and regions[0]["value"]["brushlabels"] == ["Square"]
    assert np.array_equal(rle_to_mask(regions[0]["value"]["rle"], W, H), square)
    boxes_only = Prediction(detections=sv.Detections(xyxy=det.xyxy, confidence=det.confidence, class_id=det.class_id,
                                                     data={CLASS_NAME: det.data[CLASS_NAME]}))
    assert to_results(boxes_only, BRUSH, (W, H)) == []  # boxes alone are no mask


def test_a_brush_config_is_served_by_the_starter_segment_model(segment_adapter, tmp_path):
    """Any mask-producing model fills BrushLabels: the YOLO-seg starter on a generated shapes image."""
    from backend.datasets.shapes import render_sample
    from backend.predict import plan_for

    config = """<View><Image name="image" value="$image"/>
<BrushLabels name="brush" toName="image"><Label value="Square"/><Label value="Circle"/><Label value="Triangle"/>
</BrushLabels></View>"""
    plan = plan_for(segment_adapter, config)
    assert [p.control.kind for p in plan.controls] == [ControlKind.BRUSH]
    image, _ = render_sample(np.random.default_rng(3), "brush", size=(160, 160))
    out = plan.controls[0].adapter.predict([image])[0]
    regions = WRITERS[ControlKind.BRUSH].regions(plan.controls[0].control, plan.controls[0].labels, out,
                                                 segment_adapter.class_names, image.size)
    assert regions, "the starter segment model finds the shapes"
    back = from_results(regions, plan.controls[0].control, image.size)
    for outline, mask in zip(out.detections.data[POLYGON], back.detections.mask, strict=False):
        assert _iou(polygon_to_mask(outline, *image.size), mask) == 1.0


def test_brush_annotations_export_as_yolo_segment_lines():
    """A BrushLabels project trains a segment model: each brushed mask becomes its outline's YOLO-seg line."""
    from backend.training.export import TASK_FOR_CONTROL, _lines

    mask = _rect(10, 6, 50, 40)
    regions = to_results(_masks_prediction([mask], ["Circle"], [1.0]), BRUSH, (W, H))
    assert TASK_FOR_CONTROL[ControlKind.BRUSH] == "segment"
    (line,) = _lines(BRUSH, regions, (W, H))
    cls, *coords = line.split()
    xy = np.array(coords, float).reshape(-1, 2) * [W, H]
    assert cls == "1" and _iou(polygon_to_mask(xy, W, H), mask) >= 0.9
