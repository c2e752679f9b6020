"""The repositories on both databases Tandem supports: the embedded SQLite default and PostgreSQL for replicas.

Every test runs twice, on a SQLite file and on a fresh database of a real PostgreSQL cluster (tests/postgres.py),
because the guarantees replicas rely on (one active job per project and kind, exactly one lease claimer, each
expired job failed once, one correction count) are the database's, and the two dialects enforce them differently.
"""

from __future__ import annotations

import json

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import supervision as sv
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, func, inspect, select

from backend.core.prediction import CLASS_NAME, CLASS_SCORES, Prediction
from backend.storage import migrate
from backend.storage.db import engine_for, normalise_url
from backend.storage.predictions import PredictionRepo, PredictionRow
from backend.storage.projects import ProjectRepo, ProjectState
from backend.storage.scores import ScoreRepo, ScoreSetup, TaskScore
from backend.storage.tables import jobs as jobs_table
from backend.storage.tables import metadata
from backend.training.jobs import ActiveJobExists, JobStatus, JobStore

THREADS = 20
BIG_ID = 2**40 + 7  # Label Studio ids are 64-bit; PostgreSQL's INTEGER would overflow


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tandem.sqlite3'}"
    return request.getfixturevalue("postgres_db")


def _together(n: int, fn):
    """Run fn(i) in n threads released at once by a barrier; results in thread order (exceptions returned)."""
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        try:
            return fn(i)
        except Exception as e:  # noqa: BLE001 - the caller asserts on what each thread got
            return e

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


# -- migrations -------------------------------------------------------------------------------------------
def test_migrations_run_from_empty_and_match_the_tables(db_url):
    engine = engine_for(db_url)
    with engine.connect() as conn:
        assert migrate.current(conn) == migrate.head()
        names = set(inspect(conn).get_table_names())
        assert set(metadata.tables) <= names
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        indexes = {ix["name"]: ix for ix in inspect(conn).get_indexes("jobs")}
    assert diff == [], f"tables.py and the newest migration disagree on {engine.dialect.name}: {diff}"
    assert indexes["one_active_job"]["unique"]
    migrate.upgrade(engine)  # at head: a no-op
    with engine.connect() as conn:
        assert migrate.current(conn) == migrate.head()


def test_replicas_starting_at_once_migrate_once(db_url):
    """Four processes' worth of engines upgrade one empty database together: the lock lets one migrate."""
    engines = [create_engine(normalise_url(db_url)) for _ in range(4)]
    try:
        results = _together(4, lambda i: migrate.upgrade(engines[i]))
        assert results == [None] * 4
        with engines[0].connect() as conn:
            assert migrate.current(conn) == migrate.head()
            assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar_one() == 1
    finally:
        for e in engines:
            e.dispose()


