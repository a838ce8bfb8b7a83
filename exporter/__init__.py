"""exporter: stream PostgreSQL tables and views out as CSV and NDJSON, in constant memory."""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from exporter.http.app import create_app as create_app


def __getattr__(name: str) -> Any:
    # Lazy, so that `exporter --help` and the migrations do not import FastAPI.
    if name == "create_app":
        from exporter.http.app import create_app

        return create_app
    raise AttributeError(name)
