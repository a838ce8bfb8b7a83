"""Caps on open event streams (GET /exports/{id}/events), per key and in all, in each process.

A stream lasts as long as its export, and costs a task, a subscription and a state query per
notification: without a cap, one key could hold thousands open. Past a cap the answer is a 429
with Retry-After; a key's streams count for that key only. Counted per process (each of
`--workers N` and each replica keeps its own count): a stream holds no database connection
that a count across processes could be kept with."""

from collections import Counter
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from exporter.access.revocations import Revocations
from exporter.errors import TooManyRequests

RETRY_AFTER_S = 10


class EventStreamSlots:
    def __init__(self, per_key: int, total: int) -> None:
        self.per_key = per_key
        self.total = total
        self._open: Counter[int] = Counter()

    def take(self, key_id: int) -> None:
        """One stream's slot for the key; TooManyRequests past either cap."""
        if self._open[key_id] >= self.per_key:
            raise TooManyRequests(
                f"this key has {self.per_key} event streams open (in this process); close one,"
                " or try again later",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        if sum(self._open.values()) >= self.total:
            raise TooManyRequests(
                f"the service has {self.total} event streams open (in this process); try again"
                " later",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self._open[key_id] += 1

    def give_back(self, key_id: int) -> None:
        self._open[key_id] -= 1
        if self._open[key_id] <= 0:
            del self._open[key_id]


class SlottedStreamingResponse(StreamingResponse):
    """A StreamingResponse that gives its event stream's slot back however it ends: sent, the
    client gone (before its first byte too, when the body's generator never starts), or
    failed; and that is cut off the moment its key is revoked."""

    def __init__(
        self,
        *args: Any,
        slots: EventStreamSlots,
        key_id: int,
        revocations: Revocations,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.slots = slots
        self.key_id = key_id
        self.revocations = revocations
        self.revoked = revocations.subscribe(key_id)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = ended = False

        async def tracking_send(message: Message) -> None:
            nonlocal started, ended
            await send(message)
            started = started or message["type"] == "http.response.start"
            if message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True

        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as group:

                async def cut_when_revoked() -> None:
                    await self.revoked.wait()
                    group.cancel_scope.cancel()

                group.start_soon(cut_when_revoked)
                try:
                    await super().__call__(scope, receive, tracking_send)
                except Exception as exc:
                    # Kept out of the task group, which would wrap it in an ExceptionGroup.
                    failure = exc
                group.cancel_scope.cancel()
            if failure is not None:
                raise failure
            if self.revoked.is_set() and started and not ended:
                # Cut by the revocation: the stream ends cleanly (its EventSource reconnects,
                # and is told 401).
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):
                # A body cut off at a `yield` would otherwise keep its subscription to the
                # hub until the garbage collector came by.
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            self.revocations.unsubscribe(self.key_id, self.revoked)
            self.slots.give_back(self.key_id)
