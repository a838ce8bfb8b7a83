import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from exporter import __version__
from exporter.access import export_log
from exporter.access.revocations import CHANNEL as REVOCATION_CHANNEL
from exporter.access.revocations import Revocations
from exporter.db.listen import Listener
from exporter.db.pool import Databases
from exporter.http import openapi, problems
from exporter.http.event_streams import EventStreamSlots
from exporter.http.exports import ActiveExports
from exporter.http.memory import release_free_memory
from exporter.http.middleware import (
    HeaderLimitsMiddleware,
    RequestIdMiddleware,
    SecurityHeadersMiddleware,
    UnexpectedErrorMiddleware,
)
from exporter.http.refusals import UnauthenticatedRefusals
from exporter.http.routes.datasets import router
from exporter.http.routes.export_log import router as export_log_router
from exporter.http.routes.jobs import router as jobs_router
from exporter.http.shutdown import ShutdownSignal
from exporter.incremental.tracking import prune_changes_forever
from exporter.jobs.events import EventHub
from exporter.jobs.runner import JobRunner
from exporter.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing is created at import time, so tests choose the settings."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        databases = await Databases.open(settings)
        app.state.databases = databases
        app.state.active_exports = active = ActiveExports()
        app.state.unauthenticated = UnauthenticatedRefusals()
        app.state.event_stream_slots = EventStreamSlots(
            settings.max_event_streams_per_key, settings.max_event_streams
        )
        release_free_memory()
        app.state.event_hub = hub = EventHub(settings.state_url)
        await hub.start()
        app.state.revocations = revocations = Revocations()
        revocation_listener = Listener(settings.state_url, REVOCATION_CHANNEL, revocations.notified)
        app.state.job_runner = runner = JobRunner(databases, settings, revocations)
        shutdown = ShutdownSignal()
        shutdown.install()

        async def drain() -> None:
            # uvicorn now waits for open connections (up to EXPORTER_SHUTDOWN_GRACE_S) before
            # the lifespan ends: jobs and event streams go to other processes meanwhile;
            # direct exports keep their grace period.
            await shutdown.started.wait()
            log.info("shutting down: jobs handed back, event streams ended")
            runner.drain()
            hub.drain()

        background = [
            asyncio.create_task(prune_changes_forever(databases.exports, settings)),
            asyncio.create_task(
                export_log.prune_forever(
                    databases.state, settings.export_log_retention_s, settings.prune_interval_s
                )
            ),
            asyncio.create_task(drain()),
            asyncio.create_task(revocation_listener.run_forever()),
        ]
        claiming: asyncio.Task[None] | None = None
        if settings.job_concurrency:
            claiming = asyncio.create_task(runner.run_forever())
            background.append(claiming)
        background.append(asyncio.create_task(runner.files.expire_forever()))
        try:
            yield
        finally:
            shutdown.uninstall()
            # Also when no signal came first (the app served without uvicorn's handlers).
            runner.drain()
            hub.drain()
            if claiming is not None:
                # Handing its jobs back, it returns on its own; a cancellation in the middle of
                # a claim could leave the job to its lease.
                await asyncio.wait({claiming}, timeout=settings.cleanup_timeout_s + 5)
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await hub.close()
            await runner.aclose()
            # Exports cancelled by a shutdown still roll back and write their export log
            # entries (shielded); the pools must outlive that.
            left = await active.wait(settings.cleanup_timeout_s + 5)
            if left:
                log.warning("%d exports had not released their connections at shutdown", left)
            await databases.close()

    app = FastAPI(
        title="exporter",
        version=__version__,
        description="Stream PostgreSQL tables and views out as CSV and NDJSON attachments.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(router)
    app.include_router(export_log_router)
    app.include_router(jobs_router)
    problems.install(app)
    openapi.install(app)
    # Added last = outermost: every response, errors included, gets a request id.
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(HeaderLimitsMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app
