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

from exporter.models import XID8

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"

# Statement-level, over transition tables: one INSERT per statement, however many rows it
# wrote. pg_current_xact_id() is the top-level transaction's id even inside a savepoint or an
# exception block, which is what makes tracked pulls exact (see exporter/incremental.py).
# SECURITY DEFINER: writers need no privilege on the service's schema. TG_ARGV holds the
# table's primary key columns; the key is kept as jsonb, whose text forms of timestamps,
# numbers and booleans do not depend on the writer's DateStyle or extra_float_digits.
RECORD_CHANGES = """
CREATE FUNCTION exporter.record_changes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    key_sql text;
    rows_sql text;
BEGIN
    SELECT string_agg(format('%L, r.%I', k, k), ', ') INTO key_sql FROM unnest(TG_ARGV) AS k;
    IF TG_OP = 'TRUNCATE' THEN
        -- No transition table: every row the truncate removes is recorded as deleted.
        EXECUTE format(
            'INSERT INTO exporter.changes (relid, xid, op, key)'
            ' SELECT $1, pg_current_xact_id(), ''D'', jsonb_build_object(%s) FROM %s AS r',
            key_sql, TG_RELID::regclass) USING TG_RELID;
        RETURN NULL;
    END IF;
    rows_sql := CASE TG_OP
        WHEN 'INSERT' THEN format('SELECT ''I'', jsonb_build_object(%s) FROM new_rows AS r',
                                  key_sql)
        WHEN 'DELETE' THEN format('SELECT ''D'', jsonb_build_object(%s) FROM old_rows AS r',
                                  key_sql)
        -- An update may change the key: both the old key and the new one changed.
        ELSE format('SELECT ''U'', jsonb_build_object(%1$s) FROM new_rows AS r'
                    ' UNION SELECT ''U'', jsonb_build_object(%1$s) FROM old_rows AS r',
                    key_sql)
    END;
    EXECUTE 'INSERT INTO exporter.changes (relid, xid, op, key)'
            ' SELECT $1, pg_current_xact_id(), c.* FROM (' || rows_sql || ') AS c'
        USING TG_RELID;
    RETURN NULL;
END
$$
"""


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
    op.execute(RECORD_CHANGES)


def downgrade() -> None:
    op.execute("DROP FUNCTION exporter.record_changes() CASCADE")
    op.drop_table("xid_clock", schema=SCHEMA)
    op.drop_index("changes_relid_xid", "changes", schema=SCHEMA)
    op.drop_table("changes", schema=SCHEMA)
    op.drop_table("tracked_tables", schema=SCHEMA)
    op.drop_table("cursor_secret", schema=SCHEMA)
