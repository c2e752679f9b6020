"""Baseline: the schema Tandem had before migrations, adopted where it exists and created where it does not.

Before this revision every table was made by `CREATE TABLE IF NOT EXISTS` (registry, jobs) or
`metadata.create_all` (stored predictions, scores, projects) in one SQLite file, `TANDEM_HOME/tandem.sqlite3`.
A table already there is kept as it is (with its rows); only a missing one is created, and a
`model_versions` from before per-project versions gains its `project_id` column.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _tables() -> dict[str, list[sa.Column | sa.Index]]:
    return {
        "model_versions": [
            sa.Column("version", sa.Text, primary_key=True),
            sa.Column("name", sa.Text, nullable=False),
            sa.Column("task", sa.Text, nullable=False),
            sa.Column("path", sa.Text),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("served_at", sa.Float),
            sa.Column("metrics", sa.Text, nullable=False, server_default="{}"),
            sa.Column("parent", sa.Text),
            sa.Column("dataset", sa.Text),
            sa.Column("status", sa.Text, nullable=False, server_default="served"),
            sa.Column("promoted_at", sa.Float),
            sa.Column("project_id", sa.BigInteger),
        ],
        "webhook_events": [
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("project_id", sa.BigInteger),
            sa.Column("action", sa.Text, nullable=False),
            sa.Column("received_at", sa.Float, nullable=False),
        ],
        "project_versions": [
            sa.Column("project_id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("model_version", sa.Text, nullable=False),
            sa.Column("synced_at", sa.Float, nullable=False),
        ],
        "jobs": [
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("project_id", sa.BigInteger, nullable=False),
            sa.Column("model_kind", sa.Text, nullable=False),
            sa.Column("runner", sa.Text, nullable=False),
            sa.Column("status", sa.Text, nullable=False),
            sa.Column("reason", sa.Text, nullable=False, server_default=""),
            sa.Column("params", sa.Text, nullable=False, server_default="{}"),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("started_at", sa.Float),
            sa.Column("finished_at", sa.Float),
            sa.Column("pid", sa.Integer),
            sa.Column("remote_id", sa.Text),
            sa.Column("error", sa.Text),
            sa.Column("version", sa.Text),
            sa.Column("promoted", sa.Integer),
            sa.Column("metrics", sa.Text, nullable=False, server_default="{}"),
        ],
        "job_process": [
            sa.Column("job_id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("pid", sa.Integer),
            sa.Column("identity", sa.Text),
            sa.Column("holder", sa.Text),
        ],
        "corrections": [
            sa.Column("project_id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("count", sa.Integer, nullable=False, server_default="0"),
            sa.Column("updated_at", sa.Float, nullable=False),
        ],
        "correction_events": [
            sa.Column("key", sa.Text, primary_key=True),
            sa.Column("at", sa.Float, nullable=False),
        ],
        "stored_predictions": [
            sa.Column("task_id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("model_version", sa.String(200), primary_key=True),
            sa.Column("fingerprint", sa.String(64), primary_key=True),
            sa.Column("project_id", sa.BigInteger),
            sa.Column("role", sa.String(32), nullable=False),
            sa.Column("model_name", sa.String(200), nullable=False),
            sa.Column("item", sa.Text, nullable=False),
            sa.Column("record", sa.Text),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Index("stored_predictions_by_project", "project_id", "model_version"),
        ],
        "task_scores": [
            sa.Column("task_id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("project_id", sa.BigInteger),
            sa.Column("primary_version", sa.String(200), nullable=False),
            sa.Column("second_version", sa.String(200), nullable=False),
            sa.Column("task_fingerprint", sa.String(64), nullable=False),
            sa.Column("uncertainty", sa.Float, nullable=False),
            sa.Column("disagreement", sa.Float),
            sa.Column("reason", sa.Text, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Index("task_scores_by_key", "project_id", "key"),
        ],
        "projects": [
            sa.Column("project_id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("hostname", sa.String(500)),
            sa.Column("access_token", sa.Text),
            sa.Column("label_config", sa.Text),
            sa.Column("label_map", sa.Text, nullable=False),
            sa.Column("prompts", sa.Text, nullable=False),
            sa.Column("model", sa.String(1000)),
            sa.Column("second_opinion", sa.String(1000)),
            sa.Column("pre_annotator", sa.String(8)),
            sa.Column("extra_binding", sa.Text, nullable=False),
            sa.Column("served_model", sa.String(1000)),
            sa.Column("served_second_opinion", sa.String(1000)),
            sa.Column("updated_at", sa.Float, nullable=False),
        ],
    }


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    existing = set(inspector.get_table_names())
    for name, items in _tables().items():
        if name in existing:
            continue
        columns = [i for i in items if isinstance(i, sa.Column)]
        op.create_table(name, *columns)
        for index in (i for i in items if isinstance(i, sa.Index)):
            op.create_index(index.name, name, [c if isinstance(c, str) else c.name for c in index.expressions])
    if "model_versions" in existing:
        columns = {c["name"] for c in inspector.get_columns("model_versions")}
        if "project_id" not in columns:  # a TANDEM_HOME from before per-project versions
            op.add_column("model_versions", sa.Column("project_id", sa.BigInteger))


def downgrade() -> None:
    raise NotImplementedError("the baseline is not undone: it may have adopted tables with rows")
