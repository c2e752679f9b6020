"""Keeps the leases of the jobs one holder runs alive, from a background thread.

A runner (the server's, the CLI's, the Modal follower) and the worker process both heartbeat through a
`LeaseKeeper`: every `lease_s / 3` seconds each held job's lease is extended in the database. When a
heartbeat is refused (the job was cancelled from any replica, finished, or its lease expired and another
runner took it) `on_lost(job_id)` runs once and the job is dropped: the holder stops its work there.
A failed database round (a restart of PostgreSQL, a locked SQLite file) is retried at the next beat; if the
database stays away longer than the lease, the job is expired by whoever sees it first.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from backend.training.jobs import JobStore

log = logging.getLogger("tandem.training")


class LeaseKeeper:
    def __init__(self, store: JobStore, holder: str, lease_s: float,
                 on_lost: Callable[[int], None] | None = None) -> None:
        self.store, self.holder, self.lease_s = store, holder, lease_s
        self.on_lost = on_lost
        self._jobs: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tandem-lease", daemon=True)
        self._thread.start()

    def hold(self, job_id: int) -> None:
        with self._lock:
            self._jobs.add(job_id)

    def drop(self, job_id: int) -> None:
        with self._lock:
            self._jobs.discard(job_id)

    def held(self) -> set[int]:
        with self._lock:
            return set(self._jobs)

    def beat(self) -> list[int]:
        """One round: extend every lease; returns the jobs whose lease was refused."""
        lost = []
        for job_id in self.held():
            if not self.store.heartbeat(job_id, self.holder, self.lease_s):
                self.drop(job_id)
                lost.append(job_id)
                if self.on_lost is not None:
                    try:
                        self.on_lost(job_id)
                    except Exception:  # noqa: BLE001 - the other leases must still be kept
                        log.exception("job %s: stopping it after its lease was refused", job_id)
        return lost

    def _loop(self) -> None:
        while not self._stop.wait(max(0.2, self.lease_s / 3)):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - the database may be away for a moment: retry next beat
                log.exception("lease heartbeat (will retry)")

    def close(self) -> None:
        self._stop.set()


def keep_worker_lease(store: JobStore, job_id: int) -> LeaseKeeper:
    """In a worker process: heartbeat the job under the runner's holder id (TANDEM_JOB_HOLDER) while the worker
    runs, so the job lives exactly as long as its worker; a refused heartbeat (cancelled from any replica, or
    expired and failed) stops the worker's whole process group (its data loaders too)."""
    import os
    import signal

    from backend.training.jobs import new_holder_id

    holder = os.environ.get("TANDEM_JOB_HOLDER") or new_holder_id()
    lease_s = float(os.environ.get("TANDEM_LEASE_SECONDS") or 30)
    if not store.claim(job_id, holder, lease_s):
        raise SystemExit(f"job {job_id} is held by another runner")

    def stop(_job_id: int) -> None:
        print(f"job {job_id}: cancelled or its lease was lost; stopping", flush=True)
        os.killpg(os.getpgrp(), signal.SIGTERM)

    keeper = LeaseKeeper(store, holder, lease_s, on_lost=stop)
    keeper.hold(job_id)
    return keeper
