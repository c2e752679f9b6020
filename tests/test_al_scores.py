"""Active-learning formulas: hand-computed cases, brute force, and properties (hypothesis)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import supervision as sv
from hypothesis import given, settings
from hypothesis import strategies as st

from active_learning.boxes import BoxBatch, ImageBoxes
from active_learning.disagreement import (
    classification_disagreement,
    detection_disagreement,
    js_divergence,
    match,
    pairwise_iou,
)
from active_learning.scoring import score_outputs
from active_learning.uncertainty import (
    binary_entropy,
    detection_uncertainty,
    entropy,
    least_confidence,
    margin,
)
from backend.models.base import ModelOutput


# --- classification uncertainty -------------------------------------------------------------------
def test_classification_measures_hand_computed():
    p = np.array([[1.0, 0, 0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.3, 0.2]])
    np.testing.assert_allclose(least_confidence(p), [0, 1, 0.5 * 3 / 2])
    np.testing.assert_allclose(margin(p), [0, 1, 0.8])
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)) / math.log(3)
    np.testing.assert_allclose(entropy(p), [0, 1, h])


def test_binary_entropy_hand_computed():
    np.testing.assert_allclose(binary_entropy([0.5, 1.0, 0.0, 0.9]), [1, 0, 0, -(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1))], atol=1e-9)


probs = st.integers(2, 6).flatmap(
    lambda k: st.lists(st.lists(st.floats(0, 1), min_size=k, max_size=k), min_size=1, max_size=8))


@given(probs)
def test_classification_scores_in_unit_interval(rows):
    p = np.array(rows)
    for f in (least_confidence, margin, entropy):
        v = f(p)
        assert np.all((v >= 0) & (v <= 1))


# --- detection uncertainty ------------------------------------------------------------------------
def test_detection_aggregates_hand_computed():
    batch = BoxBatch.from_images([
        ImageBoxes(np.zeros((2, 4)), np.array([0.5, 0.9]), np.array([0, 1])),
        ImageBoxes.empty(),
        ImageBoxes(np.zeros((1, 4)), np.array([0.3]), np.array([0])),
    ])
    u = detection_uncertainty(batch, threshold=0.25, band=0.1, cap=2.0)
    h9, h3 = binary_entropy(0.9), binary_entropy(0.3)
    np.testing.assert_allclose(u.max, [1.0, 0.0, h3])
    np.testing.assert_allclose(u.mean, [(1 + h9) / 2, 0.0, h3])
    np.testing.assert_allclose(u.capped_sum, [min(1 + h9, 2) / 2, 0, h3 / 2])
    np.testing.assert_array_equal(u.near_threshold, [0, 0, 1])


def test_images_without_any_boxes():
    batch = BoxBatch.from_images([ImageBoxes.empty(), ImageBoxes.empty()])
    u = detection_uncertainty(batch)
    np.testing.assert_array_equal(u.score, [0, 0])
    np.testing.assert_array_equal(detection_disagreement(batch, batch).score, [0, 0])


def test_an_image_with_no_box_ranks_by_its_best_candidate():
    batch = BoxBatch.from_images([
        ImageBoxes.empty(),  # a near miss
        ImageBoxes.empty(),  # nothing close
        ImageBoxes.empty(),  # the detector reported no peak
        ImageBoxes(np.zeros((1, 4)), np.array([0.9]), np.array([0])),  # has a box: its peak is not used
    ])
    peaks = np.array([0.2, 0.001, np.nan, 0.24])
    for aggregate in ("max", "mean"):
        u = detection_uncertainty(batch, aggregate=aggregate, candidate_peaks=peaks).score
        np.testing.assert_allclose(u, [binary_entropy(0.2), binary_entropy(0.001), 0.0, binary_entropy(0.9)])
    capped = detection_uncertainty(batch, cap=5.0, candidate_peaks=peaks).capped_sum
    np.testing.assert_allclose(capped[:2], binary_entropy(np.array([0.2, 0.001])) / 5)
    assert u[0] > u[1] > u[2]
    with pytest.raises(ValueError, match="4 images"):
        detection_uncertainty(batch, candidate_peaks=np.array([0.2]))


@given(st.lists(st.floats(0, 0.25), min_size=1, max_size=6), st.lists(st.floats(0.25, 1), min_size=1, max_size=6))
def test_near_misses_stay_in_unit_interval_and_leave_images_with_boxes_alone(peaks, box_scores):
    empty = [ImageBoxes.empty()] * len(peaks)
    boxed = ImageBoxes(np.zeros((len(box_scores), 4)), np.array(box_scores), np.zeros(len(box_scores), int))
    batch = BoxBatch.from_images([*empty, boxed])
    with_peaks = detection_uncertainty(batch, candidate_peaks=np.array([*peaks, 0.1]))
    without = detection_uncertainty(batch)
    for agg in ("max", "mean", "capped_sum"):
        v = getattr(with_peaks, agg)
        assert np.all((v >= 0) & (v <= 1))
        assert getattr(with_peaks, agg)[-1] == getattr(without, agg)[-1]


def test_class_distribution_raises_box_uncertainty():
    sure = ImageBoxes(np.zeros((1, 4)), np.array([0.99]), np.array([0]), np.array([[0.98, 0.01, 0.01]]))
    torn = ImageBoxes(np.zeros((1, 4)), np.array([0.99]), np.array([0]), np.array([[0.5, 0.5, 0.0]]))
    u = detection_uncertainty(BoxBatch.from_images([sure, torn])).score
    assert u[1] > u[0] + 0.3


# --- matching ---------------------------------------------------------------------------------------
def brute_force_max(weights, allowed):
    n, m = weights.shape
    best = 0.0
    for k in range(min(n, m) + 1):
        for rows in itertools.combinations(range(n), k):
            for cols in itertools.permutations(range(m), k):
                if all(allowed[r, c] for r, c in zip(rows, cols)):
                    best = max(best, sum(weights[r, c] for r, c in zip(rows, cols)))
    return best


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 4), st.integers(0, 4), st.integers(0, 10_000))
def test_matching_equals_brute_force(n, m, seed):
    rng = np.random.default_rng(seed)
    w = rng.random((n, m))
    allowed = rng.random((n, m)) > 0.3
    r, c = match(w, allowed)
    assert len(set(r)) == len(r) and len(set(c)) == len(c) and np.all(allowed[r, c])
    assert w[r, c].sum() == pytest.approx(brute_force_max(w, allowed))


def test_iou_hand_computed():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    np.testing.assert_allclose(pairwise_iou(a, b), [[50 / 150, 0, 1]])


# --- detection disagreement -------------------------------------------------------------------------
def _img(boxes, scores, labels):
    return ImageBoxes(np.array(boxes, float).reshape(-1, 4), np.array(scores, float), np.array(labels, int))


def test_disagreement_hand_computed_and_reasons():
    a = [_img([[0, 0, 10, 10], [50, 50, 60, 60], [100, 0, 120, 20]], [0.9, 0.8, 0.7], [0, 1, 2])]
    b = [_img([[0, 0, 10, 10], [50, 50, 60, 60], [103, 0, 123, 20], [200, 200, 210, 210]], [0.9, 0.6, 0.5, 0.4], [0, 2, 2, 0])]
    d = detection_disagreement(BoxBatch.from_images(a), BoxBatch.from_images(b), loc_iou=0.8)
    iou3 = 17 * 20 / (2 * 400 - 17 * 20)
    agree = 2 * (1.0 * 0.9 + iou3 * math.sqrt(0.7 * 0.5)) / (0.9 + 0.8 + 0.7 + 0.9 + 0.6 + 0.5 + 0.4)
    assert d.score[0] == pytest.approx(1 - agree)
    total = 0.9 + 0.8 + 0.7 + 0.9 + 0.6 + 0.5 + 0.4
    assert d.mass[0] == pytest.approx(total / 2 - (1.0 * 0.9 + iou3 * math.sqrt(0.7 * 0.5)))
    assert {k: int(v[0]) for k, v in d.counts.items()} == {
        "only_a": 0, "only_b": 1, "poor_localisation": 1, "class_swap": 1}
    assert d.reason(0) == "1 box only VLM sees; 1 poorly localised; 1 class swap"
    assert d.reason(0, ("yolo", "vlm"), ["cat", "dog", "bird"]) == (
        "1 box only vlm sees (cat); 1 poorly localised; 1 class swap (yolo dog, vlm bird)")


def test_reasons_name_the_classes_of_each_image_only():
    """Per-image slices of the pairs: image 1's boxes never leak into image 0's sentence."""
    a = [_img([[0, 0, 10, 10]], [0.9], [0]), _img([[0, 0, 10, 10], [40, 40, 50, 50], [80, 80, 90, 90]], [0.9] * 3, [0, 1, 1]),
         ImageBoxes.empty()]
    b = [_img([[0, 0, 10, 10], [30, 30, 40, 40]], [0.9, 0.8], [1, 2]), _img([[0, 0, 10, 10]], [0.9], [0]),
         _img([[0, 0, 5, 5]], [0.3], [2])]
    d = detection_disagreement(BoxBatch.from_images(a), BoxBatch.from_images(b))
    names = ["cat", "dog", "bird"]
    assert [d.reason(i, ("A", "B"), names) for i in range(3)] == [
        "1 box only B sees (bird); 1 class swap (A cat, B dog)",
        "2 boxes only A sees (dog ×2)",
        "1 box only B sees (bird)",
    ]


def test_empty_cases():
    e = ImageBoxes.empty()
    one = _img([[0, 0, 5, 5]], [0.5], [0])
    d = detection_disagreement(BoxBatch.from_images([e, e, one]), BoxBatch.from_images([e, one, e]))
    np.testing.assert_allclose(d.score, [0, 1, 1])
    assert d.reason(0) == "agree"


boxes_strategy = st.lists(
    st.tuples(st.floats(0, 200), st.floats(0, 200), st.floats(2, 80), st.floats(2, 80), st.floats(0.05, 1), st.integers(0, 2)),
    min_size=0, max_size=7)


def _from_tuples(rows):
    return _img([[x, y, x + w, y + h] for x, y, w, h, _, _ in rows], [s for *_, s, _ in rows], [c for *_, c in rows])


@settings(max_examples=150, deadline=None)
@given(boxes_strategy, boxes_strategy)
def test_disagreement_properties(rows_a, rows_b):
    a, b = BoxBatch.from_images([_from_tuples(rows_a)]), BoxBatch.from_images([_from_tuples(rows_b)])
    ab = detection_disagreement(a, b).score[0]
    ba = detection_disagreement(b, a).score[0]
    assert 0 <= ab <= 1
    assert ab == pytest.approx(ba, abs=1e-9)  # symmetric
    assert detection_disagreement(a, a).score[0] == pytest.approx(0, abs=1e-9)  # identical -> 0
    m_ab, m_ba = detection_disagreement(a, b).mass[0], detection_disagreement(b, a).mass[0]
    assert m_ab >= 0 and m_ab == pytest.approx(m_ba, abs=1e-9)
    assert detection_disagreement(a, a).mass[0] == pytest.approx(0, abs=1e-9)
    assert m_ab <= (sum(r[4] for r in rows_a) + sum(r[4] for r in rows_b)) / 2 + 1e-9


def test_mass_counts_what_the_share_cannot():
    # one box missed on an image of one, and three missed on an image of three: the same share (1), not the same work
    one = _img([[0, 0, 10, 10]], [0.8], [0])
    three = _img([[0, 0, 10, 10], [30, 30, 40, 40], [60, 60, 70, 70]], [0.8, 0.8, 0.8], [0, 1, 2])
    e = ImageBoxes.empty()
    d = detection_disagreement(BoxBatch.from_images([one, three]), BoxBatch.from_images([e, e]))
    np.testing.assert_allclose(d.score, [1, 1])
    np.testing.assert_allclose(d.mass, [0.4, 1.2])


def test_capped_sum_ranks_the_image_with_more_to_fix_first():
    def output(boxes, scores):
        xyxy = np.array(boxes, float).reshape(-1, 4)
        return ModelOutput(detections=sv.Detections(xyxy=xyxy, confidence=np.array(scores, float),
                                                    class_id=np.zeros(len(scores), int),
                                                    data={"class_name": np.array(["digit"] * len(scores))}))

    crowded = [[0, 0, 10, 10], [30, 30, 40, 40], [60, 60, 70, 70]]
    cnn = [output([[0, 0, 10, 10]], [0.5]), output(crowded, [0.3, 0.35, 0.4])]  # one doubtful box; three
    vlm = [output([], []), output([], [])]  # the second model sees none of them
    by_max = score_outputs(cnn, ["digit"], vlm, ["digit"], aggregate="max")
    by_sum = score_outputs(cnn, ["digit"], vlm, ["digit"], aggregate="capped_sum", cap=5)
    assert by_max.disagreement[0] == by_max.disagreement[1] == pytest.approx(1)  # a share: a tie
    assert by_max.uncertainty[0] > by_max.uncertainty[1]  # its one box (0.5) is the most doubtful
    assert by_sum.uncertainty[1] > by_sum.uncertainty[0] and by_sum.disagreement[1] > by_sum.disagreement[0]
    np.testing.assert_allclose(by_sum.disagreement, [0.5 / 2 / 5, (0.3 + 0.35 + 0.4) / 2 / 5])
    assert np.all((by_sum.uncertainty >= 0) & (by_sum.uncertainty <= 1))


@settings(max_examples=100, deadline=None)
@given(boxes_strategy.filter(len), st.floats(0.1, 1), st.floats(0.3, 1.0))
def test_added_or_moved_box_raises_disagreement(rows, score, shift_fraction):
    a = _from_tuples(rows)
    base = BoxBatch.from_images([a])
    added = _img(np.vstack([a.xyxy, [[400, 400, 450, 450]]]), np.append(a.scores, score), np.append(a.labels, 0))
    assert detection_disagreement(base, BoxBatch.from_images([added])).score[0] > 0
    moved = a.xyxy.copy()
    width = moved[0, 2] - moved[0, 0]
    moved[0, [0, 2]] += shift_fraction * width + 300  # far away from everything
    shifted = _img(moved, a.scores, a.labels)
    assert detection_disagreement(base, BoxBatch.from_images([shifted])).score[0] > 0


# --- classification disagreement ---------------------------------------------------------------------
def test_js_hand_computed():
    p, q = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    assert js_divergence(p, q)[0] == pytest.approx(1.0)
    p, q = np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]])
    m = np.array([0.75, 0.25])
    expected = (0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) + 0.5 * math.log(1 / 0.75)) / math.log(2)
    assert js_divergence(p, q)[0] == pytest.approx(expected)
    d = classification_disagreement(np.array([[0.7, 0.3], [0.2, 0.8]]), np.array([[0.6, 0.4], [0.9, 0.1]]))
    np.testing.assert_array_equal(d.top1_mismatch, [False, True])
    assert d.reason(1, np.array([[0.7, 0.3], [0.2, 0.8]]), np.array([[0.6, 0.4], [0.9, 0.1]]), ["ok", "bad"]) == (
        "CNN says bad (0.80), VLM says ok (0.90)")


@given(probs, st.integers(0, 1000))
def test_js_properties(rows, seed):
    p = np.array(rows) + 1e-3
    q = np.random.default_rng(seed).random(p.shape) + 1e-3
    js = js_divergence(p, q)
    assert np.all((js >= 0) & (js <= 1 + 1e-12))
    np.testing.assert_allclose(js, js_divergence(q, p), atol=1e-12)
    np.testing.assert_allclose(js_divergence(p, p), 0, atol=1e-12)


def test_classification_reasons_say_unsure_only_when_the_top_two_are_close():
    outputs = [ModelOutput(probabilities=np.array(p)) for p in ([0.98, 0.01, 0.01], [0.40, 0.45, 0.15])]
    table = score_outputs(outputs, ["cat", "dog", "fox"])
    assert table.reasons == ["CNN confident: cat 0.98, then dog 0.01", "CNN unsure: dog 0.45, then cat 0.40"]
    assert table.uncertainty[1] > table.uncertainty[0]
    between = score_outputs([ModelOutput(probabilities=np.array([0.19, 0.76, 0.05]))], ["cat", "dog", "fox"])
    assert between.reasons == ["CNN leans: dog 0.76, then cat 0.19"]  # a margin of 0.57: neither sure nor unsure

    # with a second opinion the reason holds both halves, the one that weighs more first: an image ranked for
    # the CNN's doubt, on which the VLM agrees, must not read "both say dog" alone
    second = [ModelOutput(probabilities=np.array(p)) for p in ([0.02, 0.97, 0.01], [0.38, 0.47, 0.15])]
    both = score_outputs(outputs, ["cat", "dog", "fox"], second, ["cat", "dog", "fox"])
    assert both.reasons[0].startswith("CNN says cat (0.98), VLM says dog (0.97); CNN confident")
    assert both.reasons[1] == f"CNN unsure: dog 0.45, then cat 0.40; both say dog (JS {both.disagreement[1]:.2f})"


def test_a_classifier_that_sees_none_of_the_choices_says_which_class_it_saw():
    """A square/star project: the circle/square/triangle CNN sees a circle, the second opinion a triangle. The
    pooled, spread numbers are no answer, and "both say Square" would be false."""
    from backend.core.labels import LabelSpace
    from backend.labeling.config import parse_label_config

    control = parse_label_config("""<View><Image name="image" value="$image"/><Choices name="shape" toName="image">
