"""What a stored prediction was made with besides the weights (the serving threshold, a VLM's thresholds), so a
change of threshold is not answered from items made under the old one.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stored_predictions") as batch:
        batch.add_column(sa.Column("made_with", sa.String(32)))


def downgrade() -> None:
    with op.batch_alter_table("stored_predictions") as batch:
        batch.drop_column("made_with")
