"""The incremental-pull invariant's workload, shared by tests/test_incremental_invariant.py and
bench/soak_incremental.py: writers that insert, update and delete rows of a table in every way
PostgreSQL lets a write land late or not at all (transactions open across pulls, savepoints
released and rolled back, PL/pgSQL exception blocks, whole rollbacks), and a poller that keeps
a copy of the table by a full export and then `since=` pulls, checking every pull as it goes.

Every write sets `version` from a sequence, so that each row version is known by (id, version).
Each writer owns its own ids: writes to one id are serialised by its writer, so an id's
versions grow in commit order, and no writer ever waits for another's locks."""

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from tests.support.database import asyncpg_dsn, with_database

# snapshot: the table is not tracked. tracked: it is from the start, and pulls ask for deletes.
# track-midway: `exporter track` runs while writers and pulls do; pulls switch from snapshot
# mode to tracked mode and never back, and ask for no deletes (a client cannot know when its
# cursor will be served from the change table).
Mode = Literal["snapshot", "tracked", "track-midway"]
Row = tuple[int, str | None]  # (version, payload) of an id
# Writing subtransactions in one transaction: more than PGPROC_MAX_CACHED_SUBXIDS (64).
SUBTRANSACTIONS = 70
KINDS = ("plain", "savepoint", "block", "rollback", "late")
# Payloads that an encoder could get wrong: quotes, backslashes, separators, line breaks,
# non-ASCII, the empty string and NULL.
PAYLOADS = ("plain", 'said "hi"', "back\\slash", "a,b;c\td", "line\nbreak\r\n", "naïve ☕", "")


def other_database(url: str) -> str:
    """Another database of the same cluster: `postgres`, which every cluster has (unless the
    workload's own database is that one: then template1, only read)."""
    other = "postgres" if make_url(url).database != "postgres" else "template1"
    return with_database(url, other)


@dataclass(frozen=True)
class Workload:
    """The table `name` (in schema public, exported as dataset `name`), its sequence and its
    PL/pgSQL write function."""

    name: str
    writers: int = 4
    ids_per_writer: int = 250
    initial_per_writer: int = 150

    @property
    def sequence(self) -> str:
        return f"{self.name}_version"

    @property
    def function(self) -> str:
        return f"{self.name}_block"

    def ids_of(self, writer: int) -> range:
        start = (writer + 1) * 100_000
        return range(start, start + self.ids_per_writer)

    def all_ids(self) -> list[int]:
        return [i for w in range(self.writers) for i in self.ids_of(w)]

    def setup_sql(self) -> list[str]:
        t, seq, fn = self.name, self.sequence, self.function
        initial = [
            f"({i}, nextval('{seq}'), 'initial {i}')"
            for w in range(self.writers)
            for i in self.ids_of(w)[: self.initial_per_writer]
        ]
        return [
            f"DROP TABLE IF EXISTS public.{t}",
            f"DROP SEQUENCE IF EXISTS public.{seq}",
            f"DROP FUNCTION IF EXISTS public.{fn}",
            f"CREATE SEQUENCE public.{seq}",
            f"""CREATE TABLE public.{t} (
                id bigint PRIMARY KEY, version bigint NOT NULL, payload text
            )""",
            # Writes inside a BEGIN ... EXCEPTION block (a subtransaction); p_fail rolls the
            # block back, by RAISE or by an error of PostgreSQL's own, and the function then
            # reports nothing. Variables survive the block's rollback, so the written
            # versions are collected in arrays and returned only when the block held.
            f"""CREATE FUNCTION public.{fn}(
                p_upserts bigint[], p_deletes bigint[], p_payload text, p_fail int
            ) RETURNS TABLE (changed_id bigint, changed_version bigint)
            LANGUAGE plpgsql AS $$
            DECLARE
                k bigint;
                v bigint;
                ids bigint[] := '{{}}';
                versions bigint[] := '{{}}';
            BEGIN
                BEGIN
                    FOREACH k IN ARRAY p_upserts LOOP
                        INSERT INTO public.{t} AS t (id, version, payload)
                        VALUES (k, nextval('public.{seq}'), p_payload)
                        ON CONFLICT (id) DO UPDATE
                            SET version = nextval('public.{seq}'), payload = excluded.payload
                        RETURNING t.version INTO v;
                        ids := ids || k;
                        versions := versions || v;
                    END LOOP;
                    FOREACH k IN ARRAY p_deletes LOOP
                        DELETE FROM public.{t} AS t WHERE t.id = k;
                        IF FOUND THEN
                            ids := ids || k;
                            versions := versions || NULL::bigint;
                        END IF;
                    END LOOP;
                    IF p_fail = 1 THEN
                        RAISE EXCEPTION 'roll the block back';
                    ELSIF p_fail = 2 THEN
                        PERFORM 1 / (p_fail - 2);
                    END IF;
                EXCEPTION WHEN raise_exception OR division_by_zero THEN
                    ids := '{{}}';
                    versions := '{{}}';
                END;
                RETURN QUERY SELECT u.i, u.v FROM unnest(ids, versions) AS u(i, v);
            END
            $$""",
            f"INSERT INTO public.{t} VALUES {', '.join(initial)}",
        ]

    def teardown_sql(self) -> list[str]:
        return [
            f"DROP TABLE IF EXISTS public.{self.name}",
            f"DROP SEQUENCE IF EXISTS public.{self.sequence}",
            f"DROP FUNCTION IF EXISTS public.{self.function}",
        ]


