"""The answer cache's write-behind: /predict does not wait for SQLite, and nothing written is lost or unseen."""

import logging

from backend.prediction_store import PredictionStore


def item(n: int) -> dict:
    return {"result": [{"id": f"r{n}", "value": {"x": n}}], "score": 0.5, "model_version": "cnn-1"}


def test_reads_see_every_write_handed_over_before_them(tmp_path):
    store = PredictionStore(tmp_path / "tandem.db")
    for n in range(200):
        store.put_many_later([(n, "cnn-1", "fp", 7, "cnn", "pre-annotation", item(n))])
    found = store.get_many([(n, "cnn-1", "fp") for n in range(200)])
    assert len(found) == 200 and found[(199, "cnn-1", "fp")] == item(199)
    assert {p.task_id for p in store.for_project(7, role="pre-annotation")} == set(range(200))
    store.close()


def test_close_writes_what_is_pending(tmp_path):
    store = PredictionStore(tmp_path / "tandem.db")
    store.put_many_later([(n, "cnn-1", "fp", 7, "cnn", "pre-annotation", item(n)) for n in range(500)])
    store.close()
    reopened = PredictionStore(tmp_path / "tandem.db")
    assert len(reopened.for_project(7)) == 500
    reopened.close()


def test_a_failed_write_is_logged_and_later_writes_still_land(tmp_path, caplog):
    store = PredictionStore(tmp_path / "tandem.db")
    with caplog.at_level(logging.ERROR, logger="tandem.store"):
        store.put_many_later([(1, "cnn-1", "fp", 7, "cnn", "pre-annotation", {"result": [object()]})])
        store.put_many_later([(2, "cnn-1", "fp", 7, "cnn", "pre-annotation", item(2))])
        found = store.get_many([(1, "cnn-1", "fp"), (2, "cnn-1", "fp")])
    assert list(found) == [(2, "cnn-1", "fp")]
    assert "could not store 1 predictions" in caplog.text
    store.close()
