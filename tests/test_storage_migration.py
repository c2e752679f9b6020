"""A TANDEM_HOME made by the code before migrations is migrated at start-up, and none of its rows is lost.

The old database is built here with the exact statements that code ran (`git show c21137f:backend/registry.py`,
`…:backend/training/jobs.py`, and `…:backend/storage/tables.py` as SQLite's `create_all` emitted it), filled with
rows of every table, and then opened the way every Tandem process opens it: through the repositories, which run
Alembic's `upgrade head` first. A second, older home (before per-project versions: no `model_versions.project_id`)
is migrated too.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect

from backend.registry import Registry
from backend.settings import Settings
from backend.storage import migrate
from backend.storage.db import dispose, engine_for
from backend.storage.predictions import PredictionRepo
from backend.storage.projects import ProjectRepo
from backend.storage.scores import ScoreRepo, ScoreSetup
from backend.training.jobs import JobStatus, JobStore
from backend.training.runner import reap_abandoned

# backend/registry.py at c21137f
OLD_REGISTRY = """
CREATE TABLE IF NOT EXISTS model_versions (
    version     TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    task        TEXT NOT NULL,
    path        TEXT,
    created_at  REAL NOT NULL,
    served_at   REAL,
    metrics     TEXT NOT NULL DEFAULT '{}',
    parent      TEXT,
    dataset     TEXT,
    status      TEXT NOT NULL DEFAULT 'served',  -- served | candidate | promoted | rejected | rolled back
    promoted_at REAL,
    project_id  INTEGER                          -- the project a job made it for; NULL: server-wide
);
CREATE TABLE IF NOT EXISTS webhook_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id  INTEGER,
    action      TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS project_versions (
    project_id    INTEGER PRIMARY KEY,
    model_version TEXT NOT NULL,
    synced_at     REAL NOT NULL
);
"""

# backend/training/jobs.py at c21137f
OLD_JOBS = """
CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id  INTEGER NOT NULL,
    model_kind  TEXT NOT NULL,
    runner      TEXT NOT NULL,
    status      TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    params      TEXT NOT NULL DEFAULT '{}',
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    pid         INTEGER,
    remote_id   TEXT,
    error       TEXT,
    version     TEXT,
    promoted    INTEGER,
    metrics     TEXT NOT NULL DEFAULT '{}'
);
-- which process a job's pid is: the pid alone may be reused by another process after a restart
CREATE TABLE IF NOT EXISTS job_process (
    job_id      INTEGER PRIMARY KEY,
    pid         INTEGER,
    identity    TEXT,           -- boot id and start time of the worker process
    holder      TEXT            -- identity of the server process holding the job in its queue (no pid yet)
);
-- annotation webhooks counted toward auto-retrain, kept across restarts
CREATE TABLE IF NOT EXISTS corrections (
    project_id  INTEGER PRIMARY KEY,
    count       INTEGER NOT NULL DEFAULT 0,
    updated_at  REAL NOT NULL
);
-- recent webhook deliveries already counted (Label Studio retries and repeats them); bounded
CREATE TABLE IF NOT EXISTS correction_events (
    key         TEXT PRIMARY KEY,
    at          REAL NOT NULL
);
"""

# backend/storage/tables.py at c21137f, as metadata.create_all emitted it on SQLite
OLD_STORE = """
CREATE TABLE projects (
	project_id BIGINT NOT NULL,
	hostname VARCHAR(500),
	access_token TEXT,
	label_config TEXT,
	label_map TEXT NOT NULL,
	prompts TEXT NOT NULL,
	model VARCHAR(1000),
	second_opinion VARCHAR(1000),
	pre_annotator VARCHAR(8),
	extra_binding TEXT NOT NULL,
	served_model VARCHAR(1000),
	served_second_opinion VARCHAR(1000),
	updated_at FLOAT NOT NULL,
	PRIMARY KEY (project_id)
);
CREATE TABLE stored_predictions (
	task_id BIGINT NOT NULL,
	model_version VARCHAR(200) NOT NULL,
	fingerprint VARCHAR(64) NOT NULL,
	project_id BIGINT,
	role VARCHAR(32) NOT NULL,
	model_name VARCHAR(200) NOT NULL,
	item TEXT NOT NULL,
	record TEXT,
	created_at FLOAT NOT NULL,
	PRIMARY KEY (task_id, model_version, fingerprint)
);
CREATE INDEX stored_predictions_by_project ON stored_predictions (project_id, model_version);
CREATE TABLE task_scores (
	task_id BIGINT NOT NULL,
	"key" VARCHAR(64) NOT NULL,
	project_id BIGINT,
	primary_version VARCHAR(200) NOT NULL,
	second_version VARCHAR(200) NOT NULL,
	task_fingerprint VARCHAR(64) NOT NULL,
	uncertainty FLOAT NOT NULL,
	disagreement FLOAT,
	reason TEXT NOT NULL,
	created_at FLOAT NOT NULL,
	PRIMARY KEY (task_id, "key")
);
CREATE INDEX task_scores_by_key ON task_scores (project_id, "key");
"""

SETUP = ScoreSetup("v1", "clip-base", "cfg", "label", "max", 0.25)
BIG_TASK = 2**40 + 3  # 64-bit Label Studio ids survive


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _old_home(home: Path, weights: Path, with_project_id: bool = True) -> Path:
    """A TANDEM_HOME as the code before migrations left it: its tables and a few rows in each."""
    home.mkdir(parents=True)
    db = home / "tandem.sqlite3"
    registry_sql = OLD_REGISTRY if with_project_id else OLD_REGISTRY.replace(
        ",\n    project_id  INTEGER                          -- the project a job made it for; NULL: server-wide", "")
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(registry_sql + OLD_JOBS + OLD_STORE)
    now = time.time()
    versions = [("start", "yolo", "detect", str(weights), now - 300, now - 300, "{}", None, None, "served", None),
                ("v1", "yolo", "detect", str(weights), now - 200, now - 100, json.dumps({"map50_95": 0.61}), "start",
                 "ds-1", "promoted", now - 100),
                ("v2", "yolo", "detect", str(home / "jobs" / "2" / "best.pt"), now - 50, None,
                 json.dumps({"map50_95": 0.4}), "v1", "ds-2", "rejected", None)]
    if with_project_id:
        versions = [(*v, None) for v in versions] + [
            ("p7-v1", "yolo", "detect", str(weights), now - 10, None, "{}", "v1", "ds-3", "promoted", now - 10, 7)]
    marks = ",".join("?" * len(versions[0]))
    conn.executemany(f"INSERT INTO model_versions VALUES ({marks})", versions)
    conn.executemany("INSERT INTO webhook_events(project_id, action, received_at) VALUES (?,?,?)",
                     [(7, "ANNOTATION_CREATED", now), (7, "ANNOTATION_UPDATED", now), (8, "START_TRAINING", now)])
    conn.execute("INSERT INTO project_versions VALUES (7, 'v1', ?)", (now,))
    jobs = [  # id, project, kind, runner, status, reason, params, created, started, finished, pid, remote, error, ...
        (1, 7, "yolo", "local", "succeeded", "button", json.dumps({"epochs": 30}), now - 250, now - 240, now - 200,
         None, None, None, "v1", 1, json.dumps({"candidate": {"map50_95": 0.61}})),
        (2, 7, "yolo", "modal", "failed", "schedule", "{}", now - 60, now - 59, now - 50, None, "fc-123", "boom",
         "v2", 0, "{}"),
        (3, 7, "yolo", "local", "running", "100 new corrections", "{}", now - 5, now - 4, None, _dead_pid(), None,
         None, None, None, "{}"),
        (4, 7, "yolo", "local", "queued", "coalesced", "{}", now - 3, None, None, None, None, None, None, None, "{}"),
        (5, 8, "vlm", "local", "queued", "button", "{}", now - 2, None, None, None, None, None, None, None, "{}"),
    ]
    conn.executemany(f"INSERT INTO jobs VALUES ({','.join('?' * 16)})", jobs)
    conn.execute("INSERT INTO job_process VALUES (3, ?, 'boot:123', NULL)", (jobs[2][10],))
    conn.execute("INSERT INTO job_process VALUES (5, NULL, NULL, 'boot:456')")
    conn.execute("INSERT INTO corrections VALUES (9, 42, ?)", (now,))
    conn.execute("INSERT INTO correction_events VALUES ('ANNOTATION_CREATED:99:t', ?)", (now,))
    conn.execute("INSERT INTO projects VALUES (7, 'http://ls', 'tok', '<View/>', ?, '{}', 'v1', 'clip-base', 'cnn', "
                 "'{}', 'v1', 'clip-base', ?)", (json.dumps({"Cat": "cat"}), now))
    item = {"result": [{"type": "choices", "value": {"choices": ["cat"]}}], "score": 0.9, "model_version": "v1"}
    conn.execute("INSERT INTO stored_predictions VALUES (?, 'v1', 'fp', 7, 'primary', 'yolo', ?, NULL, ?)",
                 (BIG_TASK, json.dumps(item), now))
    conn.execute("INSERT INTO task_scores VALUES (?, ?, 7, 'v1', 'clip-base', 'tfp', 0.75, 0.5, 'unsure', ?)",
                 (BIG_TASK, SETUP.key, now))
    conn.close()
    return home


def test_a_home_from_before_migrations_is_migrated_and_every_row_is_read(tmp_path):
    weights = tmp_path / "v1.pt"
    weights.write_bytes(b"weights")
    home = _old_home(tmp_path / "home", weights)
    url = Settings(home=home).database_url

    registry, store = Registry(url), JobStore(url)  # the first open migrates
    engine = engine_for(url)
    with engine.connect() as conn:
        assert migrate.current(conn) == migrate.head()
    assert "job_process" not in inspect(engine).get_table_names()  # replaced by leases

    assert [v.version for v in registry.versions()] == ["p7-v1", "v2", "v1", "start"]
    v1 = registry.get("v1")
    assert (v1.metrics, v1.parent, v1.dataset, v1.status, v1.project_id) == ({"map50_95": 0.61}, "start", "ds-1",
                                                                            "promoted", None)
    assert registry.get("p7-v1").project_id == 7 and registry.get("v2").status == "rejected"
    assert [v.version for v in registry.promoted("cnn")] == ["v1"]  # p7-v1 is its project's; v2's file is gone
    assert registry.current("cnn").version == "v1" and registry.latest_promotion() > 0
    assert registry.event_counts(7) == {"ANNOTATION_CREATED": 1, "ANNOTATION_UPDATED": 1}
    assert registry.event_counts() == {"ANNOTATION_CREATED": 1, "ANNOTATION_UPDATED": 1, "START_TRAINING": 1}
    assert registry.synced_version(7) == "v1"

    done, failed = store.get(1), store.get(2)
    assert (done.status, done.params, done.version, done.promoted, done.metrics, done.kind) == (
        JobStatus.SUCCEEDED, {"epochs": 30}, "v1", True, {"candidate": {"map50_95": 0.61}}, "train")
    assert (failed.status, failed.remote_id, failed.error, failed.promoted) == (JobStatus.FAILED, "fc-123", "boom",
                                                                                False)
    # project 7 had two active jobs (the old check-then-create allowed it): the newest stays, the other is failed
    assert store.get(3).status is JobStatus.FAILED and "superseded" in store.get(3).error
    assert [j.id for j in store.all_active()] == [4, 5]
    assert all(j.holder == "pid-runner (before leases)" and j.lease_until == 0 for j in store.all_active())
    # their old runner cannot heartbeat: queued ones are safe to take over, and nothing is failed that never ran
    assert [j.id for j in store.claimable()] == [4, 5]
    assert reap_abandoned(store) == [] and [j.id for j in store.all_active()] == [4, 5]
    assert store.claim(4, "new-server:1:abcd") and store.get(4).holder == "new-server:1:abcd"
    assert store.counts() == {"succeeded": 1, "failed": 2, "queued": 2}

    assert store.corrections(9) == 42 and store.projects_with_corrections() == [9]
    assert store.add_correction(9, "ANNOTATION_CREATED:99:t") == 42  # a delivery counted before is not again
    assert store.add_correction(9, "ANNOTATION_CREATED:99:u") == 43

    project = ProjectRepo(url).get(7)
    assert (project.label_map, project.model, project.second_opinion, project.served_model) == (
        {"Cat": "cat"}, "v1", "clip-base", "v1")
    rows = PredictionRepo(url).for_project(7)
    assert [(r.task_id, r.model_version, r.item["score"]) for r in rows] == [(BIG_TASK, "v1", 0.9)]
    score = ScoreRepo(url).get_many(SETUP, {BIG_TASK: "tfp"})[BIG_TASK]
    assert (score.uncertainty, score.disagreement, score.reason) == (0.75, 0.5, "unsure")


def test_a_home_from_before_per_project_versions_gains_the_column(tmp_path):
    weights = tmp_path / "v1.pt"
    weights.write_bytes(b"weights")
    home = _old_home(tmp_path / "home", weights, with_project_id=False)
    registry = Registry(Settings(home=home).database_url)
    assert [v.version for v in registry.versions()] == ["v2", "v1", "start"]
    assert all(v.project_id is None for v in registry.versions())
    registry.add_candidate("p3-v1", "yolo", "detect", str(weights), "v1", "ds", {}, project_id=3)
    assert registry.get("p3-v1").project_id == 3


def test_a_cli_process_migrates_an_old_home_it_is_pointed_at(tmp_path):
    """The first Tandem process to open the home migrates it, whichever it is (here `tandem jobs list`)."""
    weights = tmp_path / "v1.pt"
    weights.write_bytes(b"weights")
    home = _old_home(tmp_path / "home", weights)
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "jobs", "list", "--home", str(home)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "succeeded" in out and "superseded" in out and "boom" in out
    conn = sqlite3.connect(home / "tandem.sqlite3")
    assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == migrate.head()
    assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 5
    conn.close()


@pytest.mark.parametrize("table", ["model_versions", "jobs", "stored_predictions"])
def test_the_migration_keeps_row_counts(tmp_path, table):
    weights = tmp_path / "v1.pt"
    weights.write_bytes(b"weights")
    home = _old_home(tmp_path / "home", weights)
    before = sqlite3.connect(home / "tandem.sqlite3").execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    engine_for(Settings(home=home).database_url)
    after = sqlite3.connect(home / "tandem.sqlite3").execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    assert before == after > 0


def test_an_upgrade_is_said_wherever_it_runs_and_tightens_an_old_sqlite_file(tmp_path):
    """A CLI command may be the first to open an upgraded release's database: it says it migrated it (replicas
    still on the older release stop working), and a file an older release left readable by others is made
    the owner's alone (it holds Label Studio tokens)."""
    weights = tmp_path / "v1.pt"
    weights.write_bytes(b"weights")
    home = _old_home(tmp_path / "home", weights)
    (home / "tandem.sqlite3").chmod(0o644)
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "jobs", "list", "--home", str(home)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stderr.split())
    assert f"database schema migrated from before migrations to {migrate.head()}" in said, said
    assert "servers and workers still on an older Tandem cannot use it" in said and "docs/upgrading.md" in said
    assert "now the owner's alone" in said and (home / "tandem.sqlite3").stat().st_mode & 0o777 == 0o600
    again = subprocess.run([sys.executable, "-m", "backend.cli", "jobs", "list", "--home", str(home)],
                           capture_output=True, text=True, timeout=120)
    assert "migrated" not in again.stderr and "owner's alone" not in again.stderr  # said once, when it happened


def test_a_database_a_newer_release_migrated_is_refused_in_one_line_and_left_alone(tmp_path):
    """An older replica (or an old CLI) pointed at a database a newer Tandem migrated must not touch it, and
    must say why in one line instead of alembic's 300-line traceback."""
    home = tmp_path / "home"
    url = Settings(home=home).database_url
    JobStore(url).create(3, "yolo", "local", "before")
    dispose(url)  # as a process that ends: the next open migrates (or refuses) again
    conn = sqlite3.connect(home / "tandem.sqlite3")
    conn.execute("UPDATE alembic_version SET version_num = '0999'")
    conn.commit()
    conn.close()
    with pytest.raises(migrate.SchemaTooNew, match=f"revision 0999, which this Tandem does not know .it knows up "
                                                   f"to {migrate.head()}."):
        engine_for(url)
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "jobs", "list", "--home", str(home)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(" ".join(lines)) < 400 and "a newer Tandem migrated it" in proc.stderr, proc.stderr
    conn = sqlite3.connect(home / "tandem.sqlite3")
    assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0999"
    assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    conn.close()