async def run_statements(url: str, statements: list[str]) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def read_table(url: str, workload: Workload) -> dict[int, Row]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await conn.fetch(f"SELECT id, version, payload FROM public.{workload.name}")
        return {int(r["id"]): (int(r["version"]), r["payload"]) for r in rows}
    finally:
        await conn.close()


@dataclass
class Event:
    """A committed change of one id: its new version, or None for a delete. `sent` is when its
    COMMIT was sent, `done` when it returned (monotonic clock; inf until then)."""

    sent: float
    done: float
    version: int | None
    payload: str | None
    origin: str = "initial"  # the write: its transaction, and how it wrote


@dataclass
class History:
    """Per id, the committed changes in commit order (a writer owns its ids, so appending in
    the order its COMMITs are sent is commit order). Events older than the last one committed
    before the latest pull started are dropped: no later pull may deliver them."""

    events: dict[int, list[Event]] = field(default_factory=dict)

    def committing(
        self, changes: dict[int, Row | None], sent: float, origins: dict[int, str] | None = None
    ) -> list[Event]:
        added = []
        for id_, change in changes.items():
            version, payload = change if change is not None else (None, None)
            event = Event(sent, math.inf, version, payload)
            if origins:
                event.origin = origins[id_]
            self.events.setdefault(id_, []).append(event)
            added.append(event)
        return added

    def latest_done_before(self, id_: int, when: float) -> int | None:
        """The index of the id's last event whose COMMIT had returned by `when`."""
        found = None
        for index, event in enumerate(self.events.get(id_, ())):
            if event.done < when:
                found = index
            else:
                break
        return found

    def prune(self, when: float) -> None:
        for id_, events in self.events.items():
            index = self.latest_done_before(id_, when)
            if index:
                del events[:index]


@dataclass
class Pull:
    number: int  # 0: the full export
    started: float
    ended: float = 0.0
    rows: int = 0
    tombstones: int = 0
    repeats: int = 0
    possibly_repeated: int = 0
    mode: str | None = None


