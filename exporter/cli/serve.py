"""`exporter serve`: uvicorn running the app, with the service's log format."""

from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def log_config() -> dict[str, Any]:
    # uvicorn's own loggers keep their formats; ours carry the request id.
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "exporter.http.middleware.RequestIdFilter"}},
        # Control characters from requests escaped, in every logger's messages.
        "formatters": {"plain": {"()": "exporter.http.logs.EscapingFormatter", "fmt": LOG_FORMAT}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "filters": ["request_id"],
                "stream": "ext://sys.stderr",
            }
        },
        # Every other library's records too (asyncio's, asyncpg's), through the same
        # escaping formatter rather than Python's last-resort handler.
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            "exporter": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        },
    }


def serve(host: str, port: int, workers: int, shutdown_grace_s: int = 30) -> None:
    import uvicorn

    uvicorn.run(
        "exporter.http.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=log_config(),
        # No WebSocket routes: importing a WebSocket implementation would only cost memory.
        ws="none",
        # Exports are long; running ones may finish for a while before they are cancelled.
        timeout_graceful_shutdown=shutdown_grace_s,
    )
