"""Progress event streams (text/event-stream) as an EventSource reads them."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Event:
    id: int
    event: str
    data: dict[str, Any]


def parse_events(lines: Iterator[str]) -> Iterator[Event]:
    """Events as an EventSource reads them; comments and retry: skipped."""
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "data" in fields:
                yield Event(
                    int(fields["id"]), fields.get("event", "message"), json.loads(fields["data"])
                )
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def read_events(
    client: httpx.Client, path: str, last_event_id: int | None = None, limit: int | None = None
) -> tuple[httpx.Response, list[Event]]:
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    events: list[Event] = []
    with client.stream("GET", path, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            return response, events
        for event in parse_events(response.iter_lines()):
            events.append(event)
            if event.event in ("done", "error") or (limit is not None and len(events) == limit):
                break
    return response, events
