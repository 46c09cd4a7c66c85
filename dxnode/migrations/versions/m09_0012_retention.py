"""retention: a purge in progress (instance.purging), a purged study (study.purged_at), results being removed (study.expiring)

A purge marks a study's instance rows in one transaction, removes their files, then deletes the
rows; a start after a crash finishes what the marks name (dxnode/lifecycle/). Downgrade drops the
columns: finish or reconcile purges first (``dxnode purge --reconcile``).

Step 7 of the chain (the file's mNN prefix).
Revision ID: 0012
Revises: 0011
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ADD COLUMN and DROP COLUMN, never a batch copy of the table: on SQLite a copy drops the old
# study table, and its ON DELETE CASCADE foreign keys would take every job, finding and output with it.
# A constant server default keeps ADD COLUMN plain (SQLite stores 0 for false).


def upgrade() -> None:
    op.add_column("instance", sa.Column("purging", sa.Boolean(), nullable=False, server_default="0"))
    op.create_index("ix_instance_purging", "instance", ["purging"], unique=False)
    op.add_column("study", sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("study", sa.Column("expiring", sa.Boolean(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("study", "expiring")  # SQLite 3.35 and later drop a column in place
    op.drop_column("study", "purged_at")
    op.drop_index("ix_instance_purging", table_name="instance")
    op.drop_column("instance", "purging")