# -- jobs -------------------------------------------------------------------------------------------------
def test_job_lifecycle_transitions_are_conditional(db_url):
    store = JobStore(db_url)
    job = store.create(BIG_ID, "detect", "local", "manual", params={"epochs": 3}, holder="host-a:1:aa", lease_s=60)
    assert job.status == JobStatus.QUEUED and job.project_id == BIG_ID and job.params == {"epochs": 3}
    assert job.holder == "host-a:1:aa" and job.lease_until > time.time() + 50

    with pytest.raises(ActiveJobExists) as raised:
        store.create(BIG_ID, "detect", "local", "webhook")
    assert raised.value.active.id == job.id
    other_kind = store.create(BIG_ID, "detect", "local", "pre-annotate", kind="predict")
    assert other_kind.kind == "predict" and {j.id for j in store.all_active()} == {job.id, other_kind.id}

    assert not store.claim(job.id, "host-b:2:bb", lease_s=60)  # held, lease running
    assert not store.heartbeat(job.id, "host-b:2:bb")
    assert store.claim(job.id, "host-a:1:aa", lease_s=60)  # its holder may claim again
    assert store.start(job.id, pid=123) and not store.start(job.id)  # queued -> running once
    assert store.heartbeat(job.id, "host-a:1:aa", lease_s=60)
    store.set_progress(job.id, {"done": 4, "failed": 1, "remaining": 5})
    assert store.get(job.id).progress == {"done": 4, "failed": 1, "remaining": 5}

    assert store.expire_leases() == []  # lease still running
    expired = store.expire_leases(now=time.time() + 120)
    assert [j.id for j in expired] == [job.id] and expired[0].status == JobStatus.FAILED
    assert "host-a:1:aa stopped heartbeating" in expired[0].error
    assert f"`tandem train --project {BIG_ID}` starts it again" in expired[0].error
    assert store.expire_leases(now=time.time() + 120) == []  # failed once
    assert not store.heartbeat(job.id, "host-a:1:aa")  # the runner learns it must stop
    assert not store.finish(job.id, JobStatus.SUCCEEDED, version="v2")  # terminal states are final
    assert store.get(job.id).status == JobStatus.FAILED and store.get(job.id).version is None

    nxt = store.create(BIG_ID, "detect", "local", "after the failure")  # the slot is free again
    assert store.finish(nxt.id, JobStatus.CANCELLED)
    assert not store.finish(nxt.id, JobStatus.FAILED, error="worker died")  # a dying worker does not overwrite
    assert store.get(nxt.id).status == JobStatus.CANCELLED and store.get(nxt.id).error is None
    assert store.finish(other_kind.id, JobStatus.SUCCEEDED, metrics={"map50": 0.5}, promoted=True)
    done = store.get(other_kind.id)
    assert done.metrics == {"map50": 0.5} and done.promoted is True and done.finished_at is not None
    assert store.counts() == {"failed": 1, "cancelled": 1, "succeeded": 1}
    assert store.counts(kind="train") == {"failed": 1, "cancelled": 1}  # /metrics' training gauge
    assert store.counts(kind="predict") == {"succeeded": 1}
    assert store.get(2**63) is None and store.list(project_id=2**63) == []


def test_an_abandoned_queued_job_is_claimable_not_failed(db_url):
    store = JobStore(db_url)
    job = store.create(5, "detect", "local", "webhook", holder="gone:1:aa", lease_s=0.01)
    time.sleep(0.05)
    assert store.expire_leases() == []  # never started: nothing ran, nothing to fail
    assert [j.id for j in store.claimable()] == [job.id] and store.claimable(kind="predict") == []
    assert store.claim(job.id, "here:2:bb", lease_s=60)
    assert store.get(job.id).holder == "here:2:bb" and store.claimable() == []
    assert store.release(job.id, "here:2:bb") and store.get(job.id).holder is None
    assert not store.release(job.id, "here:2:bb")


def test_a_follow_up_is_taken_once(db_url):
    store = JobStore(db_url)
    job = store.create(6, "detect", "local", "webhook")
    assert store.set_follow_up(job.id, "10 more corrections")
    assert store.take_follow_up(job.id) is None  # still active
    store.finish(job.id, JobStatus.SUCCEEDED)
    assert not store.set_follow_up(job.id, "too late")
    taken = _together(THREADS, lambda i: store.take_follow_up(job.id))
    assert taken.count("10 more corrections") == 1 and taken.count(None) == THREADS - 1


def test_a_follow_up_keeps_the_trigger_folded_in_until_taken(db_url):
    store = JobStore(db_url)
    job = store.create(7, "yolo", "local", "webhook", {"epochs": 30})
    assert store.set_follow_up(job.id, "button", {"runner": "local", "model_kind": "yolo", "params": {"epochs": 5}})
    spec = {"runner": "modal", "model_kind": "vlm", "params": {"rank": 4}}
    assert store.set_follow_up(job.id, "lora button", spec)  # the last trigger folded in is the one run
    assert store.get(job.id).follow_up_spec == spec and store.get(job.id).params == {"epochs": 30}
    store.finish(job.id, JobStatus.FAILED, error="boom")
    assert store.get(job.id).follow_up_spec == spec  # still there for whoever queues the follow-up
    assert store.take_follow_up(job.id) == "lora button"
    assert store.get(job.id).follow_up is None and store.get(job.id).follow_up_spec is None


