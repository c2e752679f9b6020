"""Agreement between two models' predictions: matching and verdicts on hand-computed cases."""

import numpy as np
import pytest
import supervision as sv

from active_learning.agreement import AgreementTable, agreed, box_iou, match, task_agreement, verify
from backend.core.prediction import CLASS_NAME, POLYGON, Prediction

NAMES = ("Cat", "Dog")


def boxes(xyxy, classes, conf=None, polygons=None):
    xyxy = np.asarray(xyxy, float).reshape(-1, 4)
    data = {CLASS_NAME: np.array(classes, dtype=object)}
    if polygons is not None:
        arr = np.empty(len(polygons), dtype=object)
        for i, p in enumerate(polygons):
            arr[i] = None if p is None else np.asarray(p, float)
        data[POLYGON] = arr
    ids = np.array([NAMES.index(c) for c in classes], int)
    confidence = np.ones(len(xyxy)) if conf is None else np.asarray(conf, float)
    return Prediction(detections=sv.Detections(xyxy=xyxy, confidence=confidence, class_id=ids, data=data),
                      class_names=NAMES)


def test_box_iou_hand_computed():
    # [0,0,10,10] vs [5,0,15,10]: intersection 50, union 150
    np.testing.assert_allclose(box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10], [20, 20, 30, 30]]), [[1 / 3, 0]])


def test_identical_boxes_are_a_candidate_scored_by_the_weaker_vote():
    a = boxes([[0, 0, 10, 10], [20, 20, 40, 40]], ["Cat", "Dog"], conf=[0.9, 0.8])
    b = boxes([[20, 20, 40, 40], [0, 0, 10, 10]], ["Dog", "Cat"], conf=[0.6, 0.95])
    v = task_agreement(a, b)
    assert v.candidate and v.matched == 2 and v.only_a == v.only_b == 0
    m = v.match
    assert sorted(zip(m.rows.tolist(), m.cols.tolist())) == [(0, 1), (1, 0)]
    np.testing.assert_allclose(sorted(v.pair_scores), [0.6, 0.9])  # IoU 1 × min(conf)
    assert v.score == pytest.approx(0.6)


def test_shifted_box_scores_iou_times_min_confidence():
    # [0,0,10,10] vs [0,0,10,8]: IoU 80/100 = 0.8; min conf 0.5 -> 0.4
    v = task_agreement(boxes([[0, 0, 10, 10]], ["Cat"], [0.5]), boxes([[0, 0, 10, 8]], ["Cat"], [0.9]))
    assert v.candidate and v.score == pytest.approx(0.4)


def test_a_box_seen_by_one_model_only_blocks_auto_accept():
    a = boxes([[0, 0, 10, 10], [50, 50, 60, 60]], ["Cat", "Cat"])
    b = boxes([[0, 0, 10, 10]], ["Cat"])
    v = task_agreement(a, b)
    assert v.matched == 1 and v.only_a == 1 and v.only_b == 0
    assert not v.candidate and not v.accepted(0.0)
    assert task_agreement(b, a).only_b == 1 and not task_agreement(b, a).candidate


def test_class_swap_and_poor_overlap_do_not_match():
    swap = task_agreement(boxes([[0, 0, 10, 10]], ["Cat"]), boxes([[0, 0, 10, 10]], ["Dog"]))
    assert swap.matched == 0 and swap.only_a == swap.only_b == 1 and not swap.candidate
    # IoU 1/3 < 0.5: no match at the default, a match at iou=0.3
    a, b = boxes([[0, 0, 10, 10]], ["Cat"]), boxes([[5, 0, 15, 10]], ["Cat"])
    assert match(a, b).matched == 0
    assert match(a, b, iou=0.3).matched == 1


def test_hungarian_prefers_the_one_to_one_assignment():
    # IoU a0-b0 .9, a0-b1 .7, a1-b0 8/9, a1-b1 7/8: the best one-to-one sum is a0-b0 + a1-b1 (1.775 > 1.589)
    a = boxes([[0, 0, 10, 10], [0, 0, 10, 8]], ["Cat", "Cat"])
    b = boxes([[0, 0, 10, 9], [0, 0, 10, 7]], ["Cat", "Cat"])
    m = match(a, b)
    assert m.matched == 2
    assert sorted(zip(m.rows.tolist(), m.cols.tolist())) == [(0, 0), (1, 1)]


def test_both_empty_is_no_candidate():
    e = Prediction(detections=sv.Detections.empty(), class_names=NAMES)
    v = task_agreement(e, e)
    assert v.matched == 0 and not v.candidate and v.kind == "empty"


