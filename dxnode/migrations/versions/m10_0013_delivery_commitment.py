"""Storage Commitment on deliveries: the Transaction UID awaiting its report, when asked, when committed

The new state ``committed`` needs no schema change (``state`` is text). Downgrade turns committed
rows back into ``sent`` (an older dxnode knows no other state) and drops the columns.

Step 7 of the chain (the file's mNN prefix).
Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.add_column(sa.Column("commitment_uid", sa.String(length=64), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("commitment_requested_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_delivery_commitment_uid", ["commitment_uid"], unique=False)


def downgrade() -> None:
    op.execute("UPDATE delivery SET state = 'sent' WHERE state = 'committed'")
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_index("ix_delivery_commitment_uid")
        batch_op.drop_column("committed_at")
        batch_op.drop_column("commitment_requested_at")
        batch_op.drop_column("commitment_uid")
