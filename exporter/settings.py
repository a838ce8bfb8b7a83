import re
import urllib.parse
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_DURATION = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[smhd])?")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# The service's own schema: keys and the export log live here, and it is never exported.
OWN_SCHEMA = "exporter"


_URL_FIELDS = frozenset({"database_url", "state_database_url"})
# libpq's own keyword, also accepted in a URL's query string (?password=...).
_QUERY_PASSWORD = re.compile(r"(?i)(^|&)(password=)[^&]*")


def masked_url(url: str) -> str:
    """`url` with its password, if it has one, written as `***`; all of it, if it does not
    parse."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    query = _QUERY_PASSWORD.sub(r"\1\2***", parts.query)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXPORTER_", extra="ignore")

    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        description="The database exported from (a `postgresql://` URL).",
    )
    # Where keys and the export log are kept; defaults to database_url, so exports may read a
    # replica while the state lives on a primary.
    state_database_url: str | None = Field(
        default=None,
        description="Where the schema `exporter` (keys, export log) lives. "
        "Unset: the same as `EXPORTER_DATABASE_URL`.",
    )
    schemas: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("public",),
        description="Comma-separated schemas whose tables and views are datasets; with one "
        "schema a dataset is named `table`, with several `schema.table`.",
    )

    statement_timeout_ms: int = Field(
        default=60_000,
        ge=0,
        description="The longest PostgreSQL may take to produce the next rows: the longest "
        "wait for the next chunk of a `COPY`, or `statement_timeout` of each cursor fetch "
        "(0: none).",
    )
    idle_in_transaction_timeout_ms: int = Field(
        default=300_000,
        ge=0,
        description="How long a stalled client may hold a snapshot: for a `COPY`, which "
        "PostgreSQL does not see as idle, the longest a chunk may wait for the client; with a "
        "cursor, `idle_in_transaction_session_timeout`. The export then fails (0: none).",
    )
    pool_size: int = Field(
        default=10,
        ge=1,
        description="The default of `EXPORTER_MAX_EXPORTS`. Each process's export pool holds "
        "one connection more than the service admits exports (catalog lookups, keys and the "
        "export log have small pools of their own).",
    )
    # How long an export waits for a free connection before it is refused with a 503.
    pool_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="How long an export waits for a free export connection before it is "
        "refused with a 503 and `Retry-After`.",
    )
    # Exports whose format COPY writes exactly run as COPY (the fastest way out of
    # PostgreSQL); false reads every export through a server-side cursor instead.
    use_copy: bool = Field(
        default=True,
        description="Exports run as `COPY ... TO STDOUT`; `false` reads them through a "
        "server-side cursor (for connection proxies that do not support `COPY`).",
    )
    # Rows per server-side cursor round trip, and bytes per HTTP chunk.
    batch_rows: int = Field(
        default=5_000,
        ge=1,
        description="Rows per cursor fetch (with `EXPORTER_USE_COPY=false`).",
    )
    chunk_bytes: int = Field(
        default=64 * 1024,
        ge=1,
        description="Output is sent in chunks of about this size (the last one may be smaller).",
    )
    # How long cleanup after a cancelled export may take before the connection is terminated.
    cleanup_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="How long resetting a connection after an abandoned export may take before "
        "it is terminated.",
    )
    # On shutdown, running exports may go on this long before they are cancelled.
    shutdown_grace_s: int = Field(
        default=30,
        ge=0,
        description="On shutdown (SIGTERM, Ctrl-C), how long running direct exports may go on "
        "before they are cancelled; cancelled ones still roll back and are logged. Background "
        "jobs are handed back and event streams end at once, without waiting for it.",
    )
    max_limit: int | None = Field(
        default=None,
        ge=0,
        description="The largest `limit` a request may ask for. Unset: no bound.",
    )
    max_in_items: int = Field(
        default=2000,
        ge=1,
        description="The most items an `in.()` filter may list; past it, a 400. PostgreSQL "
        "hashes the list once per query, so a long list costs little per row, but its "
        "parsing and checking grow with it; a value is at most 10,000 characters anyway.",
    )

    # Concurrent exports per key, and in total (unset: pool_size). Counted by PostgreSQL (the
    # database of database_url) across every worker process and replica; beyond them: 429.
    max_exports_per_key: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="Concurrent exports per key, across all processes and replicas.",
    )
    max_exports: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Concurrent exports of the whole service, across all processes and "
        "replicas. Unset: `EXPORTER_POOL_SIZE`.",
    )
    # Per-export caps (unset: none). An export that would pass one is aborted mid-stream: the
    # client gets an incomplete response, never a file that looks complete.
    max_rows: int | None = Field(
        default=None,
        ge=0,
        description="An export with more rows is aborted mid-stream. Unset: no cap.",
    )
    max_bytes: int | None = Field(
        default=None,
        ge=0,
        description="An export larger than this (before compression) is aborted mid-stream. "
        "Unset: no cap.",
    )
    max_seconds: float | None = Field(
        default=None,
        gt=0,
        description="An export running longer is aborted mid-stream (one with no rows yet by "
        "then is a 503). Unset: no cap.",
    )
    # A client that reads slower than this (bytes per second, over the window, while the
    # export waits on it) is cut off, so that it does not hold a snapshot for hours.
    min_bytes_per_second: int | None = Field(
        default=None,
        ge=1,
        description="A client reading slower than this while the export waits on it is cut "
        "off. Unset: no minimum.",
    )
    min_rate_window_s: float = Field(
        default=30.0,
        gt=0,
        description="The window over which a client's pace is judged.",
    )
    # Tracked tables: how long recorded changes are kept (a cursor older than that is a 410),
    # and how often `serve` deletes older ones.
    change_retention_s: float = Field(
        default=7 * 24 * 3600,
        ge=0,
        description="How long the changes of tracked tables are kept; a token that needs older "
        "ones is a 410.",
    )
    prune_interval_s: float = Field(
        default=600,
        gt=0,
        description="How often `exporter serve` deletes recorded changes past "
        "`EXPORTER_CHANGE_RETENTION_S` and export log entries past "
        "`EXPORTER_EXPORT_LOG_RETENTION`.",
    )
    # Background jobs (POST /exports): where their files go, how many run at once per process,
    # how long a claim holds without a heartbeat, how often idle processes look for work (and
    # for jobs whose worker died), and how long a finished file is kept.
    job_dir: str = Field(
        default=".exporter-jobs",
        description="Where background jobs' files are written (and kept, without a bucket).",
    )
    job_concurrency: int = Field(
        default=1,
        ge=0,
        le=100,
        description="Jobs run at once per `exporter serve` process (0: this process runs none).",
    )
    job_lease_s: float = Field(
        default=30,
        gt=0,
        description="A running job's claim; renewed every third of it, taken over by another "
        "process once it runs out.",
    )
    job_poll_s: float = Field(
        default=2,
        gt=0,
        description="How often an idle process looks for jobs (besides `NOTIFY`) and for jobs "
        "whose worker died.",
    )
    # Also as EXPORTER_JOB_RETENTION, with a unit if wished: 90, 90s, 15m, 24h, 7d.
    job_retention_s: float = Field(
        default=24 * 3600,
        ge=0,
        validation_alias=AliasChoices(
            "job_retention_s", "EXPORTER_JOB_RETENTION_S", "EXPORTER_JOB_RETENTION"
        ),
        description="How long a finished job's file is kept, and every export's events: "
        "seconds, or a number with `s`, `m`, `h` or `d` (`7d`).",
    )
    # Also as EXPORTER_EXPORT_LOG_RETENTION, with a unit if wished: 90d.
    export_log_retention_s: float = Field(
        default=90 * 86400,
        gt=0,
        validation_alias=AliasChoices(
            "export_log_retention_s",
            "EXPORTER_EXPORT_LOG_RETENTION_S",
            "EXPORTER_EXPORT_LOG_RETENTION",
        ),
        description="How long the export log keeps an entry, from its request: seconds, or a "
        "number with `s`, `m`, `h` or `d` (`90d`). `exporter serve` deletes older entries "
        "every `EXPORTER_PRUNE_INTERVAL_S`.",
    )
    max_event_streams_per_key: int = Field(
        default=20,
        ge=1,
        le=100_000,
        description="Progress event streams (`GET /exports/{id}/events`) a key may hold open "
        "at once, in each process; more is a 429 with `Retry-After`.",
    )
    max_event_streams: int = Field(
        default=500,
        ge=1,
        le=1_000_000,
        description="Progress event streams open at once in each process, all keys together; "
        "more is a 429 with `Retry-After`.",
    )
    max_jobs_per_key: int = Field(
        default=10,
        ge=1,
        le=10_000,
        description="Background jobs a key may have queued or running; more is a 429.",
    )
    # Finished job files in an S3-compatible bucket rather than in job_dir (which then only
    # holds files being written). Credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    # AWS_SESSION_TOKEN. The endpoint defaults to AWS's for the region; the addressing to
    # path-style (https://host/bucket/key) for another endpoint, virtual-hosted for AWS.
    job_s3_bucket: str | None = Field(
        default=None,
        min_length=3,
        max_length=63,
        description="Keep finished job files in this S3-compatible bucket. Unset: they stay in "
        "`EXPORTER_JOB_DIR`.",
    )
    job_s3_prefix: str = Field(
        default="exporter-jobs/",
        max_length=512,
        description="The objects' key prefix (no empty, `.` or `..` segments).",
    )
    job_s3_endpoint: str | None = Field(
        default=None,
        description="The S3-compatible server's URL, e.g. `http://127.0.0.1:9000`. Unset: "
        "AWS's for the region, `https://s3.<region>.amazonaws.com`.",
    )
    job_s3_region: str | None = Field(
        default=None,
        description="The region requests are signed for. Unset: `AWS_REGION`, else "
        "`AWS_DEFAULT_REGION`, else `us-east-1`.",
    )
    job_s3_addressing: Literal["auto", "path", "virtual"] = Field(
        default="auto",
        description="`path` (`host/bucket/key`), `virtual` (`bucket.host/key`), or `auto`: "
        "virtual for AWS, path for another endpoint.",
    )
    # Progress events of a running export (GET /exports/{id}/events) at most this often.
    progress_interval_s: float = Field(
        default=0.5,
        ge=0.05,
        description="Progress events of a running export at most this often.",
    )

    @field_validator("job_retention_s", "export_log_retention_s", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        if isinstance(value, str):
            match = _DURATION.fullmatch(value.strip())
            if match is None:
                raise ValueError("a number of seconds, or a number with s, m, h or d")
            return float(match["number"]) * _UNITS[match["unit"] or "s"]
        return value

    @field_validator("job_s3_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        # HTTP clients drop "." and ".." path segments after a request is signed, and an
        # empty segment is a key no sweep would list under the prefix.
        if any(segment in ("", ".", "..") for segment in value.split("/")[:-1]):
            raise ValueError("no empty, '.' or '..' segments (nor a leading '/')")
        return value

    @field_validator("schemas", mode="before")
    @classmethod
    def _split_schemas(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list | tuple):
            names = tuple(str(part) for part in value if str(part))
            if not names:
                raise ValueError("at least one schema must be exposed")
            return names
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr() and str() of the settings reach logs and tracebacks: the database URLs
        # without their passwords.
        for name, value in super().__repr_args__():
            yield name, masked_url(value) if name in _URL_FIELDS and value else value

    @property
    def state_url(self) -> str:
        return self.state_database_url or self.database_url

    @property
    def export_slots(self) -> int:
        return self.max_exports if self.max_exports is not None else self.pool_size

    @property
    def export_pool_size(self) -> int:
        """Each process's export pool: one connection more than the service admits exports,
        so that a process never runs out of connections while the service-wide limit has
        room (one process may be running them all), and the one past the limit takes its
        connection only to be told 429 by the slots, at once, rather than waiting for a
        connection to be a 503. Connections are made on demand and closed when idle: the
        database sees about as many as exports run."""
        return max(self.pool_size, self.export_slots + 1)

    @property
    def exposed_schemas(self) -> tuple[str, ...]:
        return tuple(s for s in self.schemas if s != OWN_SCHEMA)
