"""job timings: seconds per stage of a job (decode, model, cam, sr, sc, write, queued_to_done)

Step 4 of the chain (the file's mNN prefix); the revision id is kept as first released.
Revision ID: 0003
Revises: 0002 (re-chained after 0002 and 0008 when main was merged)
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("timings", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("timings")
