"""Incremental pulls: the secret that signs cursors, and change tracking for tracked tables.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from exporter.schema.models import XID8

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"


def upgrade() -> None:
    op.create_table(
        "cursor_secret",
        sa.Column("id", sa.SmallInteger, primary_key=True),
        sa.Column("secret", sa.LargeBinary, nullable=False),
        sa.CheckConstraint("id = 1", name="cursor_secret_one_row"),
        schema=SCHEMA,
    )
    op.execute(
        sa.text("INSERT INTO exporter.cursor_secret (id, secret) VALUES (1, :secret)").bindparams(
            secret=secrets.token_bytes(32)
        )
    )
    op.create_table(
        "tracked_tables",
        sa.Column("relid", postgresql.OID, primary_key=True),
        sa.Column("key_columns", postgresql.ARRAY(sa.Text), nullable=False),
        # The transaction that began tracking: a cursor whose snapshot saw it committed is
        # served from the change table.
        sa.Column("since_xid", XID8, nullable=False),
        # Every change of a transaction below this id has been pruned.
        sa.Column("pruned_xid", XID8),
        sa.Column(
            "tracked_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        schema=SCHEMA,
    )
    op.create_table(
        "changes",
        sa.Column("relid", postgresql.OID, nullable=False),
        sa.Column("xid", XID8, nullable=False),
        sa.Column("op", sa.CHAR(1), nullable=False),
        sa.Column("key", postgresql.JSONB, nullable=False),
        schema=SCHEMA,
    )
    op.create_index("changes_relid_xid", "changes", ["relid", "xid"], schema=SCHEMA)
    # When each transaction id was reached, so that pruning by age is a range of xids.
    op.create_table(
        "xid_clock",
        sa.Column("at", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("xid", XID8, nullable=False),
        schema=SCHEMA,
    )


def downgrade() -> None:
    # The triggers of tracked tables go with their functions (exporter track makes both).
    op.execute(
        "DO $$ DECLARE f regprocedure; BEGIN"
        " FOR f IN SELECT p.oid FROM pg_proc p"
        "   WHERE p.pronamespace = 'exporter'::regnamespace AND p.proname LIKE 'track\\_%'"
        " LOOP EXECUTE format('DROP FUNCTION %s CASCADE', f); END LOOP; END $$"
    )
    op.drop_table("xid_clock", schema=SCHEMA)
    op.drop_index("changes_relid_xid", "changes", schema=SCHEMA)
    op.drop_table("changes", schema=SCHEMA)
    op.drop_table("tracked_tables", schema=SCHEMA)
    op.drop_table("cursor_secret", schema=SCHEMA)