def test_polygons_match_by_area_not_box():
    # two triangles with the same bounding box but opposite halves: box IoU 1, polygon IoU 0
    tri_a = [[0, 0], [100, 0], [0, 100]]
    tri_b = [[100, 0], [100, 100], [0, 100]]
    a = boxes([[0, 0, 100, 100]], ["Cat"], polygons=[tri_a])
    b = boxes([[0, 0, 100, 100]], ["Cat"], polygons=[tri_b])
    assert match(a, b).matched == 0 and match(a, b).kind == "masks"
    same = match(a, boxes([[0, 0, 100, 100]], ["Cat"], polygons=[tri_a]))
    assert same.matched == 1 and same.iou[0] == pytest.approx(1.0)
    # a square polygon against half of it: IoU 0.5 (up to the raster)
    sq = boxes([[0, 0, 100, 100]], ["Cat"], polygons=[[[0, 0], [100, 0], [100, 100], [0, 100]]])
    half = boxes([[0, 0, 100, 50]], ["Cat"], polygons=[[[0, 0], [100, 0], [100, 50], [0, 50]]])
    assert match(sq, half, iou=0.4).iou[0] == pytest.approx(0.5, abs=0.02)


def test_instance_masks_use_mask_iou():
    m1 = np.zeros((1, 20, 20), bool); m1[0, :10, :10] = True
    m2 = np.zeros((1, 20, 20), bool); m2[0, :10, :5] = True
    a = boxes([[0, 0, 10, 10]], ["Dog"])
    a = a.with_meta(detections=sv.Detections(xyxy=a.detections.xyxy, mask=m1, confidence=np.ones(1),
                                             class_id=np.array([1]), data=a.detections.data))
    b = a.with_meta(detections=sv.Detections(xyxy=a.detections.xyxy, mask=m2, confidence=np.ones(1),
                                             class_id=np.array([1]), data=a.detections.data))
    m = match(a, b, iou=0.3)
    assert m.kind == "masks" and m.iou[0] == pytest.approx(0.5)


def test_choices_agree_by_top_class():
    a = Prediction(probabilities=np.array([0.7, 0.3]), class_names=NAMES)
    b = Prediction(probabilities=np.array([0.9, 0.1]), class_names=NAMES)
    v = task_agreement(a, b)
    assert v.candidate and v.kind == "choices" and v.score == pytest.approx(0.7)
    c = Prediction(probabilities=np.array([0.2, 0.8]), class_names=NAMES)
    w = task_agreement(a, c)
    assert not w.candidate and w.only_a == w.only_b == 1


def test_table_accepts_candidates_above_threshold_and_counts_coverage():
    a = boxes([[0, 0, 10, 10]], ["Cat"], [0.9])
    verdicts = [task_agreement(a, boxes([[0, 0, 10, 10]], ["Cat"], [c])) for c in (0.95, 0.5)]
    verdicts.append(task_agreement(a, boxes([[0, 0, 10, 10]], ["Dog"])))
    t = AgreementTable.of(verdicts)
    np.testing.assert_array_equal(t.accepted(0.8), [True, False, False])
    assert t.coverage(0.8) == pytest.approx(1 / 3)
    assert t.coverage(0.8, by="regions") == pytest.approx(1 / 3)  # 1 matched of 1 + 1 + 1 regions
    assert not t.accepted(None).any()


def test_agreed_keeps_only_matched_regions_of_a():
    a = boxes([[0, 0, 10, 10], [50, 50, 60, 60]], ["Cat", "Dog"])
    m = match(a, boxes([[0, 0, 10, 10]], ["Cat"]))
    kept = agreed(a, m)
    assert len(kept.detections) == 1 and kept.detections.data[CLASS_NAME].tolist() == ["Cat"]


def test_verify_marks_each_agreed_region_against_the_human():
    a = boxes([[0, 0, 10, 10], [20, 20, 30, 30]], ["Cat", "Dog"], conf=[0.9, 0.9])
    b = boxes([[0, 0, 10, 10], [20, 20, 30, 30]], ["Cat", "Dog"], conf=[0.8, 0.7])
    human = boxes([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], ["Cat", "Cat", "Dog"])
    v = verify(a, b, human)
    assert v.verdict.candidate and v.verdict.score == pytest.approx(0.7)
    np.testing.assert_array_equal(v.correct, [True, False])  # the Dog was relabelled by the human
    assert v.missed == 2 and not v.task_correct  # the relabelled Cat and the Dog at 50 are not in the agreed set
    ok = verify(a, b, boxes([[0, 0, 10, 10], [20, 20, 30, 30]], ["Cat", "Dog"]))
    assert ok.correct.all() and ok.missed == 0 and ok.task_correct


def test_verify_choices():
    a = Prediction(probabilities=np.array([0.7, 0.3]), class_names=NAMES)
    human = Prediction(probabilities=np.array([0.0, 1.0]), class_names=NAMES)
    v = verify(a, a, human)
    assert v.verdict.candidate and v.correct.tolist() == [False] and v.missed == 1
