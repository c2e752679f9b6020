"""Rule: no job stays 'running' for a worker that is gone, and training processes are capped.

- the reaper survives any error (here: SQLite's 'database or disk is full') and records the failure later;
- a dead worker is collected (no zombie) and its job failed at once, with the signal;
- a restarted server fails the jobs of workers the previous one left, once they die — and a pid now used by
  another process (not that job's worker) does not count as the worker;
- a running job held by another host is left to its lease: failed once the lease runs out, not before;
- at most `max_concurrent` workers run; the rest wait queued, in order, and a new server takes over the
  queue of one that stopped once its lease ran out (never a queue whose holder still heartbeats);
- a cancel from anywhere stops the holder's worker through the refused heartbeat;
- the auto-retrain correction counter is kept in the database, and a repeated webhook delivery is counted once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy.exc import OperationalError

from backend.registry import Registry
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.training.jobs import JobStatus, JobStore
from backend.training.runner import LocalRunner, mark_orphans, reap_abandoned, worker_alive
from backend.training.service import TrainingPolicy, TrainingService
from tests.harness import until as _until


def _sleeper(seconds: float, code: int = 1) -> list[str]:
    return [sys.executable, "-c", f"import sys, time; time.sleep({seconds}); sys.exit({code})"]


def _worker_like(seconds: float, job_id: int) -> subprocess.Popen:
    """A process whose command line is a training worker's for `job_id` (what /proc shows of a real one)."""
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})", "backend.training.worker",
                             str(job_id)], start_new_session=True)


class FullDisk(JobStore):
    """The real store, whose first `n` finishes fail as the database does when the disk is full."""

    def __init__(self, url: str, n: int) -> None:
        super().__init__(url)
        self.failures_left = n

    def finish(self, *args, **kwargs):
        if self.failures_left > 0:
            self.failures_left -= 1
            raise OperationalError("UPDATE jobs", {}, Exception("database or disk is full"))
        return super().finish(*args, **kwargs)


def test_the_reaper_survives_errors_and_records_the_failure_later(tmp_path):
    settings = Settings(home=tmp_path / "home")
    store = FullDisk(settings.database_url, n=2)
    ended = []

    def on_done(job):
        ended.append(job.id)
        raise RuntimeError("a follow-up that cannot start")

    runner = LocalRunner(settings, store, on_done=on_done, worker_argv=_sleeper(0, code=3))
    try:
        job = store.create(1, "yolo", "local", "test")
        runner.start(job)
        assert _until(lambda: store.get(job.id).status is JobStatus.FAILED)
        assert "exited with code 3" in store.get(job.id).error
        assert runner.errors >= 2 and runner._reaper.is_alive()
        job2 = store.create(2, "yolo", "local", "test")
        runner.start(job2)  # the reaper still works after errors in on_done too
        assert _until(lambda: store.get(job2.id).status is JobStatus.FAILED)
        assert ended == [job.id, job2.id] and runner._reaper.is_alive()
    finally:
        runner.close()


