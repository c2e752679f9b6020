"""The tables behind the repositories, as SQLAlchemy Core (portable between SQLite and PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, MetaData, String, Table, Text

metadata = MetaData()

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

__all__ = ["metadata", "predictions", "projects", "task_scores", "Integer"]
