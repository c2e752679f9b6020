"""Every table Tandem has, as SQLAlchemy Core (portable between SQLite and PostgreSQL).

The schema is owned by the Alembic revisions in `backend/storage/migrations/`; these objects are what the
repositories query with, and must agree with the newest revision (tests/test_storage_migrations.py checks).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, MetaData, String, Table, Text, text

metadata = MetaData()

ACTIVE_STATUSES = ("queued", "running")

# One row per task, model version and fingerprint of what was asked (config, label map, prompts, image
# URLs): `item` is the Label Studio answer (the /predict cache), `record` the typed predictions per control
# in the control's labels (what scoring, selection and reports read back).
predictions = Table(
    "stored_predictions",
    metadata,
    Column("task_id", BigInteger, primary_key=True),
    Column("model_version", String(200), primary_key=True),
    Column("fingerprint", String(64), primary_key=True),
    Column("project_id", BigInteger, nullable=True),
    Column("role", String(32), nullable=False),
    Column("model_name", String(200), nullable=False),
    Column("item", Text, nullable=False),
    Column("record", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    # the thresholds it was made under (backend.predict.made_with); NULL: made before they were recorded
    Column("made_with", String(32), nullable=True),
    Index("stored_predictions_by_project", "project_id", "model_version"),
)

# A task's scores for one pair of model versions and one scoring setup (`key`), computed as soon as both
# models have answered; `tandem select` ranks from these.
task_scores = Table(
    "task_scores",
    metadata,
    Column("task_id", BigInteger, primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("project_id", BigInteger, nullable=True),
    Column("primary_version", String(200), nullable=False),
    Column("second_version", String(200), nullable=False),  # "" without a second opinion
    Column("task_fingerprint", String(64), nullable=False),  # of the task's image URLs: a changed image rescores
    Column("uncertainty", Float, nullable=False),
    Column("disagreement", Float, nullable=True),
    Column("reason", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("task_scores_by_key", "project_id", "key"),
)

# What each Label Studio project connected to Tandem asked for in /setup, and the models bound to it.
projects = Table(
    "projects",
    metadata,
    Column("project_id", BigInteger, primary_key=True),
    Column("hostname", String(500), nullable=True),
    Column("access_token", Text, nullable=True),
    Column("label_config", Text, nullable=True),
    Column("label_map", Text, nullable=False, default="{}"),
    Column("prompts", Text, nullable=False, default="{}"),
    Column("model", String(1000), nullable=True),
    Column("second_opinion", String(1000), nullable=True),
    Column("pre_annotator", String(8), nullable=True),
    Column("extra_binding", Text, nullable=False, default="{}"),  # the binding the extra params last named
    Column("served_model", String(1000), nullable=True),  # what the server last served it (binding or default)
    Column("served_second_opinion", String(1000), nullable=True),
    Column("updated_at", Float, nullable=False),
)

# Every version the server has served and every candidate a job made (metrics, parent, dataset). `path` is
# an artifact URI (or, for rows from before the artifact store, a local path).
model_versions = Table(
    "model_versions",
    metadata,
    Column("version", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("task", Text, nullable=False),
    Column("path", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("served_at", Float, nullable=True),
    Column("metrics", Text, nullable=False, server_default="{}"),
    Column("parent", Text, nullable=True),
    Column("dataset", Text, nullable=True),
    Column("status", Text, nullable=False, server_default="served"),  # served|candidate|promoted|rejected|...
    Column("promoted_at", Float, nullable=True),
    Column("project_id", BigInteger, nullable=True),  # the project a job made it for; NULL: server-wide
)

webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project_id", BigInteger, nullable=True),
    Column("action", Text, nullable=False),
    Column("received_at", Float, nullable=False),
)

# The model version each Label Studio project was last told about.
project_versions = Table(
    "project_versions",
    metadata,
    Column("project_id", BigInteger, primary_key=True),
    Column("model_version", Text, nullable=False),
    Column("synced_at", Float, nullable=False),
)

# Training and predict jobs. A job is held by one runner through a lease (`holder`, `lease_until`); the
# partial unique index lets the database, not a check-then-insert, keep one active job per project and kind.
jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project_id", BigInteger, nullable=False),
    Column("model_kind", Text, nullable=False),
    Column("runner", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("reason", Text, nullable=False, server_default=""),
    Column("params", Text, nullable=False, server_default="{}"),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("pid", Integer, nullable=True),  # the worker's pid on the holder's host (shown; not trusted)
    Column("remote_id", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("version", Text, nullable=True),
    Column("promoted", Integer, nullable=True),
    Column("metrics", Text, nullable=False, server_default="{}"),
    Column("kind", String(16), nullable=False, server_default="train"),  # train | predict
    Column("progress", Text, nullable=False, server_default="{}"),
    Column("holder", String(300), nullable=True),  # host:pid:random of the runner holding the lease
    Column("lease_until", Float, nullable=True),
    Column("follow_up", Text, nullable=True),  # reason of a trigger coalesced into this job's successor
    Column("follow_up_spec", Text, nullable=True),  # that trigger's runner, model kind and params (JSON)
    Index("one_active_job", "project_id", "kind", unique=True,
          sqlite_where=text("status IN ('queued', 'running')"),
          postgresql_where=text("status IN ('queued', 'running')")),
    Index("jobs_by_lease", "status", "lease_until"),
)

# Annotation webhooks counted toward auto-retrain, kept across restarts and shared by replicas.
corrections = Table(
    "corrections",
    metadata,
    Column("project_id", BigInteger, primary_key=True),
    Column("count", Integer, nullable=False, server_default="0"),
    Column("updated_at", Float, nullable=False),
)

# Recent webhook deliveries already counted (Label Studio retries and repeats them); bounded.
correction_events = Table(
    "correction_events",
    metadata,
    Column("key", Text, primary_key=True),
    Column("at", Float, nullable=False),
)

__all__ = ["ACTIVE_STATUSES", "correction_events", "corrections", "jobs", "metadata", "model_versions",
           "predictions", "project_versions", "projects", "task_scores", "webhook_events"]
