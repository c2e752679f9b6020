"""Mask disagreement on hand-made masks: IoU by hand, the same reasons as boxes (only one model sees it,
poorly localised, class swap) said of masks, outlines against masks, and scoring switching to masks only
when both models carry them."""

from __future__ import annotations

import numpy as np
import pytest
import supervision as sv

from active_learning.masks import carry_masks, mask_iou
from active_learning.scoring import score_outputs
from backend.core.prediction import CLASS_NAME, POLYGON, Prediction
from backend.labeling.geometry import mask_to_polygon

H, W = 40, 60
NAMES = ["cat", "dog"]


def rect(x0, y0, x1, y1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def seg(masks, names, scores, outlines_only=False):
    if not masks:
        det = sv.Detections(xyxy=np.zeros((0, 4)), mask=np.zeros((0, H, W), bool), confidence=np.zeros(0),
                            class_id=np.zeros(0, int), data={CLASS_NAME: np.array([], dtype=object)})
        return Prediction(detections=det)
    m = np.stack(masks)
    det = sv.Detections(xyxy=sv.mask_to_xyxy(m).astype(float), mask=None if outlines_only else m,
                        confidence=np.array(scores, float), class_id=np.array([NAMES.index(n) for n in names]),
                        data={CLASS_NAME: np.array(names, dtype=object)})
    if outlines_only:  # what a YOLO-seg model gives
        outlines = np.empty(len(m), dtype=object)
        outlines[:] = [mask_to_polygon(x, tolerance=0.0) for x in m]
        det.data[POLYGON] = outlines
    return Prediction(detections=det)


def test_mask_iou_by_hand():
    a = np.stack([rect(0, 0, 10, 10), rect(20, 0, 30, 10)])
    b = np.stack([rect(5, 0, 15, 10), rect(40, 30, 50, 40), rect(0, 0, 10, 10)])
    np.testing.assert_allclose(mask_iou(a, b), [[50 / 150, 0, 1], [0, 0, 0]])
    assert mask_iou(a[:0], b).shape == (0, 3)


def test_identical_masks_agree_and_the_reasons_name_masks():
    cat = rect(5, 5, 25, 25)
    a = [seg([cat], ["cat"], [0.9]), seg([cat], ["cat"], [0.9]), seg([cat], ["cat"], [0.9]), seg([cat], ["cat"], [0.9])]
    b = [seg([cat], ["cat"], [0.9]),
         seg([cat, rect(40, 10, 55, 30)], ["cat", "dog"], [0.9, 0.8]),  # a dog only the second model sees
         seg([cat], ["dog"], [0.9]),  # the same mask, another class
         seg([rect(5, 5, 12, 25)], ["cat"], [0.9])]  # a third of the cat: poorly localised
    t = score_outputs(a, NAMES, b, NAMES, model_names=("CNN", "SAM 3"))
    assert t.disagreement[0] == 0 and t.reasons[0].endswith("SAM 3 agrees")
    assert "1 mask only SAM 3 sees (dog)" in t.reasons[1]
    assert "1 class swap (CNN cat, SAM 3 dog)" in t.reasons[2]
    assert "1 poorly localised" in t.reasons[3]
    assert (t.disagreement[1:] > 0).all()


def test_boxes_that_agree_do_not_hide_masks_that_do_not():
    """Two diagonal halves of one square have the same box (box IoU 1) and a mask IoU of about 0."""
    yy, xx = np.mgrid[:H, :W]
    square = rect(10, 5, 40, 35)
    upper, lower = square & (xx - 10 > yy - 5), square & (xx - 10 <= yy - 5)
    a, b = [seg([upper], ["cat"], [0.9])], [seg([lower], ["cat"], [0.9])]
    masked = score_outputs(a, NAMES, b, NAMES)
    assert masked.disagreement[0] > 0.9 and "poorly localised" not in masked.reasons[0]  # IoU 0: not even a pair
    assert "1 mask only CNN sees" in masked.reasons[0] and "1 mask only VLM sees" in masked.reasons[0]
    boxes = [p.with_meta(detections=sv.Detections(xyxy=p.detections.xyxy, confidence=p.detections.confidence,
                                                  class_id=p.detections.class_id, data=dict(p.detections.data)))
             for p in (*a, *b)]
    assert not carry_masks(boxes[:1], boxes[1:])
    assert score_outputs(boxes[:1], NAMES, boxes[1:], NAMES).disagreement[0] < 0.1  # boxes alone: near agreement


def test_a_yolo_seg_outline_against_a_sam_mask_is_filled_and_ranked():
    """Outlines only (YOLO-seg) vs masks (SAM 3): the same shapes agree; images rank by how much differs."""
    cat, dog = rect(5, 5, 25, 25), rect(35, 10, 55, 35)
    cnn = [seg([cat, dog], ["cat", "dog"], [0.9, 0.9], outlines_only=True),
           seg([cat, dog], ["cat", "dog"], [0.9, 0.9], outlines_only=True),
           seg([cat, dog], ["cat", "dog"], [0.9, 0.9], outlines_only=True)]
    sam = [seg([cat, dog], ["cat", "dog"], [0.9, 0.9]),
           seg([cat, rect(35, 10, 43, 35)], ["cat", "dog"], [0.9, 0.9]),
           seg([], [], [])]
    assert carry_masks(cnn, sam) and not carry_masks(cnn, cnn)  # outlines on both sides: the box path as before
    t = score_outputs(cnn, NAMES, sam, NAMES, model_names=("CNN", "SAM 3"), aggregate="capped_sum")
    assert t.disagreement[0] == pytest.approx(0.0, abs=1e-9)
    assert 0 < t.disagreement[1] < t.disagreement[2]
    assert "1 poorly localised" in t.reasons[1] and "2 masks only CNN sees (cat, dog)" in t.reasons[2]
    assert list(np.argsort(-t.disagreement, kind="stable")) == [2, 1, 0]
