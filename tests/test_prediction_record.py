"""Every kind of prediction survives the store's record form exactly: a stored prediction is a Prediction again."""

import json

import numpy as np
import pytest
import supervision as sv
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from backend.core.prediction import CLASS_NAME, CLASS_SCORES, POLYGON, Prediction, Role


def _roundtrip(p: Prediction) -> Prediction:
    return Prediction.from_record(json.loads(json.dumps(p.to_record())))  # through JSON text, as stored


def _assert_same(a: Prediction, b: Prediction) -> None:
    assert (a.class_names, a.candidate_peak, a.model_version, a.role, a.extra) == (
        b.class_names, b.candidate_peak, b.model_version, b.role, b.extra)
    for x, y in ((a.probabilities, b.probabilities), (a.embedding, b.embedding)):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
    assert (a.detections is None) == (b.detections is None)
    if a.detections is None:
        return
    da, db = a.detections, b.detections
    np.testing.assert_array_equal(da.xyxy, db.xyxy)
    assert da.xyxy.dtype == db.xyxy.dtype
    np.testing.assert_array_equal(da.confidence, db.confidence)
    np.testing.assert_array_equal(da.class_id, db.class_id)
    assert (da.mask is None) == (db.mask is None)
    if da.mask is not None:
        np.testing.assert_array_equal(da.mask, db.mask)
    assert set(da.data) == set(db.data)
    for key in da.data:
        if key == POLYGON:
            for p, q in zip(da.data[key], db.data[key], strict=True):
                assert (p is None and q is None) or np.array_equal(p, q)
        else:
            np.testing.assert_array_equal(da.data[key], db.data[key])


def test_boxes_with_class_vectors_masks_polygons_and_metadata():
    rng = np.random.default_rng(0)
    mask = rng.random((2, 17, 23)) > 0.5
    det = sv.Detections(
        xyxy=rng.random((2, 4)) * 100, confidence=rng.random(2).astype(np.float32), class_id=np.array([0, 2]),
        mask=mask,
        data={CLASS_NAME: np.array(["cat", "bird"], dtype=object), CLASS_SCORES: rng.random((2, 3)),
              POLYGON: np.array([rng.random((5, 2)) * 50, None], dtype=object)})
    p = Prediction(detections=det, candidate_peak=0.31, class_names=("cat", "dog", "bird"),
                   embedding=rng.random(8).astype(np.float32), model_version="best-1a2b", role=Role.SECOND_OPINION,
                   extra={"prompt": "a bird"})
    _assert_same(p, _roundtrip(p))


def test_classifier_and_empty_detector():
    _assert_same(p := Prediction(probabilities=np.array([0.1, 0.9 - 1e-17, 1e-300]), class_names=("a", "b", "c")),
                 _roundtrip(p))
    empty = Prediction(detections=sv.Detections.empty(), candidate_peak=0.02)
    _assert_same(empty, _roundtrip(empty))


def test_unknown_record_version_is_refused():
    with pytest.raises(ValueError, match="record version"):
        Prediction.from_record({"v": 99})


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 6), k=st.integers(1, 4), data=st.data())
def test_any_boxes_round_trip_exactly(n, k, data):
    floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
    xyxy = data.draw(arrays(np.float64, (n, 4), elements=st.floats(-1e6, 1e6, width=64)))  # sv refuses NaN boxes
    conf = data.draw(arrays(np.float32, (n,), elements=st.floats(0, 1, width=32)))
    ids = data.draw(arrays(np.int64, (n,), elements=st.integers(0, k - 1)))
    scores = data.draw(arrays(np.float64, (n, k), elements=floats))
    names = np.array([f"c{i}" for i in ids], dtype=object)
    det = sv.Detections(xyxy=xyxy, confidence=conf, class_id=ids, data={CLASS_NAME: names, CLASS_SCORES: scores})
    p = Prediction(detections=det, class_names=tuple(f"c{i}" for i in range(k)))
    _assert_same(p, _roundtrip(p))
