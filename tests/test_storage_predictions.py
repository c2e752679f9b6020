"""Stored predictions: the /predict cache's write-behind loses nothing, and typed predictions come back typed."""

import logging

import numpy as np
import supervision as sv

from backend.core.prediction import CLASS_NAME, CLASS_SCORES, Prediction
from backend.storage.predictions import PredictionRepo, PredictionRow


def item(n: int) -> dict:
    return {"result": [{"id": f"r{n}", "value": {"x": n}}], "score": 0.5, "model_version": "cnn-1"}


def row(n: int, controls=None, project=7, bad=False) -> PredictionRow:
    return PredictionRow(n, "cnn-1", "fp", project, "cnn", "pre-annotation", {"result": [object()]} if bad else item(n),
                         controls or {})


def repo(tmp_path) -> PredictionRepo:
    return PredictionRepo(f"sqlite:///{tmp_path / 'tandem.db'}")


def test_reads_see_every_write_handed_over_before_them(tmp_path):
    store = repo(tmp_path)
    for n in range(200):
        store.put_many_later([row(n)])
    found = store.get_items([(n, "cnn-1", "fp") for n in range(200)])
    assert len(found) == 200 and found[(199, "cnn-1", "fp")] == item(199)
    assert {p.task_id for p in store.for_project(7, role="pre-annotation")} == set(range(200))
    store.close()


def test_close_writes_what_is_pending(tmp_path):
    store = repo(tmp_path)
    store.put_many_later([row(n) for n in range(500)])
    store.close()
    reopened = repo(tmp_path)
    assert len(reopened.for_project(7)) == 500
    reopened.close()


def test_a_failed_write_is_logged_and_later_writes_still_land(tmp_path, caplog):
    store = repo(tmp_path)
    with caplog.at_level(logging.ERROR, logger="tandem.store"):
        store.put_many_later([row(1, bad=True)])
        store.put_many_later([row(2)])
        found = store.get_items([(1, "cnn-1", "fp"), (2, "cnn-1", "fp")])
    assert list(found) == [(2, "cnn-1", "fp")]
    assert "could not store 1 predictions" in caplog.text
    store.close()


def test_typed_predictions_come_back_equal_and_last_write_wins(tmp_path):
    det = sv.Detections(xyxy=np.array([[1.5, 2.25, 30.0, 40.125]]), confidence=np.array([0.75]),
                        class_id=np.array([1]), data={CLASS_NAME: np.array(["Dog"], dtype=object),
                                                      CLASS_SCORES: np.array([[0.2, 0.75]])})
    first = Prediction(detections=det, class_names=("Cat", "Dog"), candidate_peak=0.8, model_version="cnn-1")
    store = repo(tmp_path)
    store.put_many([row(5, {"label": Prediction(probabilities=np.array([1.0, 0.0]), class_names=("Cat", "Dog"))})])
    store.put_many([row(5, {"label": first})])  # same key: replaces
    got = store.get_controls([(5, "cnn-1", "fp"), (6, "cnn-1", "fp")])
    assert list(got) == [(5, "cnn-1", "fp")]
    back = got[(5, "cnn-1", "fp")]["label"]
    assert back.probabilities is None and back.candidate_peak == 0.8 and back.class_names == ("Cat", "Dog")
    np.testing.assert_array_equal(back.detections.xyxy, det.xyxy)
    np.testing.assert_array_equal(back.detections.data[CLASS_SCORES], det.data[CLASS_SCORES])
    assert list(back.detections.data[CLASS_NAME]) == ["Dog"]
    assert store.count(7) == 1 and store.count(8) == 0
    store.close()


def test_a_callback_on_the_writer_thread_reads_back_without_waiting_for_itself(tmp_path):
    """Serve-time scoring reads stored predictions right after they are written, on the writer thread."""
    store = repo(tmp_path)
    seen = []
    store.put_many_later([row(1)], then=lambda rows: seen.append(store.get_items([(1, "cnn-1", "fp")])))
    store.put_many_later([row(2)])
    assert store.get_items([(2, "cnn-1", "fp")])  # returns: the writer thread did not deadlock on its own flush
    assert seen == [{(1, "cnn-1", "fp"): item(1)}]
    store.close()