def test_an_automatic_trigger_keeps_a_follow_up_already_folded_in(db_url):
    store = JobStore(db_url)
    job = store.create(8, "yolo", "local", "button")
    auto = {"runner": "local", "model_kind": "yolo", "params": {}}
    assert store.set_follow_up(job.id, "schedule", auto, keep_existing=True)  # none yet: set
    asked = {"runner": "local", "model_kind": "vlm", "params": {"lora_rank": 8}}
    assert store.set_follow_up(job.id, "lora button", asked)  # someone asked: replaces
    assert store.set_follow_up(job.id, "10 new corrections", auto, keep_existing=True)  # kept, still True
    assert (store.get(job.id).follow_up, store.get(job.id).follow_up_spec) == ("lora button", asked)
    store.finish(job.id, JobStatus.SUCCEEDED)
    assert not store.set_follow_up(job.id, "schedule", auto, keep_existing=True)  # ended: the caller queues


def test_twenty_threads_triggering_one_project_make_exactly_one_active_job(db_url):
    store = JobStore(db_url)
    results = _together(THREADS, lambda i: store.create(BIG_ID, "detect", "local", f"trigger {i}"))
    made = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, ActiveJobExists)]
    assert len(made) == 1 and len(refused) == THREADS - 1, [type(r) for r in results]
    assert {r.active.id for r in refused} == {made[0].id}
    assert [j.id for j in store.active(BIG_ID)] == [made[0].id]
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(jobs_table)).scalar_one() == 1


def test_exactly_one_of_twenty_claimers_wins_and_an_expired_job_fails_once(db_url):
    store = JobStore(db_url)
    job = store.create(9, "detect", "local", "webhook")
    wins = _together(THREADS, lambda i: store.claim(job.id, f"replica-{i}:1:00", lease_s=60))
    assert wins.count(True) == 1 and wins.count(False) == THREADS - 1
    winner = f"replica-{wins.index(True)}:1:00"
    assert store.get(job.id).holder == winner and store.start(job.id)
    later = time.time() + 61  # every replica notices the lease ran out
    failed = _together(THREADS, lambda i: store.expire_leases(now=later))
    assert sorted(len(f) for f in failed) == [0] * (THREADS - 1) + [1]
    assert store.get(job.id).status == JobStatus.FAILED and winner in store.get(job.id).error


def test_corrections_are_counted_once_per_delivery_and_taken_by_one(db_url):
    store = JobStore(db_url)
    counts = _together(THREADS, lambda i: store.add_correction(BIG_ID, key=f"annotation-{i % 10}:t"))
    assert store.corrections(BIG_ID) == 10 and max(counts) == 10  # repeated deliveries not counted twice
    assert store.projects_with_corrections() == [BIG_ID]
    assert not store.take_corrections(BIG_ID, at_least=11)
    taken = _together(THREADS, lambda i: store.take_corrections(BIG_ID, at_least=10))
    assert taken.count(True) == 1 and store.corrections(BIG_ID) == 0
    assert store.add_correction(BIG_ID) == 1 and store.add_correction(BIG_ID, key="annotation-0:t") == 1


# -- predictions and scores -------------------------------------------------------------------------------
def _detections() -> Prediction:
    det = sv.Detections(xyxy=np.array([[1.5, 2.25, 30.0, 40.125]]), confidence=np.array([0.75]),
                        class_id=np.array([1]), data={CLASS_NAME: np.array(["Dog"], dtype=object),
                                                      CLASS_SCORES: np.array([[0.2, 0.75]])})
    return Prediction(detections=det, class_names=("Cat", "Dog"), candidate_peak=0.8, model_version="cnn-1")


def _row(task: int, controls=None, version="cnn-1", project=BIG_ID) -> PredictionRow:
    item = {"result": [{"id": f"r{task}", "value": {"x": task}}], "score": 0.5, "model_version": version}
    return PredictionRow(task, version, "fp", project, "cnn", "pre-annotation", item, controls or {})


