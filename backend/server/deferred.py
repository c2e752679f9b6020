"""Predictions that do not block Label Studio: the tasks left over after the /predict time budget, and
the second model's opinion on every task the pre-annotator answered. One worker thread, in order, each
result written to the prediction store; a task already queued for the same version and config is not
queued twice (Label Studio re-sends the same selection when a user clicks again)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backend.predict import Predictor, ServingPlan

log = logging.getLogger("tandem.deferred")


@dataclass(frozen=True)
class DeferredJob:
    predictor: Predictor
    tasks: tuple[Mapping[str, Any], ...]
    plan: ServingPlan
    project_id: int | None
    role: str


SLICE = 32  # tasks predicted (and counted down from `pending`) at a time
MAX_PENDING = 20_000  # tasks queued at once; past it a /predict's leftovers are said and left to `tandem predict`


class DeferredPredictions:
    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self.max_pending = max_pending
        self._stopping = False
        self._queue: queue.Queue[DeferredJob | None] = queue.Queue()
        self._pending: set[tuple[Any, str, str]] = set()
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="tandem-deferred", daemon=True)
        self._thread.start()

    def submit(self, predictor: Predictor, tasks: Sequence[Mapping[str, Any]], plan: ServingPlan,
               project_id: int | None, role: str) -> list[Mapping[str, Any]]:
        """Queue the tasks not queued already, up to `max_pending` in all; returns the tasks left out for lack
        of room (their items must not say "still computing")."""
        with self._lock:
            fresh = [t for t in tasks if (t.get("id"), plan.version, plan.fingerprint) not in self._pending]
            room = max(0, self.max_pending - len(self._pending))
            fresh, left = fresh[:room], fresh[room:]
            self._pending.update((t.get("id"), plan.version, plan.fingerprint) for t in fresh)
            if fresh:
                self._idle.clear()
                self._queue.put(DeferredJob(predictor, tuple(fresh), plan, project_id, role))
        if left:
            log.warning("the background queue is full (%d tasks): %d %s task(s) of project %s not queued; "
                        "`tandem predict --project %s` predicts a whole project as a job", self.max_pending,
                        len(left), role, project_id, project_id)
        return left

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def wait_idle(self, timeout: float) -> bool:
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            for start in range(0, len(job.tasks), SLICE):  # a slice at a time: `pending` counts down as it goes
                stop = self._stopping
                part = job.tasks[start:] if stop else job.tasks[start:start + SLICE]  # stopping: the rest is dropped
                try:
                    if not stop:
                        job.predictor.predict(part, job.plan, project_id=job.project_id, role=job.role)
                except Exception:  # noqa: BLE001 - a crashed batch must not stop the worker
                    log.exception("deferred predictions for %d tasks (%s) failed", len(part), job.plan.version)
                finally:
                    with self._lock:
                        self._pending.difference_update((t.get("id"), job.plan.version, job.plan.fingerprint)
                                                        for t in part)
                        if not self._pending:  # every queued job's tasks are pending (a stop's sentinel is not)
                            self._idle.set()
                if stop:
                    break

    def close(self) -> None:
        """Stops after the slice in hand: the rest of the queue is dropped (a stopping server must not wait for a
        VLM to get through a whole selection, nor write into a store being closed), and said, with where those
        predictions get made later."""
        with self._lock:
            self._stopping = True  # the job in hand stops after its slice in hand
            left = len(self._pending)
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    self._pending.difference_update((t.get("id"), job.plan.version, job.plan.fingerprint)
                                                    for t in job.tasks)
            if not self._pending:
                self._idle.set()
        if left:
            log.warning("stopping with %d tasks' background predictions not made (second opinions, or tasks past "
                        "the /predict time budget): `tandem select` makes the missing ones, and Label Studio asks "
                        "again for a task it shows without a prediction", left)
        self._queue.put(None)
