"""HL7 orders (hl7_order) and the HL7/FHIR results outbox (hl7_result)

Step 7 of the chain (the file's mNN prefix).
Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "hl7_order",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=False),
        sa.Column("priority", sa.String(length=8), nullable=False),
        sa.Column("wait_minutes", sa.Float(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("placer_order", sa.String(length=64), nullable=False),
        sa.Column("filler_order", sa.String(length=64), nullable=False),
        sa.Column("procedure_code", sa.String(length=64), nullable=False),
        sa.Column("procedure_text", sa.String(length=128), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sender", sa.String(length=128), nullable=False),
        sa.Column("control_id", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source", "accession_number", name="uq_hl7_order_source_accession"),
    )
    op.create_index("ix_hl7_order_accession_number", "hl7_order", ["accession_number"], unique=False)
    op.create_table(
        "hl7_result",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=True),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("control_id", sa.String(length=64), nullable=False),
        sa.Column("ack_code", sa.String(length=2), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("leased_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["order_id"], ["hl7_order.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "destination", name="uq_hl7_result_job_destination"),
    )
    op.create_index("ix_hl7_result_job_id", "hl7_result", ["job_id"], unique=False)
    op.create_index("ix_hl7_result_state_next", "hl7_result", ["state", "next_attempt_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_hl7_result_state_next", table_name="hl7_result")
    op.drop_index("ix_hl7_result_job_id", table_name="hl7_result")
    op.drop_table("hl7_result")
    op.drop_index("ix_hl7_order_accession_number", table_name="hl7_order")
    op.drop_table("hl7_order")
