"""Key scopes: the dataset patterns a key may read, an optional expiry, an optional role.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"


def upgrade() -> None:
    # Keys made before scopes existed keep reading everything.
    op.add_column(
        "api_keys",
        sa.Column(
            "datasets",
            postgresql.ARRAY(sa.Text),
            nullable=False,
            server_default=sa.text("'{*}'::text[]"),
        ),
        schema=SCHEMA,
    )
    op.add_column("api_keys", sa.Column("expires_at", sa.DateTime(timezone=True)), schema=SCHEMA)
    op.add_column("api_keys", sa.Column("role", sa.Text), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("api_keys", "role", schema=SCHEMA)
    op.drop_column("api_keys", "expires_at", schema=SCHEMA)
    op.drop_column("api_keys", "datasets", schema=SCHEMA)
