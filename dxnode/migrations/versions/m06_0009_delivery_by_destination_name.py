"""deliveries follow the configuration: drop the address a delivery pinned when it was queued

A delivery now names its [[destinations]] entry only and is sent to the address configured when it
is sent. The new states ``cancelled`` and ``orphaned`` need no schema change (``state`` is text).

Downgrade adds the address columns back, empty (the configuration is not known here): an older
dxnode would try unsent rows at an empty address, so downgrade only a node whose outbox is empty.
``cancelled`` and ``orphaned`` rows become ``failed`` (an older dxnode knows no other state).

Step 6 of the chain (the file's mNN prefix); the revision id is kept as first released.
Revision ID: 0009
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_column("ae_title")
        batch_op.drop_column("host")
        batch_op.drop_column("port")


def downgrade() -> None:
    op.execute("UPDATE delivery SET state = 'failed' WHERE state IN ('cancelled', 'orphaned')")
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ae_title", sa.String(length=16), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("host", sa.String(length=255), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("port", sa.Integer(), nullable=False, server_default="0"))
    # As 0001 made them: no server defaults (dxnode always wrote these columns itself).
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.alter_column("ae_title", server_default=None)
        batch_op.alter_column("host", server_default=None)
        batch_op.alter_column("port", server_default=None)
