"""retention: a purge in progress (instance.purging), a purged study (study.purged_at), results being removed (study.expiring)

A purge marks a study's instance rows in one transaction, removes their files, then deletes the
rows; a start after a crash finishes what the marks name (dxnode/lifecycle/). Downgrade drops the
columns: finish or reconcile purges first (``dxnode purge --reconcile``).

Step 7 of the chain (the file's mNN prefix).
Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("purging", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_index(batch_op.f("ix_instance_purging"), ["purging"], unique=False)
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("expiring", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_column("expiring")
        batch_op.drop_column("purged_at")
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_purging"))
        batch_op.drop_column("purging")