def test_predictions_round_trip(db_url):
    store = PredictionRepo(db_url)
    try:
        tasks = [BIG_ID + n for n in range(1000)]
        assert store.put_many(_row(t) for t in tasks) == 1000
        store.put_many_later([_row(tasks[0], {"label": _detections()})])  # same key: replaces
        store.put_many([_row(tasks[1], version="cnn-2"), _row(7, project=8)])
        keys = [(t, "cnn-1", "fp") for t in tasks] + [(tasks[1], "cnn-1", "other-fp"), (1, "cnn-1", "fp")]
        items = store.get_items(keys)
        assert len(items) == 1000 and items[(tasks[-1], "cnn-1", "fp")]["result"][0]["value"] == {"x": tasks[-1]}
        controls = store.get_controls(keys)
        assert list(controls) == [(tasks[0], "cnn-1", "fp")]
        back = controls[(tasks[0], "cnn-1", "fp")]["label"]
        np.testing.assert_array_equal(back.detections.xyxy, _detections().detections.xyxy)
        np.testing.assert_array_equal(back.detections.data[CLASS_SCORES], [[0.2, 0.75]])
        assert list(back.detections.data[CLASS_NAME]) == ["Dog"] and back.class_names == ("Cat", "Dog")
        assert store.get_record_texts([(tasks[1], "cnn-1", "fp")]) == {}
        # the job's ledger check and its writer's read-back: the keys that exist, the item's JSON undecoded
        assert store.stored_keys(keys) == set(items) and len(store.stored_keys(keys)) == 1000
        texts = store.get_item_texts(keys[-3:])
        assert list(texts) == [(tasks[-1], "cnn-1", "fp")]
        assert json.loads(texts[(tasks[-1], "cnn-1", "fp")]) == items[(tasks[-1], "cnn-1", "fp")]
        assert store.count(BIG_ID) == 1001 and store.count() == 1002
        assert {r.task_id for r in store.for_project(BIG_ID, model_version="cnn-2")} == {tasks[1]}
        store.delete_project(BIG_ID)
        assert store.count() == 1 and store.for_project(8)[0].task_id == 7
    finally:
        store.close()


def test_scores_round_trip(db_url):
    repo = ScoreRepo(db_url)
    setup = ScoreSetup("cnn-1", "vlm-1", "plan", "label", "mean", 0.25)
    other = ScoreSetup("cnn-1", "", "plan", "label", "mean", 0.25)
    scores = [TaskScore(BIG_ID + n, n / 100, None if n % 2 else n / 50, f"reason {n}", f"fp{n}") for n in range(50)]
    assert repo.put_many(setup, BIG_ID, scores) == 50
    repo.put_many(setup, BIG_ID, [TaskScore(BIG_ID, 0.9, 0.1, "rescored", "fp0")])  # upsert
    wanted = {s.task_id: s.task_fingerprint for s in scores} | {BIG_ID + 1: "changed image"}
    got = repo.get_many(setup, wanted)
    assert set(got) == {BIG_ID + n for n in range(50)} - {BIG_ID + 1}
    assert got[BIG_ID] == TaskScore(BIG_ID, 0.9, 0.1, "rescored", "fp0")
    assert got[BIG_ID + 3] == scores[3] and got[BIG_ID + 4].disagreement == pytest.approx(0.08)
    assert repo.get_many(other, wanted) == {}


def test_project_bindings_round_trip(db_url):
    repo = ProjectRepo(db_url)
    state = ProjectState(BIG_ID, hostname="http://ls:8080", access_token="tok", label_config="<View/>",
                         label_map={"Car": "car"}, prompts={"car": "a car"}, model="cnn-3", pre_annotator="vlm",
                         extra_binding={"model": "cnn-3"})
    repo.save(state)
    assert repo.get(BIG_ID) == state and repo.get(1) is None
    updated = repo.update(BIG_ID, served_model="cnn-3", prompts={})
    assert repo.get(BIG_ID) == updated == state.with_changes(served_model="cnn-3", prompts={})
    repo.update(2, model="yolo.pt")
    assert [p.project_id for p in repo.all()] == [2, BIG_ID] and repo.count() == 2


