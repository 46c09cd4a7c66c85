"""Links for the requests and orders pages: the kinds a job was asked to write, an order's ACK and request

``job.kinds``: the output kinds the job's run was asked to write (a request naming a destination
that wants another kind runs the job again). ``hl7_order.ack_code``: the MSA-1 the node answered the
order's last message with; ``hl7_order.request_id``: the fetch request the order made.

Step 13 of the chain (the file's mNN prefix).
Revision ID: 0016
Revises: 0015
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kinds", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("hl7_order", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ack_code", sa.String(length=2), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("request_id", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("hl7_order", schema=None) as batch_op:
        batch_op.drop_column("request_id")
        batch_op.drop_column("ack_code")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("kinds")