def test_a_killed_worker_is_collected_and_failed(tmp_path):
    settings = Settings(home=tmp_path / "home")
    store = JobStore(settings.database_url)
    runner = LocalRunner(settings, store, worker_argv=_sleeper(60))
    try:
        job = store.create(1, "yolo", "local", "test")
        proc = runner.start(job)
        assert store.get(job.id).holder == runner.holder  # claimed before its worker started
        assert store.start(job.id, pid=proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        assert _until(lambda: store.get(job.id).status is JobStatus.FAILED)
        assert "signal 9" in store.get(job.id).error  # at once, by its runner: not a lease later
        assert _until(lambda: not Path(f"/proc/{proc.pid}").exists())  # collected: no zombie left
        # the lease is given back right after the failure is recorded (a moment later on a loaded machine)
        assert _until(lambda: store.get(job.id).holder is None and runner.leases.held() == set())
    finally:
        runner.close()


def test_a_restarted_server_reaps_what_the_previous_one_left(tmp_path):
    settings = Settings(home=tmp_path / "home")
    store = JobStore(settings.database_url)
    job = store.create(1, "yolo", "local", "test", holder="gone-server-holder")
    left = _worker_like(60, job.id)  # a worker the previous server started on this host
    store.start(job.id, pid=left.pid)
    store.heartbeat(job.id, "gone-server-holder", lease_s=3600)  # its worker still heartbeats
    runner = LocalRunner(settings, store)  # the new server
    try:
        time.sleep(2.5)
        assert store.get(job.id).status is JobStatus.RUNNING  # alive: left alone
        left.kill()
        left.wait()
        assert _until(lambda: store.get(job.id).status is JobStatus.FAILED, timeout=10)  # long before its lease
        assert "worker process disappeared" in store.get(job.id).error
    finally:
        runner.close()
        left.kill()


def test_a_reused_pid_is_not_the_worker(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3")
    reused = store.create(1, "yolo", "local", "test")  # its pid is now this test process, not a worker
    store.start(reused.id, pid=os.getpid())
    alive = store.create(3, "yolo", "local", "test")
    live = _worker_like(30, alive.id)
    try:
        stolen = store.create(2, "yolo", "local", "test")  # its pid is now the worker of another job
        store.start(stolen.id, pid=live.pid)
        store.update(alive.id, pid=live.pid)  # queued, its worker starting
        assert mark_orphans(store) == 2
        assert store.get(reused.id).status is JobStatus.FAILED and store.get(stolen.id).status is JobStatus.FAILED
        assert store.get(alive.id).status is JobStatus.QUEUED
        assert worker_alive(live.pid, alive.id) and not worker_alive(live.pid, stolen.id)
        assert not worker_alive(os.getpid())
    finally:
        live.kill()
        live.wait()
    assert not worker_alive(live.pid, alive.id)


def test_a_job_held_on_another_host_is_failed_when_its_lease_runs_out_not_before(tmp_path):
    """Its pid means nothing here: only the lease says whether its runner lives."""
    store = JobStore(tmp_path / "db.sqlite3")
    job = store.create(1, "yolo", "local", "test", holder="another-host:4242:abcd", lease_s=1.0)
    store.start(job.id, pid=1)  # pid 1 here is init, not its worker: must not be looked at
    assert reap_abandoned(store) == [] and store.get(job.id).status is JobStatus.RUNNING
    assert store.heartbeat(job.id, "another-host:4242:abcd", lease_s=1.0)  # its runner still beats
    assert not store.heartbeat(job.id, "someone-else:1:ffff")  # and only its holder may
    time.sleep(1.2)  # the holder stops heartbeating
    failed = reap_abandoned(store)
    assert [j.id for j in failed] == [job.id]
    assert failed[0].status is JobStatus.FAILED and "lease expired: another-host:4242:abcd" in failed[0].error
    assert reap_abandoned(store) == []  # failed once
    assert not store.heartbeat(job.id, "another-host:4242:abcd")  # a late heartbeat is refused: it must stop


def test_training_processes_are_capped_and_the_rest_queue(tmp_path):
    settings = Settings(home=tmp_path / "home")
    store = JobStore(settings.database_url)
    runner = LocalRunner(settings, store, max_concurrent=1, worker_argv=_sleeper(1.5))
    try:
        jobs = [store.create(p, "yolo", "local", "test") for p in (1, 2, 3)]
        assert runner.start(jobs[0]) is not None
        assert runner.start(jobs[1]) is None and runner.start(jobs[2]) is None
        assert store.get(jobs[1].id).pid is None and runner.queued() == [jobs[1].id, jobs[2].id]
        assert store.get(jobs[1].id).holder == runner.holder  # queued here, and held (heartbeaten) here
        assert runner.cancel(jobs[2].id)  # a queued job cancels without a process
        assert _until(lambda: store.get(jobs[1].id).pid is not None)  # started once the first ended
        assert store.get(jobs[0].id).status is JobStatus.FAILED  # (the sleeper exits 1)
        assert _until(lambda: store.get(jobs[1].id).status is JobStatus.FAILED)
        assert store.get(jobs[2].id).status is JobStatus.CANCELLED and store.get(jobs[2].id).pid is None
    finally:
        runner.close()


def test_workers_of_other_processes_count_toward_the_cap(tmp_path):
    settings = Settings(home=tmp_path / "home")
    store = JobStore(settings.database_url)
    theirs = store.create(1, "yolo", "local", "cli")
    other = _worker_like(60, theirs.id)
    try:
        store.start(theirs.id, pid=other.pid)
        runner = LocalRunner(settings, store, max_concurrent=1, worker_argv=_sleeper(0.1))
        mine = store.create(2, "yolo", "local", "test")
        assert runner.start(mine) is None
        time.sleep(1.0)
        assert store.get(mine.id).pid is None  # still waiting for the other process's worker
        other.kill()
        other.wait()
        assert _until(lambda: store.get(mine.id).pid is not None)
        runner.close()
    finally:
        other.kill()
        other.wait()


def test_a_new_server_takes_over_a_stopped_servers_queue_once_its_lease_ran_out(tmp_path):
    settings = Settings(home=tmp_path / "home", lease_seconds=5)
    store = JobStore(settings.database_url)
    stale = store.create(1, "yolo", "local", "test", holder="stopped-host:999999:dead", lease_s=-1)
    fresh = store.create(2, "yolo", "local", "test", holder="live-host:1:beat", lease_s=3600)
    runner = LocalRunner(settings, store, max_concurrent=1, worker_argv=_sleeper(0.1), take_over=True)
    try:
        assert _until(lambda: store.get(stale.id).pid is not None)  # claimed and run: no worker had run yet
        assert store.get(stale.id).holder in (runner.holder, None)
        assert store.get(fresh.id).status is JobStatus.QUEUED and store.get(fresh.id).pid is None
        assert store.get(fresh.id).holder == "live-host:1:beat"  # its holder still heartbeats: left alone
    finally:
        runner.close()


def test_a_cancel_from_another_process_stops_the_holders_worker(tmp_path):
    """The cancel is a status change in the database; the holder's next heartbeat is refused and it stops."""
    settings = Settings(home=tmp_path / "home", lease_seconds=0.9)
    store = JobStore(settings.database_url)
    runner = LocalRunner(settings, store, worker_argv=_sleeper(60))
    try:
        job = store.create(1, "yolo", "local", "test")
        proc = runner.start(job)
        store.start(job.id, pid=proc.pid)
        elsewhere = JobStore(settings.database_url)  # e.g. another replica (no pid signal: only the database)
        assert elsewhere.finish(job.id, JobStatus.CANCELLED, error="cancelled")
        assert _until(lambda: proc.poll() is not None, timeout=10)
        assert proc.returncode == -signal.SIGTERM
        assert store.get(job.id).status is JobStatus.CANCELLED  # the dying worker did not overwrite it
    finally:
        runner.close()


def test_the_correction_counter_survives_a_restart_and_counts_a_delivery_once(tmp_path):
    settings = Settings(home=tmp_path / "home")
    policy = TrainingPolicy(train_after=100)
    service = TrainingService(settings, ModelHolder(), Registry(settings.database_url), policy)
    for key in ("ANNOTATION_CREATED:1:t1", "ANNOTATION_CREATED:1:t1", "ANNOTATION_UPDATED:1:t2", None):
        service.on_webhook(key.split(":")[0] if key else "ANNOTATION_CREATED", 5, key=key)
    service.close()
    again = TrainingService(settings, ModelHolder(), Registry(settings.database_url), policy)
    try:
        # the repeated delivery counted once, the one that names no annotation not at all (Label Studio's always
        # name theirs); the restart forgot nothing
        assert again.store.corrections(5) == 2
        assert again.store.projects_with_corrections() == [5]
    finally:
        again.close()


def test_a_deletion_tandem_accept_undo_expects_is_not_counted_as_a_correction(tmp_path):
    """`tandem accept --undo` deletes its own annotations; Label Studio's ANNOTATIONS_DELETED webhooks for them
    carry only ids. Their keys are recorded before each delete, so the deliveries are not a person's work."""
    from backend.server.protocol import WebhookRequest

    settings = Settings(home=tmp_path / "home")
    service = TrainingService(settings, ModelHolder(), Registry(settings.database_url), TrainingPolicy(train_after=100))
    try:
        def delivery(annotation_id):  # the payload Label Studio 1.23 sends for DELETE /api/annotations/{id}
            return WebhookRequest(**{"action": "ANNOTATIONS_DELETED", "project": {"id": 5, "title": "p"},
                                     "annotations": [{"id": annotation_id}]})

        service.store.expect_delivery(WebhookRequest(action="ANNOTATIONS_DELETED", project=5,
                                                     annotations=[{"id": 42}]).event_key())
        service.on_webhook("ANNOTATIONS_DELETED", 5, key=delivery(42).event_key())
        assert service.store.corrections(5) == 0
        service.on_webhook("ANNOTATIONS_DELETED", 5, key=delivery(43).event_key())  # a person's deletion counts
        assert service.store.corrections(5) == 1
    finally:
        service.close()
