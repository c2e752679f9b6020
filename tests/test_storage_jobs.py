"""Jobs across replicas, at the level of the training service: two `TrainingService`s (two replicas' job services,
each with its own runner, lease holder and reaper thread) on one database, SQLite and a real PostgreSQL.

The repositories' own guarantees are tested in tests/test_storage_dialects.py; here the service must use them:
- 20 threads triggering training on one project through both replicas make exactly one active job, and the
  other triggers fold into one follow-up that runs once when the job ends;
- annotation webhooks alternating between the replicas are counted in the database: TANDEM_TRAIN_AFTER
  corrections start exactly one job;
- a running job whose holder stopped heartbeating is failed by the other replica once its lease runs out;
- a queued job whose holder vanished before starting it is taken over and run by the other replica;
- a cancel through one replica stops the worker the other replica runs (through the refused heartbeat).

Workers are short sleepers whose command line is a training worker's (what another runner checks in /proc),
so what is tested is the job machinery, not training.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from backend.registry import Registry
from backend.serving import ModelHolder
from backend.settings import Settings
from backend.training.jobs import JobStatus, JobStore
from backend.training.service import TrainingPolicy, TrainingService
from tests.harness import until

THREADS = 20


def _worker(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time; time.sleep({seconds})", "backend.training.worker"]


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path) -> Settings:
    db_url = None if request.param == "sqlite" else request.getfixturevalue("postgres_db")
    return Settings(home=tmp_path / "home", db_url=db_url, lease_seconds=1.5)


@pytest.fixture
def replicas(settings):
    made: list[TrainingService] = []

    def make(train_after: int = 1000, worker_s: float = 60) -> TrainingService:
        policy = TrainingPolicy(train_after=train_after, interval_s=0)
        service = TrainingService(settings, ModelHolder(), Registry(settings.database_url), policy,
                                  watch_interval_s=3600)
        service.runner.worker_argv = _worker(worker_s)
        made.append(service)
        return service

    yield make
    for service in made:
        for job_id in service.runner.running():
            service.cancel(job_id)
        service.close()


def _until(check, timeout: float = 20.0) -> bool:
    return until(check, timeout)


def _together(n: int, fn):
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_twenty_threads_triggering_through_two_replicas_make_one_job_and_one_follow_up(replicas):
    a, b = replicas(worker_s=2), replicas(worker_s=2)
    jobs = _together(THREADS, lambda i: (a, b)[i % 2].trigger(5, f"trigger {i}"))
    assert len({j.id for j in jobs}) == 1  # every caller got the one job
    first = jobs[0].id
    assert [j.id for j in a.store.active(5)] == [first]
    assert a.store.get(first).follow_up and a.store.get(first).follow_up.startswith("trigger ")
    # the job ends (its worker exits without a verdict: failed); exactly one follow-up is queued, by one replica
    assert _until(lambda: a.store.get(first).status is JobStatus.FAILED)
    assert _until(lambda: len(a.store.list(5)) == 2)
    follow = a.store.list(5)[0]
    assert follow.reason.startswith("coalesced: trigger ") and follow.id != first
    assert _until(lambda: not a.store.get(follow.id).status.active)
    time.sleep(3)  # both reapers go round again
    assert len(a.store.list(5)) == 2  # nothing was pending after the follow-up: no third job


def test_webhooks_alternating_between_replicas_start_exactly_one_job(replicas):
    train_after = 10
    a, b = replicas(train_after), replicas(train_after)
    events = 2 * train_after - 1  # enough for one job, never for two
    started = _together(events, lambda i: (a, b)[i % 2].on_webhook(
        "ANNOTATION_CREATED", 6, key=f"ANNOTATION_CREATED:{i}:t"))
    made = {j.id for j in started if j is not None}
    assert len(made) == 1 and [j.id for j in a.store.list(6)] == list(made)
    assert a.store.list(6)[0].reason == f"{train_after} new corrections"
    left = a.store.corrections(6)
    assert left < train_after  # the job took its corrections; what came after counts toward the next one
    # repeated deliveries of the same annotations, through either replica, are not counted again
    for i in range(events):
        assert (b, a)[i % 2].on_webhook("ANNOTATION_CREATED", 6, key=f"ANNOTATION_CREATED:{i}:t") is None
    assert b.store.corrections(6) == left and len(b.store.list(6)) == 1


def test_a_job_whose_holder_stopped_heartbeating_is_failed_by_the_other_replica(settings, replicas):
    store = JobStore(settings.database_url)
    job = store.create(7, "yolo", "local", "on replica A", holder="replica-a-host:4242:dead", lease_s=1.5)
    assert store.start(job.id, pid=4242)
    assert store.set_follow_up(job.id, "a webhook meanwhile")
    b = replicas(worker_s=0.5)
    time.sleep(1.0)
    assert store.get(job.id).status is JobStatus.RUNNING  # within its lease: left alone (another host's pid)
    assert _until(lambda: store.get(job.id).status is JobStatus.FAILED, timeout=10)
    assert "lease expired: replica-a-host:4242:dead stopped heartbeating" in store.get(job.id).error
    # the replica that noticed it queues the coalesced follow-up, once, and nothing runs beside it
    assert _until(lambda: len(store.list(7)) == 2)
    follow = store.list(7)[0]
    assert follow.reason == "coalesced: a webhook meanwhile" and follow.holder in (b.runner.holder, None)
    assert len(store.active(7)) <= 1


def test_a_queued_job_of_a_vanished_replica_is_taken_over_and_run(settings, replicas):
    store = JobStore(settings.database_url)
    job = store.create(8, "yolo", "local", "queued on replica A", holder="replica-a-host:4242:gone", lease_s=0.5)
    held = store.create(9, "yolo", "local", "queued on a live replica", holder="replica-c-host:1:beat",
                        lease_s=3600)
    b = replicas(worker_s=0.5)
    assert _until(lambda: store.get(job.id).pid is not None, timeout=15)  # claimed and started on B
    assert _until(lambda: not store.get(job.id).status.active)
    assert "lease expired" not in (store.get(job.id).error or "")  # run, not failed: no worker had run yet
    assert store.get(held.id).status is JobStatus.QUEUED and store.get(held.id).pid is None  # its holder lives
    assert store.get(held.id).holder == "replica-c-host:1:beat" and b.runner.queued() == []


def test_a_cancel_through_one_replica_stops_the_worker_the_other_runs(replicas):
    a, b = replicas(worker_s=60), replicas()
    job = a.trigger(10, "button")
    assert _until(lambda: a.store.get(job.id).pid is not None)
    proc = a.runner._procs[job.id]
    assert b.cancel(job.id)  # B never started this worker (on another host only A's refused heartbeat stops it)
    assert _until(lambda: proc.poll() is not None, timeout=10)
    assert b.store.get(job.id).status is JobStatus.CANCELLED and b.store.get(job.id).error == "cancelled"
    assert not b.cancel(job.id) and not a.cancel(job.id)  # a finished job is not cancelled twice


def test_transitions_are_conditional(settings):
    store = JobStore(settings.database_url)
    job = store.create(11, "yolo", "local", "t")
    assert store.start(job.id, pid=1) and not store.start(job.id, pid=2)  # started once
    assert store.finish(job.id, JobStatus.SUCCEEDED, version="v9")
    assert not store.finish(job.id, JobStatus.FAILED, error="late")  # a finished job stays finished
    assert not store.claim(job.id, "anyone:1:x") and not store.heartbeat(job.id, "anyone:1:x")
    done = store.get(job.id)
    assert (done.status, done.error, done.version, done.pid) == (JobStatus.SUCCEEDED, None, "v9", 1)
    again = store.create(11, "yolo", "local", "t2")  # the project is free again
    assert again.id != job.id and store.finish(again.id, JobStatus.CANCELLED)
    assert not store.start(again.id)  # a cancelled job is never started by a late worker