class Poller:
    """Keeps `copy` up to date: a full export, then pulls with since=. Checks each pull as it
    is applied (see `check`), collecting what it finds in `problems`."""

    def __init__(self, client: httpx.AsyncClient, workload: Workload, mode: Mode) -> None:
        self.client = client
        self.workload = workload
        self.mode = mode
        self.history = History()
        self.copy: dict[int, Row] = {}
        self.last_delivered: dict[int, int] = {}  # id -> the highest version delivered
        self.cursor: str | None = None
        self.pulls: list[Pull] = []
        self.problems: list[str] = []
        self.tombstones_for_absent_ids = 0
        self.reported: set[tuple[int, float]] = set()  # misses, each reported once
        self.started = 0  # pulls started / finished, the full export counted as 0
        self.finished = -1
        self.progressed = asyncio.Condition()

    async def wait_for_pulls(self, count: int, timeout_s: float) -> None:
        """Until `count` more pulls have started and finished after now (or the timeout)."""
        target = self.started + count
        async with self.progressed:
            try:
                await asyncio.wait_for(
                    self.progressed.wait_for(lambda: self.finished >= target), timeout_s
                )
            except TimeoutError:
                pass

    async def pull(self) -> Pull:
        number = len(self.pulls)
        params = {}
        if number:
            assert self.cursor is not None
            params["since"] = self.cursor
            if self.mode == "tracked":
                params["deletes"] = "true"
        self.started = number
        pull = Pull(number, time.monotonic())
        url = f"/datasets/{self.workload.name}.ndjson"
        async with self.client.stream("GET", url, params=params) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                raise AssertionError(f"pull {number}: {response.status_code} {body}")
            cursor = response.headers.get("x-export-cursor")
            if not cursor:
                raise AssertionError(
                    f"pull {number}: no X-Export-Cursor header; headers {dict(response.headers)}"
                )
            if number:
                pull.mode = response.headers.get("x-export-cursor-mode")
                pull.possibly_repeated = int(
                    response.headers.get("x-export-possibly-repeated", "-1")
                )
            lines = [line async for line in response.aiter_lines() if line]
        pull.ended = time.monotonic()
        self.cursor = cursor
        self.pulls.append(pull)
        self.apply(pull, lines)
        self.check(pull)
        async with self.progressed:
            self.finished = number
            self.progressed.notify_all()
        return pull

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def apply(self, pull: Pull, lines: list[str]) -> None:
        for line in lines:
            record = json.loads(line)
            if "_deleted" in record:
                pull.tombstones += 1
                id_ = int(record["_deleted"]["id"])
                if self.copy.pop(id_, None) is None:
                    self.tombstones_for_absent_ids += 1
                if not self._deleted_by_then(id_, pull.ended):
                    self.problem(f"pull {pull.number}: tombstone for id {id_}, never deleted")
                continue
            pull.rows += 1
            id_, version, payload = int(record["id"]), int(record["version"]), record["payload"]
            last = self.last_delivered.get(id_)
            if last is not None and version <= last:
                pull.repeats += 1
                if version < last:
                    self.problem(
                        f"pull {pull.number}: id {id_} went back to version {version} "
                        f"after {last} had been delivered"
                    )
            self.last_delivered[id_] = max(version, last or version)
            self._check_delivered(pull, id_, version, payload)
            self.copy[id_] = (version, payload)
        if pull.number == 0:
            return
        expected = {"snapshot": "snapshot", "tracked": "tracked"}.get(self.mode)
        if expected is None:  # track-midway
            switched = any(p.mode == "tracked" for p in self.pulls[1:-1])
            expected = "tracked" if switched else pull.mode
        if pull.mode != expected or pull.mode not in ("snapshot", "tracked"):
            self.problem(f"pull {pull.number}: X-Export-Cursor-Mode {pull.mode!r}")
        if pull.possibly_repeated < 0:
            self.problem(f"pull {pull.number}: no X-Export-Possibly-Repeated header")
        if pull.repeats > pull.possibly_repeated or (pull.mode == "tracked" and pull.repeats):
            self.problem(
                f"pull {pull.number}: {pull.repeats} versions repeated, "
                f"X-Export-Possibly-Repeated {pull.possibly_repeated}"
            )
        if pull.mode == "tracked" and pull.possibly_repeated != 0:
            self.problem(
                f"pull {pull.number}: tracked, X-Export-Possibly-Repeated {pull.possibly_repeated}"
            )

    def _deleted_by_then(self, id_: int, when: float) -> bool:
        return any(e.version is None and e.sent < when for e in self.history.events.get(id_, ()))

    def _check_delivered(self, pull: Pull, id_: int, version: int, payload: str | None) -> None:
        # A delivered version must be one a transaction committed (its COMMIT sent before the
        # response ended), and not older than the last one committed before the pull began:
        # not an uncommitted, rolled-back or overwritten version.
        for event in self.history.events.get(id_, ()):
            if event.version == version and event.sent < pull.ended:
                if event.payload != payload:
                    self.problem(
                        f"pull {pull.number}: id {id_} version {version} with payload "
                        f"{payload!r}, committed with {event.payload!r}"
                    )
                return
        self.problem(
            f"pull {pull.number}: id {id_} version {version} delivered: not committed, or "
            "older than a version committed before the pull began"
        )

    def check(self, pull: Pull) -> None:
        """Nothing missed: for each id, the last change committed before the pull began is in
        the copy, unless a later change's COMMIT was sent before the pull ended (its snapshot
        may hold either). Snapshot mode reports no deletes: a deleted id may stay behind."""
        for id_ in self.workload.all_ids():
            events = self.history.events.get(id_, [])
            index = self.history.latest_done_before(id_, pull.started)
            if index is None:
                continue
            base = events[index]
            later = [e for e in events[index + 1 :] if e.sent < pull.ended]
            if any(e.version is None for e in later):
                continue
            held = self.copy.get(id_)
            allowed = {e.version for e in later}
            if base.version is not None:
                missed = held is None or (held[0] != base.version and held[0] not in allowed)
                what = f"id {id_} version {base.version}"
            else:
                missed = self.mode == "tracked" and held is not None and held[0] not in allowed
                what = f"the delete of id {id_}"
            if missed and (id_, base.done) not in self.reported:
                self.reported.add((id_, base.done))
                self.problem(
                    f"pull {pull.number}: missed {what}, written by {base.origin}, committed "
                    f"{pull.started - base.done:.3f} s before the pull began; the copy holds "
                    f"{held}"
                )
        self.history.prune(pull.started)

    async def run(self, writers_done: asyncio.Event, interval_s: tuple[float, float]) -> None:
        rng = random.Random(7)
        while not writers_done.is_set():
            await self.pull()
            await asyncio.sleep(rng.uniform(*interval_s))
        # Every writer has committed or rolled back: the last pull must hold everything.
        await self.pull()


