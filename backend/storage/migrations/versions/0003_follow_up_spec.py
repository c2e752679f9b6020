"""The coalesced trigger's runner, model kind and params beside its reason, so the follow-up runs what was
asked for (a LoRA trigger folded into a running YOLO job's follow-up used to run as YOLO, with that job's params).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("follow_up_spec", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("follow_up_spec")
