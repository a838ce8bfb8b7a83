"""Settings read from the environment: the job file retention under both of its names, with
units, and a clear refusal of anything else."""

import pytest
from pydantic import ValidationError

from exporter.settings import Settings


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
