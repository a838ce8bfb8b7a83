"""A revoked key's work, stopped in every process: `exporter keys revoke` notifies CHANNEL
with the key's id, each `exporter serve` process LISTENs on it, and whatever runs for that key
here (a direct export, a job's run, an event stream) watches an event that the notification
sets. Notifications missed while the LISTEN connection was away are not lost work: the key's
next request is a 401, and a job's heartbeat finds it ended (within a third of its lease)."""

import contextlib
import logging
from collections.abc import Iterator

import anyio

log = logging.getLogger(__name__)

CHANNEL = "exporter_key_revoked"
# What a revoked key's work ends with: an export log entry's error, a job's.
REVOKED = "the key was revoked"
JOB_REVOKED = "the job's key was revoked"


class Revocations:
    def __init__(self) -> None:
        self._watching: dict[int, set[anyio.Event]] = {}

    @contextlib.contextmanager
    def watch(self, key_id: int) -> Iterator[anyio.Event]:
        """An event set when the key is revoked, for the `with` block."""
        revoked = self.subscribe(key_id)
        try:
            yield revoked
        finally:
            self.unsubscribe(key_id, revoked)

    def subscribe(self, key_id: int) -> anyio.Event:
        """An event set when the key is revoked, until unsubscribe (for what outlives a
        block: a response)."""
        revoked = anyio.Event()
        self._watching.setdefault(key_id, set()).add(revoked)
        return revoked

    def unsubscribe(self, key_id: int, revoked: anyio.Event) -> None:
        watching = self._watching.get(key_id)
        if watching is not None:
            watching.discard(revoked)
            if not watching:
                del self._watching[key_id]

    def notified(self, payload: str) -> None:
        try:
            key_id = int(payload)
        except ValueError:
            log.warning("a revocation notice that names no key: %r", payload[:100])
            return
        watching = self._watching.get(key_id, ())
        if watching:
            log.info(
                "key %d was revoked: stopping its %d exports and streams", key_id, len(watching)
            )
        for revoked in list(watching):
            revoked.set()
