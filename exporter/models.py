"""Tables of the service's own schema; `metadata` is Alembic's target."""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    SmallInteger,
    Table,
    Text,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from exporter.settings import OWN_SCHEMA

metadata = MetaData(schema=OWN_SCHEMA)

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