class Writer:
    """One connection; transactions of every kind, one after another, on the writer's own ids.
    Each writer first runs one transaction of each kind (so that every kind happens in every
    run), then kinds at random."""

    def __init__(
        self,
        number: int,
        conn: asyncpg.Connection,
        workload: Workload,
        poller: Poller,
        stats: Counter[str],
        seed: int,
        pause_s: float = 0.005,
    ) -> None:
        self.number = number
        self.conn = conn
        self.workload = workload
        self.poller = poller
        self.stats = stats
        self.rng = random.Random(seed)
        self.ids = list(workload.ids_of(number))
        self.pause_s = pause_s
        self.transactions = 0
        self.origins: dict[int, str] = {}  # this transaction's changes: how each was written
        self.origin = ""
        t, seq = workload.name, workload.sequence
        self.upsert_sql = (
            f"INSERT INTO public.{t} AS t (id, version, payload) "
            f"VALUES ($1, nextval('public.{seq}'), $2) "
            f"ON CONFLICT (id) DO UPDATE SET version = nextval('public.{seq}'), "
            "payload = excluded.payload RETURNING t.version"
        )
        self.delete_sql = f"DELETE FROM public.{t} WHERE id = $1 RETURNING id"
        # Several rows in one statement (a statement-level trigger sees them all at once).
        self.update_many_sql = (
            f"UPDATE public.{t} SET version = nextval('public.{seq}'), payload = $2 "
            "WHERE id = ANY($1) RETURNING id, version"
        )
        # A key change: the old id is gone (as if deleted), the new one appears. The writer
        # owns both ids, so no other transaction can take the new one meanwhile.
        self.move_sql = (
            f"UPDATE public.{t} SET id = $2, version = nextval('public.{seq}'), payload = $3 "
            f"WHERE id = $1 AND NOT EXISTS (SELECT FROM public.{t} WHERE id = $2) "
            "RETURNING version"
        )
        self.block_sql = (
            f"SELECT changed_id, changed_version FROM public.{workload.function}($1, $2, $3, $4)"
        )

    def payload(self) -> str | None:
        if self.rng.random() < 0.1:
            return None
        return f"{self.rng.choice(PAYLOADS)} w{self.number}t{self.transactions}"

    async def run(self, stop: asyncio.Event) -> None:
        script = list(KINDS[self.number % len(KINDS) :] + KINDS[: self.number % len(KINDS)])
        weights = (40, 20, 20, 10, 10)
        while script or not stop.is_set():
            scripted = bool(script)
            kind = script.pop(0) if scripted else self.rng.choices(KINDS, weights)[0]
            await self.transaction(kind, scripted)
            await asyncio.sleep(self.rng.uniform(0, self.pause_s))

    async def transaction(self, kind: str, scripted: bool) -> None:
        self.transactions += 1
        self.origins = {}
        changes: dict[int, Row | None] = {}
        # Counted only if the transaction commits: a savepoint or block rolled back inside a
        # committed transaction is what must not show.
        counts: Counter[str] = Counter()
        await self.conn.execute("BEGIN")
        late = kind == "late"
        first_write_at: int | None = None
        if late and self.rng.random() < 0.3:
            # The transaction starts without an xid; it takes one only after a pull.
            await self.conn.fetchval(f"SELECT count(*) FROM public.{self.workload.name}")
            await self.poller.wait_for_pulls(1, timeout_s=5)
        steps = self.steps(kind, scripted)
        for position, step in enumerate(steps):
            if late and position:
                await self.poller.wait_for_pulls(1, timeout_s=5)
            if first_write_at is None:
                first_write_at = self.poller.started
            self.origin = f"transaction {self.number}.{self.transactions} ({kind})"
            await step(changes, counts)
        if late:
            await self.poller.wait_for_pulls(1, timeout_s=5)
        commit = kind != "rollback" and not (late and not scripted and self.rng.random() < 0.15)
        if not commit:
            await self.conn.execute("ROLLBACK")
            self.stats["rolled back transactions"] += 1
            return
        events = self.poller.history.committing(changes, time.monotonic(), self.origins)
        await self.conn.execute("COMMIT")
        done = time.monotonic()
        for event in events:
            event.done = done
        self.stats["committed transactions"] += 1
        self.stats.update(counts)
        self.stats["committed upserts"] += sum(1 for c in changes.values() if c is not None)
        self.stats["committed deletes"] += sum(1 for c in changes.values() if c is None)
        if late and first_write_at is not None and self.poller.finished >= first_write_at + 2:
            self.stats["late commits (open across 2+ pulls)"] += 1

    def steps(
        self, kind: str, scripted: bool
    ) -> list[Callable[[dict[int, Row | None], Counter[str]], Any]]:
        rng = self.rng
        if kind == "plain":
            return [self.every_statement] if scripted else [self.plain]
        if kind == "savepoint":
            chosen = [self.savepoint(release=True), self.savepoint(release=False)]
            if rng.random() < 0.05:
                chosen.append(self.many_savepoints)
            rng.shuffle(chosen)
            return [self.plain, *chosen] if rng.random() < 0.5 else chosen
        if kind == "block":
            return [self.block(fail=0), self.block(fail=rng.choice((1, 2)))]
        if kind == "rollback":
            return [self.plain, self.savepoint(release=True), self.block(fail=0)]
        # late: two or three steps of any kind, a pull between each
        choices = [
            self.plain,
            self.savepoint(release=True),
            self.savepoint(release=False),
            self.block(fail=0),
            self.block(fail=1),
        ]
        steps = [rng.choice(choices) for _ in range(rng.choice((2, 3)))]
        # Now and then (and in each writer's first), a subtransaction cache overflows in a
        # transaction that stays open across pulls.
        if scripted or rng.random() < 0.1:
            steps[rng.randrange(len(steps))] = self.many_savepoints
        return steps

    def pick(self) -> tuple[list[int], list[int]]:
        chosen = self.rng.sample(self.ids, self.rng.randint(1, 4))
        deletes = [i for i in chosen if self.rng.random() < 0.25]
        return [i for i in chosen if i not in deletes], deletes

    async def plain(
        self, changes: dict[int, Row | None], counts: Counter[str], where: str = "plain write"
    ) -> None:
        upserts, deletes = self.pick()
        origin = f"{self.origin}, {where}"
        if len(upserts) > 1 and self.rng.random() < 0.3:
            await self.update_many(upserts, changes, counts, origin)
            upserts = []
        for id_ in upserts:
            payload = self.payload()
            version = await self.conn.fetchval(self.upsert_sql, id_, payload)
            changes[id_] = (int(version), payload)
            self.origins[id_] = origin
        for id_ in deletes:
            if self.rng.random() < 0.3:
                await self.move(id_, self.rng.choice(self.ids), changes, counts, origin)
            elif await self.conn.fetchval(self.delete_sql, id_) is not None:
                changes[id_] = None
                self.origins[id_] = origin

    async def every_statement(self, changes: dict[int, Row | None], counts: Counter[str]) -> None:
        """A step with each kind of statement, on rows known to exist (or not)."""
        origin = f"{self.origin}, plain write"
        existing = {
            int(r["id"])
            for r in await self.conn.fetch(
                f"SELECT id FROM public.{self.workload.name} WHERE id = ANY($1)", self.ids
            )
        }
        held, free = sorted(existing), sorted(set(self.ids) - existing)
        await self.update_many(held[:3], changes, counts, origin)
        await self.move(held[3], free[0], changes, counts, origin)
        if await self.conn.fetchval(self.delete_sql, held[4]) is not None:
            changes[held[4]] = None
            self.origins[held[4]] = origin
        payload = self.payload()
        version = await self.conn.fetchval(self.upsert_sql, free[1], payload)
        changes[free[1]] = (int(version), payload)
        self.origins[free[1]] = origin

    async def update_many(
        self, ids: list[int], changes: dict[int, Row | None], counts: Counter[str], origin: str
    ) -> None:
        payload = self.payload()
        for row in await self.conn.fetch(self.update_many_sql, ids, payload):
            changes[int(row["id"])] = (int(row["version"]), payload)
            self.origins[int(row["id"])] = f"{origin} (an UPDATE of several rows)"
            counts["rows updated by multi-row updates"] += 1

    async def move(
        self, old: int, new: int, changes: dict[int, Row | None], counts: Counter[str], origin: str
    ) -> None:
        payload = self.payload()
        version = await self.conn.fetchval(self.move_sql, old, new, payload)
        if version is not None:
            changes[old], changes[new] = None, (int(version), payload)
            self.origins[old] = f"{origin} (its key changed to {new})"
            self.origins[new] = f"{origin} (key changed from {old})"
            counts["key changes"] += 1

    def savepoint(self, release: bool) -> Callable[[dict[int, Row | None], Counter[str]], Any]:
        async def step(changes: dict[int, Row | None], counts: Counter[str]) -> None:
            before, origins = dict(changes), dict(self.origins)
            await self.conn.execute("SAVEPOINT s")
            await self.plain(changes, counts, "in a released savepoint")
            if release:
                await self.conn.execute("RELEASE SAVEPOINT s")
                counts["savepoints released"] += 1
            else:
                await self.conn.execute("ROLLBACK TO SAVEPOINT s")
                await self.conn.execute("RELEASE SAVEPOINT s")
                changes.clear()
                changes.update(before)
                self.origins = origins
                counts["savepoints rolled back"] += 1

        return step

    async def many_savepoints(self, changes: dict[int, Row | None], counts: Counter[str]) -> None:
        """More subtransactions that write than a backend keeps in its cache (64): snapshots
        taken meanwhile are "suboverflowed", and PostgreSQL looks their ids up in pg_subtrans."""
        origin = f"{self.origin}, in one of {SUBTRANSACTIONS} savepoints"
        for number in range(SUBTRANSACTIONS):
            await self.conn.execute("SAVEPOINT many")
            id_, payload = self.rng.choice(self.ids), self.payload()
            version = await self.conn.fetchval(self.upsert_sql, id_, payload)
            if number % 10 == 9:
                await self.conn.execute("ROLLBACK TO SAVEPOINT many")
            else:
                changes[id_] = (int(version), payload)
                self.origins[id_] = origin
            await self.conn.execute("RELEASE SAVEPOINT many")
        counts["subtransaction caches overflowed"] += 1

    def block(self, fail: int) -> Callable[[dict[int, Row | None], Counter[str]], Any]:
        async def step(changes: dict[int, Row | None], counts: Counter[str]) -> None:
            upserts, deletes = self.pick()
            payload = self.payload()
            rows = await self.conn.fetch(self.block_sql, upserts, deletes, payload, fail)
            if fail:
                if rows:
                    raise AssertionError(f"a failed block reported writes: {rows}")
                counts["exception blocks rolled back"] += 1
                return
            for row in rows:
                id_, version = int(row["changed_id"]), row["changed_version"]
                changes[id_] = (int(version), payload) if version is not None else None
                self.origins[id_] = f"{self.origin}, in a PL/pgSQL exception block"
            counts["exception blocks committed"] += 1

        return step


