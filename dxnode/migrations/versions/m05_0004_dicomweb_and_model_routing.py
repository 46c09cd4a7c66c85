"""DICOMweb deliveries (HTTP status) and model routing (the [[models]] entry a job runs)

Step 5 of the chain (the file's mNN prefix); the revision id is kept as first released.
Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.add_column(sa.Column("http_status", sa.Integer(), nullable=True))
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("routed_model", sa.String(length=64), nullable=False, server_default=""))
        batch_op.create_index("ix_job_study_routed_model", ["study_id", "routed_model"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index("ix_job_study_routed_model")
        batch_op.drop_column("routed_model")
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_column("http_status")
