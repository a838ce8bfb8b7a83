"""Export events (GET /exports/{id}/events): progress, done and error of every export, kept so
that a reconnecting subscriber resumes after the last event it saw.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"


def upgrade() -> None:
    op.create_table(
        "export_events",
        # The SSE id: one sequence for all events, so that the runs of a job (a worker died)
        # and exports sharing a client-chosen request id never reuse an id.
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        # The export's request id (a job's id); with the key, since clients choose request ids.
        sa.Column("export_id", sa.Text, nullable=False),
        sa.Column("key_name", sa.Text, nullable=False),
        # progress, done or error
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("data", postgresql.JSONB, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        schema=SCHEMA,
    )
    op.create_index("export_events_export", "export_events", ["export_id", "id"], schema=SCHEMA)
    op.create_index("export_events_at", "export_events", ["at"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_index("export_events_at", "export_events", schema=SCHEMA)
    op.drop_index("export_events_export", "export_events", schema=SCHEMA)
    op.drop_table("export_events", schema=SCHEMA)
