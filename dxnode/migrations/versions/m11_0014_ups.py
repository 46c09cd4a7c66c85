"""UPS workitems the node claims as an IHE AIW-I task performer (ups_workitem)

Step 11 of the chain (the file's mNN prefix).
Revision ID: 0014
Revises: 0013
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ups_workitem",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ups", sa.String(length=64), nullable=False),
        sa.Column("workitem_uid", sa.String(length=64), nullable=False),
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.String(length=8), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("workitem_code", sa.JSON(), nullable=False),
        sa.Column("request_ids", sa.JSON(), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("ups", "workitem_uid", name="uq_ups_workitem_ups_uid"),
    )
    op.create_index("ix_ups_workitem_state", "ups_workitem", ["state"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_ups_workitem_state", table_name="ups_workitem")
    op.drop_table("ups_workitem")