@dataclass
class Outcome:
    mode: Mode
    seconds: float
    pulls: list[Pull]
    stats: Counter[str]
    problems: list[str]
    differences: list[str]
    tombstones_for_absent_ids: int

    def summary(self) -> dict[str, Any]:
        pulls = self.pulls[1:]
        return {
            "mode": self.mode,
            "seconds": round(self.seconds, 1),
            "pulls": len(pulls),
            "rows in the full export": self.pulls[0].rows if self.pulls else 0,
            "rows pulled": sum(p.rows for p in pulls),
            "tombstones": sum(p.tombstones for p in pulls),
            "tombstones for ids not held": self.tombstones_for_absent_ids,
            "repeats": sum(p.repeats for p in pulls),
            "possibly repeated (headers)": sum(p.possibly_repeated for p in pulls),
            "problems (misses, bad versions, repeats over the header)": len(self.problems),
            "final differences": len(self.differences),
            "writers": dict(sorted(self.stats.items())),
        }


def differences(
    mode: Mode, copy: dict[int, Row], table: dict[int, Row], history: History
) -> list[str]:
    """The copy against the table after the last pull (no writer running)."""
    found = []
    for id_ in sorted(table.keys() | copy.keys()):
        held, actual = copy.get(id_), table.get(id_)
        if held == actual:
            continue
        if actual is None and mode != "tracked":
            events = history.events.get(id_)
            if events and events[-1].version is None:
                continue  # deleted, and snapshot mode reports no deletes
            found.append(f"id {id_}: in the copy as {held}, not in the table, never deleted")
            continue
        found.append(f"id {id_}: table {actual}, copy {held}")
    return found


