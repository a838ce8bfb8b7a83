import re
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_DURATION = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[smhd])?")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# The service's own schema: keys and the export log live here, and it is never exported.
OWN_SCHEMA = "exporter"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXPORTER_", extra="ignore")

    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    # Where keys and the export log are kept; defaults to database_url, so exports may read a
    # replica while the state lives on a primary.
    state_database_url: str | None = None
    schemas: Annotated[tuple[str, ...], NoDecode] = ("public",)

    statement_timeout_ms: int = Field(default=60_000, ge=0)
    idle_in_transaction_timeout_ms: int = Field(default=300_000, ge=0)
    pool_size: int = Field(default=10, ge=1)
    # How long an export waits for a free connection before it is refused with a 503.
    pool_timeout_s: float = Field(default=5.0, gt=0)
    # Exports whose format COPY writes exactly run as COPY (the fastest way out of
    # PostgreSQL); false reads every export through a server-side cursor instead.
    use_copy: bool = True
    # Rows per server-side cursor round trip, and bytes per HTTP chunk.
    batch_rows: int = Field(default=5_000, ge=1)
    chunk_bytes: int = Field(default=64 * 1024, ge=1)
    # How long cleanup after a cancelled export may take before the connection is terminated.
    cleanup_timeout_s: float = Field(default=2.0, gt=0)
    # On shutdown, running exports may go on this long before they are cancelled.
    shutdown_grace_s: int = Field(default=30, ge=0)
    max_limit: int | None = Field(default=None, ge=0)

    # Concurrent exports per key, and in total (unset: pool_size). Counted by PostgreSQL (the
    # database of database_url) across every worker process and replica; beyond them: 429.
    max_exports_per_key: int = Field(default=2, ge=1, le=1000)
    max_exports: int | None = Field(default=None, ge=1, le=100_000)
    # Per-export caps (unset: none). An export that would pass one is aborted mid-stream: the
    # client gets an incomplete response, never a file that looks complete.
    max_rows: int | None = Field(default=None, ge=0)
    max_bytes: int | None = Field(default=None, ge=0)
    max_seconds: float | None = Field(default=None, gt=0)
    # A client that reads slower than this (bytes per second, over the window, while the
    # export waits on it) is cut off, so that it does not hold a snapshot for hours.
    min_bytes_per_second: int | None = Field(default=None, ge=1)
    min_rate_window_s: float = Field(default=30.0, gt=0)
    # Tracked tables: how long recorded changes are kept (a cursor older than that is a 410),
    # and how often `serve` deletes older ones.
    change_retention_s: float = Field(default=7 * 24 * 3600, ge=0)
    prune_interval_s: float = Field(default=600, gt=0)
    # Background jobs (POST /exports): where their files go, how many run at once per process,
    # how long a claim holds without a heartbeat, how often idle processes look for work (and
    # for jobs whose worker died), and how long a finished file is kept.
    job_dir: str = ".exporter-jobs"
    job_concurrency: int = Field(default=1, ge=0, le=100)
    job_lease_s: float = Field(default=30, gt=0)
    job_poll_s: float = Field(default=2, gt=0)
    # Also as EXPORTER_JOB_RETENTION, with a unit if wished: 90, 90s, 15m, 24h, 7d.
    job_retention_s: float = Field(
        default=24 * 3600,
        ge=0,
        validation_alias=AliasChoices(
            "job_retention_s", "EXPORTER_JOB_RETENTION_S", "EXPORTER_JOB_RETENTION"
        ),
    )
    max_jobs_per_key: int = Field(default=10, ge=1, le=10_000)
    # Finished job files in an S3-compatible bucket rather than in job_dir (which then only
    # holds files being written). Credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    # AWS_SESSION_TOKEN. The endpoint defaults to AWS's for the region; the addressing to
    # path-style (https://host/bucket/key) for another endpoint, virtual-hosted for AWS.
    job_s3_bucket: str | None = Field(default=None, min_length=3, max_length=63)
    job_s3_prefix: str = Field(default="exporter-jobs/", max_length=512)
    job_s3_endpoint: str | None = None
    job_s3_region: str | None = None
    job_s3_addressing: Literal["auto", "path", "virtual"] = "auto"
    # Progress events of a running export (GET /exports/{id}/events) at most this often.
    progress_interval_s: float = Field(default=0.5, ge=0.05)

    @field_validator("job_retention_s", mode="before")
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

    @property
    def state_url(self) -> str:
        return self.state_database_url or self.database_url

    @property
    def export_slots(self) -> int:
        return self.max_exports if self.max_exports is not None else self.pool_size

    @property
    def exposed_schemas(self) -> tuple[str, ...]:
        return tuple(s for s in self.schemas if s != OWN_SCHEMA)
