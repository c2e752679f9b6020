"""The background queue of /predict's leftovers and second opinions: bounded, and counted down as it goes.

The predictor here records the slices it is handed (the queue's own logic is what is tested; the real
Predictor behind it is tested through the server in test_server.py and test_e2e_scale.py)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from backend.server.deferred import SLICE, DeferredPredictions


class Recorder:
    def __init__(self) -> None:
        self.slices: list[int] = []
        self.go = threading.Event()

    def predict(self, tasks, plan, project_id=None, role=""):
        self.go.wait(30)
        time.sleep(0.02)  # a slice takes a moment, as predicting does
        self.slices.append(len(tasks))


def test_the_queue_is_bounded_says_what_it_left_out_and_counts_down_slice_by_slice(caplog):
    queue = DeferredPredictions(max_pending=100)
    plan = SimpleNamespace(version="v1", fingerprint="f1")
    recorder = Recorder()
    try:
        with caplog.at_level("WARNING", logger="tandem.deferred"):
            assert queue.submit(recorder, [{"id": i} for i in range(80)], plan, 7, "pre-annotation") == []
            # 80 more, 20 of them queued already: room for 20 of the 60 new ones; the other 40 are returned
            left = queue.submit(recorder, [{"id": i} for i in range(60, 140)], plan, 7, "pre-annotation")
            assert [t["id"] for t in left] == list(range(100, 140))
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and "40 pre-annotation task(s) of project 7 not queued" in said[0]
        assert "tandem predict --project 7" in said[0] and queue.pending == 100
        recorder.go.set()
        deadline = time.monotonic() + 30
        seen = set()
        while queue.pending and time.monotonic() < deadline:
            seen.add(queue.pending)
            time.sleep(0.001)
        assert len(seen) > 1  # it moved on the way down, not only at the end of the job
        assert queue.wait_idle(30) and queue.pending == 0
        assert recorder.slices == [SLICE, SLICE, 80 - 2 * SLICE, 20]  # one job at a time, a slice at a time
    finally:
        queue.close()


def test_a_stop_drops_what_is_left_after_the_slice_in_hand(caplog):
    queue = DeferredPredictions()
    plan = SimpleNamespace(version="v1", fingerprint="f1")
    recorder = Recorder()
    queue.submit(recorder, [{"id": i} for i in range(5 * SLICE)], plan, 3, "second-opinion")
    time.sleep(0.2)  # the worker holds the first slice
    with caplog.at_level("WARNING", logger="tandem.deferred"):
        closer = threading.Thread(target=queue.close)
        closer.start()
        time.sleep(0.2)
        recorder.go.set()
        closer.join(30)
    assert queue.wait_idle(5) and queue.pending == 0 and recorder.slices == [SLICE]
    assert any(f"stopping with {5 * SLICE} tasks' background predictions not made" in r.getMessage()
               for r in caplog.records)