async def run_workload(
    database_url: str,
    base_url: str,
    key: str,
    workload: Workload,
    mode: Mode,
    seconds: float,
    interval_s: tuple[float, float] = (0.05, 0.25),
    seed: int = 1,
    pause_s: float = 0.005,
    progress: Callable[[str], None] | None = None,
    track: Callable[[], None] | None = None,
) -> Outcome:
    """Writers for `seconds` (plus the transactions they have started), the poller throughout,
    one last pull, and the copy compared with the table. In mode track-midway, `track` (which
    runs `exporter track`) is called in a thread a third of the way in."""
    assert (mode == "track-midway") == (track is not None)
    headers = {"Authorization": f"Bearer {key}", "Accept-Encoding": "identity"}
    started = time.monotonic()
    stats: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as client:
        poller = Poller(client, workload, mode)
        conns = [await asyncpg.connect(asyncpg_dsn(database_url)) for _ in range(workload.writers)]
        # A transaction left open in another database of the cluster, with an id older than
        # every writer's: it cannot write here, and must neither hide a writer's versions
        # nor make every pull repeat everything.
        bystander = await asyncpg.connect(asyncpg_dsn(other_database(database_url)))
        conns.append(bystander)
        await bystander.execute("BEGIN")
        await bystander.fetchval("SELECT pg_current_xact_id()")
        try:
            initial = await read_table(database_url, workload)
            poller.history.committing(dict(initial), sent=-1.0)
            for events in poller.history.events.values():
                events[-1].done = -1.0
            await poller.pull()
            writers = [
                Writer(n, conn, workload, poller, stats, seed * 1000 + n, pause_s)
                for n, conn in enumerate(conns[: workload.writers])
            ]
            stop, writers_done = asyncio.Event(), asyncio.Event()

            async def write() -> None:
                try:
                    await asyncio.gather(*(w.run(stop) for w in writers))
                finally:
                    writers_done.set()

            async def report() -> None:
                while progress:
                    try:
                        await asyncio.wait_for(writers_done.wait(), 10)
                        return
                    except TimeoutError:
                        progress(
                            f"{time.monotonic() - started:.0f} s: {len(poller.pulls) - 1} pulls, "
                            f"{stats['committed transactions']} commits, "
                            f"{len(poller.problems)} problems"
                        )

            async def vacuum() -> None:
                # VACUUM removes dead versions, prunes HOT chains and freezes what every
                # transaction sees: none of it may hide a version from a pull.
                conn = await asyncpg.connect(asyncpg_dsn(database_url))
                try:
                    while not writers_done.is_set():
                        await conn.execute(f"VACUUM (FREEZE) public.{workload.name}")
                        stats["vacuums (freeze)"] += 1
                        try:
                            await asyncio.wait_for(writers_done.wait(), 1)
                        except TimeoutError:
                            pass
                finally:
                    await conn.close()

            tracking_began = asyncio.Event()

            async def start_tracking() -> None:
                if track is not None:
                    await asyncio.sleep(seconds / 3)
                    await asyncio.to_thread(track)
                    stats["tracking started midway"] += 1
                    tracking_began.set()

            async with asyncio.TaskGroup() as group:
                group.create_task(start_tracking())
                group.create_task(write())
                group.create_task(poller.run(writers_done, interval_s))
                group.create_task(report())
                group.create_task(vacuum())
                await asyncio.sleep(seconds)
                if track is not None:
                    # `exporter track` waits for the writers' open transactions, after a CLI
                    # start: on a loaded machine that can take most of `seconds`. Keep writing
                    # until a pull's cursor has seen tracking begin and the next pull used it.
                    await asyncio.wait_for(tracking_began.wait(), 120)
                    await poller.wait_for_pulls(3, 120)
                stop.set()
        finally:
            for conn in conns:
                await conn.close()
        table = await read_table(database_url, workload)
    return Outcome(
        mode=mode,
        seconds=time.monotonic() - started,
        pulls=poller.pulls,
        stats=stats,
        problems=poller.problems,
        differences=differences(mode, poller.copy, table, poller.history),
        tombstones_for_absent_ids=poller.tombstones_for_absent_ids,
    )
