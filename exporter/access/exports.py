"""An export on a key's behalf, as HTTP exports and background jobs run it: the key's
PostgreSQL role, its own and the service's export slots, the service's caps, and its part in
incremental pulls."""

from exporter.access.keys import ApiKey
from exporter.db.pool import Databases
from exporter.db.slots import Slots
from exporter.incremental.pulls import IncrementalPull
from exporter.incremental.tokens import Cursor
from exporter.pipeline.encoders import Encoder
from exporter.pipeline.query import ExportQuery
from exporter.pipeline.stream import Caps, ExportStream
from exporter.settings import Settings


class KeyExport(ExportStream):
    def __init__(
        self,
        query: ExportQuery,
        encoder: type[Encoder],
        key: ApiKey,
        databases: Databases,
        settings: Settings,
        label: str,
        secret: bytes | None,
        since: Cursor | None,
    ) -> None:
        self.pull = IncrementalPull(secret, since, key.role, query.limit)
        super().__init__(
            query,
            encoder,
            databases.exports,
            settings,
            label,
            role=key.role,
            slots=Slots(key.id, settings.max_exports_per_key, settings.export_slots),
            caps=Caps(max_rows=settings.max_rows, max_bytes=settings.max_bytes),
            planner=self.pull,
        )
