"""Background export jobs (POST /exports): claimed through PostgreSQL by any worker or replica.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("key_id", sa.BigInteger, nullable=False),
        sa.Column("key_name", sa.Text, nullable=False),
        sa.Column("dataset", sa.Text, nullable=False),
        sa.Column("format", sa.Text, nullable=False),
        # The query parameters as [name, value] pairs, in order.
        sa.Column("params", postgresql.JSONB, nullable=False),
        # queued, running, done, failed, cancelled, expired
        sa.Column("status", sa.Text, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        # Who runs it, and until when its claim holds without a heartbeat.
        sa.Column("worker", sa.Text),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("rows", sa.BigInteger),
        sa.Column("bytes", sa.BigInteger),
        sa.Column("file_name", sa.Text),
        sa.Column("file_bytes", sa.BigInteger),
        sa.Column("cursor", sa.Text),
        sa.Column("error", sa.Text),
        schema=SCHEMA,
    )
    # Claiming: the oldest queued job, or a running one whose lease ran out.
    op.create_index("jobs_claimable", "jobs", ["status", "created_at"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_index("jobs_claimable", "jobs", schema=SCHEMA)
    op.drop_table("jobs", schema=SCHEMA)
