"""Where job files are kept: the store interface (store.py), a local directory (local.py), an
S3-compatible bucket (s3.py)."""

from pathlib import Path

from exporter.settings import Settings
from exporter.storage.local import LocalStore
from exporter.storage.store import FileStore


def open_store(settings: Settings) -> FileStore:
    """The store the settings name; S3's client is imported only when it is used."""
    if settings.job_s3_bucket:
        from exporter.storage.s3 import S3Store

        return S3Store.from_settings(settings)
    return LocalStore(Path(settings.job_dir))
