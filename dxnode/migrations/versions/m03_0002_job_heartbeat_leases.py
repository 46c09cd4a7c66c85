"""job heartbeat, stage, retry time, lost-worker count and supervisor; outbox lease holder

Step 3 of the chain (the file's mNN prefix); the revision id is kept as first released.
Revision ID: 0002
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("stage", sa.String(length=32), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("not_before", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("lost", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("supervisor", sa.String(length=128), nullable=False, server_default=""))
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.add_column(sa.Column("leased_by", sa.String(length=128), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("lease_heartbeat_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_column("lease_heartbeat_at")
        batch_op.drop_column("leased_by")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("supervisor")
        batch_op.drop_column("lost")
        batch_op.drop_column("not_before")
        batch_op.drop_column("stage")
        batch_op.drop_column("heartbeat_at")
