"""UPS Watch: subscriptions to the node's workitems and the event reports owed to subscribers

Step 12 of the chain (the file's mNN prefix).
Revision ID: 0015
Revises: 0014
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ups_subscription",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("deletion_lock", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_ups_subscription_ae_job", "ups_subscription", ["ae_title", "job_id"], unique=False)
    op.create_index("ix_ups_subscription_job_id", "ups_subscription", ["job_id"], unique=False)
    op.create_table(
        "ups_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("ups_state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_ups_event_state_ae", "ups_event", ["state", "ae_title"], unique=False)
    op.create_index("ix_ups_event_job_id", "ups_event", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_ups_event_job_id", table_name="ups_event")
    op.drop_index("ix_ups_event_state_ae", table_name="ups_event")
    op.drop_table("ups_event")
    op.drop_index("ix_ups_subscription_job_id", table_name="ups_subscription")
    op.drop_index("ix_ups_subscription_ae_job", table_name="ups_subscription")
    op.drop_table("ups_subscription")