<Choice value="Square"/><Choice value="Star"/></Choices></View>""").controls[0]
    classes = ("circle", "square", "triangle")
    space = LabelSpace.build(control, classes)
    cnn = space.to_labels([ModelOutput(probabilities=np.array(p)) for p in ([0.8, 0.15, 0.05], [0.1, 0.9, 0.0])])
    other = space.to_labels([ModelOutput(probabilities=np.array(p)) for p in ([0.1, 0.2, 0.7], [0.0, 0.95, 0.05])])
    table = score_outputs(cnn, ["Square", "Star"], other, ["Square", "Star"])
    assert table.reasons[0] == "CNN sees circle, which is none of the choices; VLM sees triangle, which is none of the choices"
    assert "none of the choices" not in table.reasons[1] and "Square" in table.reasons[1]
    assert table.uncertainty[0] > table.uncertainty[1]



def test_reasons_count_apart_the_unmatched_boxes_below_the_serving_threshold():
    a = [_img([[0, 0, 10, 10], [40, 40, 50, 50], [80, 80, 90, 90]], [0.9, 0.2, 0.1], [0, 1, 1])]
    b = [_img([[0, 0, 10, 10], [200, 200, 210, 210]], [0.9, 0.15], [0, 2])]
    d = detection_disagreement(BoxBatch.from_images(a), BoxBatch.from_images(b))
    assert d.reason(0, ("A", "B"), ["cat", "dog", "bird"], faint=0.25) == (
        "2 boxes only A sees (dog ×2; 2 of them are below 0.25); 1 box only B sees (bird; it is below 0.25)")


# --- scoring stored detections column-wise equals scoring decoded Predictions ------------------------
def _stored_record(rng: np.random.Generator, names: list[str], vectors: bool) -> dict:
    """One image's prediction as the store keeps it (to_record through JSON text): 0-5 boxes (often none, sometimes
    no detections at all), float32 or float64 boxes, confidences and class vectors, a candidate peak or none,
    class names in any case (and one neither model list knows)."""
    import json

    from backend.core.prediction import CLASS_NAME, CLASS_SCORES, Prediction

    peak = None if rng.random() < 0.3 else float(rng.uniform(0.01, 0.4))
    if rng.random() < 0.1:
        return json.loads(json.dumps(Prediction(candidate_peak=peak).to_record()))  # no detections at all
    k = int(rng.choice([0, 0, 1, 2, 3, 5]))
    box_t, conf_t, vec_t = (rng.choice([np.float32, np.float64]) for _ in range(3))
    xy = rng.uniform(0, 200, (k, 2))
    xyxy = np.hstack([xy, xy + rng.uniform(5, 60, (k, 2))]).astype(box_t)
    conf = rng.uniform(0.05, 1, k).astype(conf_t)
    spelled = [*names, *(n.upper() for n in names), "Zebra"]
    data = {CLASS_NAME: np.array([spelled[i] for i in rng.integers(0, len(spelled), k)], dtype=object)}
    if vectors:
        data[CLASS_SCORES] = rng.dirichlet(np.ones(len(names)), k).astype(vec_t)
    det = sv.Detections(xyxy=xyxy.reshape(k, 4), confidence=conf, class_id=rng.integers(0, len(names), k),
                        data=data)
    return json.loads(json.dumps(Prediction(detections=det, candidate_peak=peak,
                                            class_names=tuple(names)).to_record()))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), vectors=st.sampled_from(["all", "none", "some"]),
       aggregate=st.sampled_from(["max", "mean", "capped_sum"]), threshold=st.sampled_from([0.25, 0.4]))
def test_scoring_stored_columns_equals_scoring_decoded_predictions(seed, n, vectors, aggregate, threshold):
    """`score_columns(detection_columns(records))` gives bit for bit the numbers and sentences of
    `score_outputs([Prediction.from_record(r) ...])`: empty images, images with no detections, class vectors on
    every, no or some images, float32 and float64 mixed, candidate peaks missing (NaN)."""
    from active_learning.scoring import score_columns
    from backend.core.prediction import Prediction, detection_columns

    rng = np.random.default_rng(seed)
    names = ["Cat", "dog", "Bird"]
    def has_vectors() -> bool:
        return vectors == "all" or (vectors == "some" and rng.random() < 0.7)
    first = [_stored_record(rng, names, has_vectors()) for _ in range(n)]
    second = [_stored_record(rng, names, has_vectors()) for _ in range(n)]
    before = score_outputs([Prediction.from_record(r) for r in first], names,
                           [Prediction.from_record(r) for r in second], names, model_names=("CNN", "2nd CNN"),
                           aggregate=aggregate, threshold=threshold)
    columns_a, columns_b = detection_columns(first), detection_columns(second)
    after = score_columns(columns_a, names, columns_b, model_names=("CNN", "2nd CNN"), aggregate=aggregate,
                          threshold=threshold)
    np.testing.assert_array_equal(after.uncertainty, before.uncertainty)
    np.testing.assert_array_equal(after.disagreement, before.disagreement)
    assert list(after.reasons) == list(before.reasons)
    assert all(before.reasons)  # every image has a sentence: "" is free to mean "not built yet"
    unexplained = score_columns(columns_a, names, columns_b, model_names=("CNN", "2nd CNN"), aggregate=aggregate,
                                threshold=threshold, reasons=False)
    np.testing.assert_array_equal(unexplained.uncertainty, before.uncertainty)
    np.testing.assert_array_equal(unexplained.disagreement, before.disagreement)
    assert list(unexplained.reasons) == [""] * n
    alone = score_columns(columns_a, names, aggregate=aggregate, threshold=threshold)
    alone_before = score_outputs([Prediction.from_record(r) for r in first], names, aggregate=aggregate,
                                 threshold=threshold)
    np.testing.assert_array_equal(alone.uncertainty, alone_before.uncertainty)
    assert alone.disagreement is None and list(alone.reasons) == list(alone_before.reasons)


def test_stored_columns_refuse_what_cannot_be_scored():
    from backend.core.prediction import detection_columns

    with pytest.raises(ValueError, match="record version"):
        detection_columns([{"v": 99}])
    rng = np.random.default_rng(0)
    record = _stored_record(rng, ["cat"], True)
    while "detections" not in record or not record["detections"]["xyxy"]["shape"][0]:
        record = _stored_record(rng, ["cat"], True)
    del record["detections"]["confidence"]
    with pytest.raises(ValueError, match="without confidences"):
        detection_columns([record])


def test_two_class_swaps_are_said_in_the_plural():
    """What a reviewer reads: "2 class swaps", never "2 class swap"."""
    a = [_img([[0, 0, 10, 10], [40, 40, 50, 50]], [0.9, 0.9], [0, 0])]
    b = [_img([[0, 0, 10, 10], [40, 40, 50, 50]], [0.9, 0.9], [1, 2])]
    d = detection_disagreement(BoxBatch.from_images(a), BoxBatch.from_images(b))
    assert d.reason(0) == "2 class swaps"
    assert d.reason(0, ("A", "B"), ["cat", "dog", "bird"]) == "2 class swaps (A cat ×2, B dog, bird)"
