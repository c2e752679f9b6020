"""Rule: no job stays 'running' for a worker that is gone, and training processes are capped.

- the reaper survives any error (here: SQLite's 'database or disk is full') and records the failure later;
- a dead worker is collected (no zombie) and its job failed;
- a restarted server fails the jobs of workers the previous one left, once they die — and a pid now used by
  another process does not count as the worker (start time checked, not only the pid);
- at most `max_concurrent` workers run; the rest wait queued, in order, and a restarted server takes over the
  queue of one that stopped;
- the auto-retrain correction counter is kept in TANDEM_HOME, and a repeated webhook delivery is counted once.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from backend.registry import Registry
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.training.jobs import JobStatus, JobStore
from backend.training.runner import LocalRunner, mark_orphans, process_alive, process_identity
from backend.training.service import TrainingPolicy, TrainingService


def _sleeper(seconds: float, code: int = 1) -> list[str]:
    return [sys.executable, "-c", f"import sys, time; time.sleep({seconds}); sys.exit({code})"]


def _until(check, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return check()


class FullDisk(JobStore):
    """The real store, whose first `n` finishes fail as SQLite does when the disk is full."""

    def __init__(self, path: Path, n: int) -> None:
        super().__init__(path)
        self.failures_left = n

    def finish(self, *args, **kwargs):
        if self.failures_left > 0:
            self.failures_left -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return super().finish(*args, **kwargs)


def test_the_reaper_survives_errors_and_records_the_failure_later(tmp_path):
    settings = Settings(home=tmp_path / "home")
    store = FullDisk(settings.db_path, n=2)
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
    store = JobStore(settings.db_path)
    runner = LocalRunner(settings, store, worker_argv=_sleeper(60))
    try:
        job = store.create(1, "yolo", "local", "test")
        proc = runner.start(job)
        store.update(job.id, status=JobStatus.RUNNING)
        os.kill(proc.pid, signal.SIGKILL)
        assert _until(lambda: store.get(job.id).status is JobStatus.FAILED)
        assert "signal 9" in store.get(job.id).error
        assert _until(lambda: not Path(f"/proc/{proc.pid}").exists())  # collected: no zombie left
    finally:
        runner.close()


def test_a_restarted_server_reaps_what_the_previous_one_left(tmp_path):
    settings = Settings(home=tmp_path / "home")
    store = JobStore(settings.db_path)
    left = subprocess.Popen(_sleeper(60), start_new_session=True)  # a worker the previous server started
    job = store.create(1, "yolo", "local", "test")
    store.record_process(job.id, left.pid, process_identity(left.pid))
    store.update(job.id, status=JobStatus.RUNNING, pid=left.pid)
    runner = LocalRunner(settings, store)  # the new server
    try:
        time.sleep(2.5)
        assert store.get(job.id).status is JobStatus.RUNNING  # alive: left alone
        left.kill()
        left.wait()
        assert _until(lambda: store.get(job.id).status is JobStatus.FAILED, timeout=10)
    finally:
        runner.close()


def test_a_reused_pid_is_not_the_worker(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3")
    reused = store.create(1, "yolo", "local", "test")  # its pid is now this test process
    store.record_process(reused.id, os.getpid(), "another-boot:12345")
    store.update(reused.id, status=JobStatus.RUNNING, pid=os.getpid())
    legacy = store.create(2, "yolo", "local", "test")  # no identity recorded: the command line decides
    store.update(legacy.id, status=JobStatus.RUNNING, pid=os.getpid())
    live = subprocess.Popen(_sleeper(30))
    try:
        alive = store.create(3, "yolo", "local", "test")
        store.record_process(alive.id, live.pid, process_identity(live.pid))
        store.update(alive.id, status=JobStatus.QUEUED, pid=live.pid)
        assert mark_orphans(store) == 2
        assert store.get(reused.id).status is JobStatus.FAILED and store.get(legacy.id).status is JobStatus.FAILED
        assert store.get(alive.id).status is JobStatus.QUEUED
        assert process_alive(live.pid, process_identity(live.pid))
    finally:
        live.kill()
        live.wait()
    assert not process_alive(live.pid, process_identity(live.pid))


def test_training_processes_are_capped_and_the_rest_queue(tmp_path):
    settings = Settings(home=tmp_path / "home")
    store = JobStore(settings.db_path)
    runner = LocalRunner(settings, store, max_concurrent=1, worker_argv=_sleeper(1.5))
    try:
        jobs = [store.create(p, "yolo", "local", "test") for p in (1, 2, 3)]
        assert runner.start(jobs[0]) is not None
        assert runner.start(jobs[1]) is None and runner.start(jobs[2]) is None
        assert store.get(jobs[1].id).pid is None and runner.queued() == [jobs[1].id, jobs[2].id]
        assert runner.cancel(jobs[2].id)  # a queued job cancels without a process
        assert _until(lambda: store.get(jobs[1].id).pid is not None)  # started once the first ended
        assert store.get(jobs[0].id).status is JobStatus.FAILED  # (the sleeper exits 1)
        assert _until(lambda: store.get(jobs[1].id).status is JobStatus.FAILED)
        assert store.get(jobs[2].id).status is JobStatus.CANCELLED and store.get(jobs[2].id).pid is None
    finally:
        runner.close()


def test_workers_of_other_processes_count_toward_the_cap(tmp_path):
    settings = Settings(home=tmp_path / "home")
    store = JobStore(settings.db_path)
    other = subprocess.Popen(_sleeper(60))
    try:
        theirs = store.create(1, "yolo", "local", "cli")
        store.record_process(theirs.id, other.pid, process_identity(other.pid))
        store.update(theirs.id, status=JobStatus.RUNNING, pid=other.pid)
        runner = LocalRunner(settings, store, max_concurrent=1, worker_argv=_sleeper(0.1))
        mine = store.create(2, "yolo", "local", "test")
        assert runner.start(mine) is None
        other.kill()
        other.wait()
        assert _until(lambda: store.get(mine.id).pid is not None)
        runner.close()
    finally:
        other.kill()
        other.wait()


def test_a_new_server_takes_over_a_stopped_servers_queue(tmp_path):
    settings = Settings(home=tmp_path / "home")
    store = JobStore(settings.db_path)
    job = store.create(1, "yolo", "local", "test")
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    store.hold(job.id, f"{boot}:999999999999")  # held by a server process that no longer exists
    runner = LocalRunner(settings, store, max_concurrent=1, worker_argv=_sleeper(0.1))
    try:
        assert _until(lambda: store.get(job.id).pid is not None)
    finally:
        runner.close()


def test_the_correction_counter_survives_a_restart_and_counts_a_delivery_once(tmp_path):
    settings = Settings(home=tmp_path / "home")
    policy = TrainingPolicy(train_after=100)
    service = TrainingService(settings, ModelHolder(), Registry(settings.db_path), policy)
    for key in ("ANNOTATION_CREATED:1:t1", "ANNOTATION_CREATED:1:t1", "ANNOTATION_UPDATED:1:t2", None):
        service.on_webhook(key.split(":")[0] if key else "ANNOTATION_CREATED", 5, key=key)
    service.close()
    again = TrainingService(settings, ModelHolder(), Registry(settings.db_path), policy)
    try:
        assert again.store.corrections(5) == 3  # the repeated delivery counted once; the restart forgot nothing
        assert again.store.projects_with_corrections() == [5]
    finally:
        again.close()
