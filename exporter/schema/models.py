"""Tables of the service's own schema; `metadata` is Alembic's target."""

from typing import Any

from sqlalchemy import (
    CHAR,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Table,
    Text,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, OID
from sqlalchemy.dialects.postgresql import base as postgresql_base
from sqlalchemy.types import UserDefinedType

from exporter.settings import OWN_SCHEMA

metadata = MetaData(schema=OWN_SCHEMA)


class XID8(UserDefinedType[int]):
    """PostgreSQL's 64-bit transaction id (pg_current_xact_id())."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"


# So that reflecting a database (Alembic's comparison of models and migrations) knows it.
postgresql_base.ischema_names.setdefault("xid8", XID8)


api_keys = Table(
    "api_keys",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    # SHA-256 of the key: keys are random and high-entropy, so a fast digest is enough and
    # lets a request find its key by index.
    Column("digest", LargeBinary, nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("revoked_at", DateTime(timezone=True)),
    # Glob patterns over dataset names (fnmatch, case-sensitive); "*" reads everything.
    Column("datasets", ARRAY(Text), nullable=False, server_default=text("'{*}'::text[]")),
    Column("expires_at", DateTime(timezone=True)),
    # The PostgreSQL role the key's exports run as (SET LOCAL ROLE); NULL: the service's own.
    Column("role", Text),
    # Admin keys may read the export log (GET /exports).
    Column("admin", Boolean, nullable=False, server_default=false()),
)

export_log = Table(
    "export_log",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("request_id", Text, nullable=False),
    Column("key_name", Text),
    Column("dataset", Text, nullable=False),
    Column("format", Text, nullable=False),
    Column("parameters", JSONB, nullable=False),
    Column("client_addr", Text),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("ended_at", DateTime(timezone=True)),
    Column("rows", BigInteger),
    Column("bytes", BigInteger),
    # running, completed, failed, disconnected, aborted (a limit; see aborted_by), refused
    Column("outcome", Text, nullable=False),
    Column("error", Text),
    # The HTTP status of the answer: 200 once an export started, else the refusal's.
    Column("status", SmallInteger),
    # max_rows, max_bytes, max_seconds or min_bytes_per_second, for outcome 'aborted'.
    Column("aborted_by", Text),
    Index("export_log_started_at", "started_at"),
    Index("export_log_request_id", "request_id"),
    Index("export_log_key_name", "key_name", "id"),
)

# Signs cursor tokens (exporter/incremental/tokens.py); one row, made by the migration.
cursor_secret = Table(
    "cursor_secret",
    metadata,
    Column("id", SmallInteger, primary_key=True),
    Column("secret", LargeBinary, nullable=False),
    CheckConstraint("id = 1", name="cursor_secret_one_row"),
)

# Tables whose changes are recorded (exporter track); see exporter/incremental/tracking.py.
tracked_tables = Table(
    "tracked_tables",
    metadata,
    Column("relid", OID, primary_key=True),
    Column("key_columns", ARRAY(Text), nullable=False),
    Column("since_xid", XID8, nullable=False),
    Column("pruned_xid", XID8),
    Column("tracked_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# One row per key changed per statement, written by exporter.record_changes(): the top-level
# transaction, I/U/D, and the primary key as jsonb.
changes = Table(
    "changes",
    metadata,
    Column("relid", OID, nullable=False),
    Column("xid", XID8, nullable=False),
    Column("op", CHAR(1), nullable=False),
    Column("key", JSONB, nullable=False),
    Index("changes_relid_xid", "relid", "xid"),
)

xid_clock = Table(
    "xid_clock",
    metadata,
    Column("at", DateTime(timezone=True), primary_key=True),
    Column("xid", XID8, nullable=False),
)

# Background export jobs (exporter/jobs/records.py).
jobs = Table(
    "jobs",
    metadata,
    Column("id", Text, primary_key=True),
    Column("key_id", BigInteger, nullable=False),
    Column("key_name", Text, nullable=False),
    Column("dataset", Text, nullable=False),
    Column("format", Text, nullable=False),
    Column("params", JSONB, nullable=False),
    Column("status", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("expires_at", DateTime(timezone=True)),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("worker", Text),
    Column("lease_until", DateTime(timezone=True)),
    Column("cancel_requested", Boolean, nullable=False, server_default=false()),
    Column("rows", BigInteger),
    Column("bytes", BigInteger),
    Column("file_name", Text),
    Column("file_bytes", BigInteger),
    # exporter/jobs/seekable_gzip.py's points, flattened (offset, file offset, CRC-32) triples.
    Column("seek_points", ARRAY(BigInteger)),
    Column("cursor", Text),
    Column("error", Text),
    Index("jobs_claimable", "status", "created_at"),
)

# Progress, done and error events of exports (exporter/jobs/events.py).
export_events = Table(
    "export_events",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("export_id", Text, nullable=False),
    Column("key_name", Text, nullable=False),
    Column("event", Text, nullable=False),
    Column("data", JSONB, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("export_events_export", "export_id", "id"),
    Index("export_events_at", "at"),
)
