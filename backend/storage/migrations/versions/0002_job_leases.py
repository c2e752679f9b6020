"""Jobs held by leases instead of pids: kind (train | predict), progress, holder, lease expiry, the coalesced
follow-up's reason, and one active job per (project, kind) enforced by a partial unique index.

Active jobs left by the pid-based runner get a lease that has already expired, so the first replica or CLI
that looks fails them (their holder cannot heartbeat: it did not know about leases). Where older code left two
active jobs for one project, all but the newest are failed first, so the unique index can be built.

Revision ID: 0002
Revises: 0001
"""

import time

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ACTIVE = "status IN ('queued', 'running')"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="train"))
        batch.add_column(sa.Column("progress", sa.Text, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("holder", sa.String(300)))
        batch.add_column(sa.Column("lease_until", sa.Float))
        batch.add_column(sa.Column("follow_up", sa.Text))
    bind = op.get_bind()
    now = time.time()
    bind.execute(sa.text(
        f"UPDATE jobs SET status = 'failed', finished_at = :now, error = 'superseded by a newer active job of its "
        f"project when Tandem moved to leases' WHERE {ACTIVE} AND id NOT IN "
        f"(SELECT MAX(id) FROM jobs WHERE {ACTIVE} GROUP BY project_id)"), {"now": now})
    bind.execute(sa.text(f"UPDATE jobs SET holder = 'pid-runner (before leases)', lease_until = 0 WHERE {ACTIVE}"))
    op.create_index("one_active_job", "jobs", ["project_id", "kind"], unique=True,
                    sqlite_where=sa.text(ACTIVE), postgresql_where=sa.text(ACTIVE))
    op.create_index("jobs_by_lease", "jobs", ["status", "lease_until"])
    op.drop_table("job_process")


def downgrade() -> None:
    op.create_table("job_process", sa.Column("job_id", sa.Integer, primary_key=True, autoincrement=False),
                    sa.Column("pid", sa.Integer), sa.Column("identity", sa.Text), sa.Column("holder", sa.Text))
    op.drop_index("jobs_by_lease", "jobs")
    op.drop_index("one_active_job", "jobs")
    with op.batch_alter_table("jobs") as batch:
        for name in ("follow_up", "lease_until", "holder", "progress", "kind"):
            batch.drop_column(name)
