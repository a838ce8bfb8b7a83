"""Settings read from the environment: the job file retention under both of its names, with
units, and a clear refusal of anything else."""

import pytest
from pydantic import ValidationError

from exporter.settings import Settings, masked_url


@pytest.mark.parametrize(
    ("name", "value", "seconds"),
    [
        ("EXPORTER_JOB_RETENTION_S", "90", 90),
        ("EXPORTER_JOB_RETENTION_S", "1.5", 1.5),
        ("EXPORTER_JOB_RETENTION", "90s", 90),
        ("EXPORTER_JOB_RETENTION", "15m", 900),
        ("EXPORTER_JOB_RETENTION", "24h", 86400),
        ("EXPORTER_JOB_RETENTION", "7d", 7 * 86400),
        ("EXPORTER_JOB_RETENTION", "0", 0),
    ],
)
def test_job_retention(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, seconds: float
) -> None:
    monkeypatch.setenv(name, value)
    assert Settings().job_retention_s == seconds


@pytest.mark.parametrize("value", ["abc", "-1", "7w", "1 day", ""])
def test_job_retention_refuses_what_is_no_duration(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("EXPORTER_JOB_RETENTION", value)
    with pytest.raises(ValidationError):
        Settings()


def test_job_retention_defaults_to_a_day(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXPORTER_JOB_RETENTION", raising=False)
    monkeypatch.delenv("EXPORTER_JOB_RETENTION_S", raising=False)
    assert Settings().job_retention_s == 86400


def test_repr_and_str_of_the_settings_hide_database_passwords() -> None:
    """Issue 14, defect 9: they printed the URLs whole, into any log or traceback."""
    settings = Settings(
        database_url="postgresql://reader:s3cr%40t@db.example.com:5432/x?password=Qz7pw&sslmode=require",
        state_database_url="postgresql://owner:hunter2@[::1]/state",
    )
    for shown in (repr(settings), str(settings)):
        assert "s3cr" not in shown and "Qz7pw" not in shown and "hunter2" not in shown
        assert "postgresql://reader:***@db.example.com:5432/x?password=***&sslmode=require" in shown
        assert "postgresql://owner:***@[::1]/state" in shown
    assert settings.database_url.startswith("postgresql://reader:s3cr%40t@")  # used as given
    assert masked_url("postgresql://postgres@127.0.0.1/postgres") == (
        "postgresql://postgres@127.0.0.1/postgres"
    )
    assert masked_url("postgresql://u:p@[::1") == "***"