def test_registry_candidates_promotions_and_events(db_url, tmp_path):
    from backend.registry import Registry

    registry = Registry(db_url)
    weights = tmp_path / "start.pt"
    weights.write_bytes(b"weights")
    registry.record_served("start", "start", "detect", str(weights))
    assert registry.current().version == "start" and registry.latest_promotion() == 0.0
    registry.add_candidate("cand-1", "p7-job1", "detect", weights.as_uri(), "start", "snap-1",
                           {"candidate": {"fitness": 0.6}}, project_id=BIG_ID)
    registry.add_candidate("cand-2", "job2", "detect", str(weights), "start", "snap-2", {"candidate": {"fitness": 0.7}})
    got = registry.get("cand-1")
    assert got.status == "candidate" and got.project_id == BIG_ID and got.metrics == {"candidate": {"fitness": 0.6}}
    assert got.parent == "start" and got.path == weights.as_uri() and registry.resolve(str(weights)) is not None

    before = time.time()
    registry.set_status("cand-1", "promoted")
    seen = registry.latest_promotion()
    assert seen >= before and registry.current().version == "start"  # a project's promotion is not the default's
    assert registry.promoted() == []
    time.sleep(0.01)
    registry.set_status("cand-2", "promoted")
    assert registry.latest_promotion() > seen and registry.current().version == "cand-2"
    assert [v.version for v in registry.promoted(task="detect")] == ["cand-2"]
    registry.set_status("cand-2", "rejected", metrics={"rolled_back": True})
    assert registry.promoted() == [] and registry.get("cand-2").metrics == {"rolled_back": True}
    assert registry.trained_on("snap-1", "start").version == "cand-1" and registry.trained_on("snap-1", "x") is None

    for action in ("ANNOTATION_CREATED", "ANNOTATION_CREATED", "START_TRAINING"):
        registry.record_event(BIG_ID, action)
    registry.record_event(None, "PROJECT_UPDATED")
    assert registry.event_counts(BIG_ID) == {"ANNOTATION_CREATED": 2, "START_TRAINING": 1}
    assert sum(registry.event_counts().values()) == 4
    registry.record_synced(BIG_ID, "cand-1")
    registry.record_synced(BIG_ID, "cand-2")
    assert registry.synced_version(BIG_ID) == "cand-2" and registry.synced_version(1) is None


def test_predict_job_records_hand_over_and_take_over_once(db_url):
    from backend.batch.records import ActiveJobExists as PredictJobExists
    from backend.batch.records import PredictJobs

    jobs = PredictJobs(db_url)
    server = "server:1:aa"
    job = jobs.create(BIG_ID, "local", {"concurrency": 4}, holder=server)
    with pytest.raises(PredictJobExists):
        jobs.create(BIG_ID, "local", {})
    assert JobStore(db_url).create(BIG_ID, "detect", "local", "train beside it").kind == "train"  # other kind
    assert jobs.resumable(BIG_ID) is None  # its holder's lease runs
    # the server hands the job to its process; of twenty processes told the same, one takes it
    wins = _together(THREADS, lambda i: jobs.claim(job.id, f"proc-{i}:1:bb", handed_by=server))
    assert wins.count(True) == 1
    holder = f"proc-{wins.index(True)}:1:bb"
    assert jobs.get(job.id).status == JobStatus.RUNNING and jobs.get(job.id).holder == holder
    progress = {"total": 10, "done": 4, "failed": 0, "remaining": 6}
    assert jobs.set_progress(job.id, holder, progress) and jobs.get(job.id).progress == progress
    assert not jobs.set_progress(job.id, "someone:2:cc", {**progress, "done": 9})  # not the holder: told to stop
    assert jobs.get(job.id).progress == progress  # and what it sent is not written
    assert jobs.cancel(job.id) and not jobs.finish(job.id, "succeeded")
    assert jobs.get(job.id).status == JobStatus.CANCELLED and [j.id for j in jobs.list(BIG_ID)] == [job.id]


def test_a_project_id_past_64_bits_is_no_project(tmp_path):
    """/health?project=2**63 (a fuzzer found it) asks the repository for a project no column can hold."""
    from backend.storage.projects import ProjectRepo

    assert ProjectRepo(f"sqlite:///{tmp_path / 'p.sqlite3'}").get(2**63) is None
