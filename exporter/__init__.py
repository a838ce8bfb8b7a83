"""exporter: stream PostgreSQL tables and views out as CSV and NDJSON, in constant memory.

The public Python surface is what `__all__` names; everything else is the implementation,
laid out by concern (docs/architecture.md)."""

from typing import TYPE_CHECKING, Any

from exporter.errors import ExporterError
from exporter.settings import Settings

__version__ = "0.1.0"

__all__ = ["ExporterError", "Settings", "__version__", "create_app"]

if TYPE_CHECKING:
    from exporter.http.app import create_app as create_app


def __getattr__(name: str) -> Any:
    # Lazy, so that `exporter --help` and the migrations do not import FastAPI.
    if name == "create_app":
        from exporter.http.app import create_app

        return create_app
    raise AttributeError(name)
