"""Seek points of job files: where a download of the decompressed export may start inflating
(a full flush every 16 MiB of export), so that a resumed download does not inflate the file
from its start.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"


def upgrade() -> None:
    # Triples, flattened: offset in the export, offset in the gzip file, CRC-32 of the segment
    # before; NULL for files written before (their downloads inflate from the start).
    op.add_column("jobs", sa.Column("seek_points", postgresql.ARRAY(sa.BigInteger)), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("jobs", "seek_points", schema=SCHEMA)
