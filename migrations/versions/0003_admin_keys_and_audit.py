"""Admin keys, and an export log that records refusals and aborted exports.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"


def upgrade() -> None:
    # Admin keys may read the export log (GET /exports); existing keys may not.
    op.add_column(
        "api_keys",
        sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()),
        schema=SCHEMA,
    )
    # The HTTP status the request was answered with (200 for exports that started); NULL for
    # entries written before this revision.
    op.add_column("export_log", sa.Column("status", sa.SmallInteger), schema=SCHEMA)
    # Which per-export limit ended an export with outcome 'aborted': max_rows, max_bytes,
    # max_seconds or min_bytes_per_second.
    op.add_column("export_log", sa.Column("aborted_by", sa.Text), schema=SCHEMA)
    # GET /exports filters by key and pages newest first.
    op.create_index("export_log_key_name", "export_log", ["key_name", "id"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_index("export_log_key_name", "export_log", schema=SCHEMA)
    op.drop_column("export_log", "aborted_by", schema=SCHEMA)
    op.drop_column("export_log", "status", schema=SCHEMA)
    op.drop_column("api_keys", "admin", schema=SCHEMA)
