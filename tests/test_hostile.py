"""Every parameter of every route is hostile (issue 5): generated requests against the real
server (`exporter serve` on a socket), checked for what must hold whatever a client sends.

For every response: no 5xx, and none slow; every 4xx is a problem+json carrying the request
id; no text of a PostgreSQL or Python error about the statement or the code reaches the
client; no key and no key digest ever appears; a request without a valid key never gets past
401; only datasets of the listing that the key may read (a second key is scoped) are listed,
described or exported, and the service's own schema (`exporter`: keys and the export log) is
never listed or read, under any spelling. Around the whole module, the database's catalog
and the fixture data are checksummed: nothing a request does may change them.

Hypothesis runs derandomized (the same examples on every run, so CI is reproducible) and
keeps no example database. EXPORTER_HOSTILE_EXAMPLES=N runs N examples per property instead,
and EXPORTER_HOSTILE_RANDOM=1 draws new ones each run, for a longer hunt by hand.
"""

import asyncio
import base64
import fnmatch
import http.client
import json
import os
import re
import time
import urllib.parse
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.access.keys import create_key
from exporter.db.pool import Pool
from tests.support.database import ExportDatabase, run_sql
from tests.support.server import Server, running_server


def hostile(examples: int) -> settings:
    # A request takes a few milliseconds; Hypothesis mutates its examples, so about half of
    # them are distinct requests: ~10 s per property on a 2-core machine.
    return settings(
        max_examples=int(os.environ.get("EXPORTER_HOSTILE_EXAMPLES", examples)),
        derandomize=os.environ.get("EXPORTER_HOSTILE_RANDOM") != "1",
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


PROBLEM = "application/problem+json"
# What uvicorn (httptools) answers itself, before the app, to a request line it cannot parse:
# a request-target of 64 KiB or more, a control character in a header value.
UVICORN_REFUSAL = b"Invalid HTTP request received."
UVICORN_MAX_TARGET = 65_000
# Per request; everything here is a small table, so only a slow path could take long.
SLOW_S = 5.0

# Text that only a PostgreSQL or Python error about the statement or the code itself would
# put in a response. Not PostgreSQL's messages about a rejected value ("invalid input syntax
# for type date"): the service returns those on purpose, naming the parameter.
LEAK_MARKERS = re.compile(
    "|".join(
        [
            r"syntax error at (?:or near|end of input)",
            r"unterminated (?:quoted|dollar-quoted)",
            r'(?:relation|column|schema|table) "[^"]*" does not exist',
            r"permission denied",
            r"current transaction is aborted",
            r"read-only transaction",
            r"SQLSTATE",
            r"asyncpg|psycopg|sqlalchemy|uvicorn\.|starlette\.|fastapi\.",
            r"Traceback \(most recent call last\)",
            r'File "[^"]*\.py"',
            # An exception's class name (its repr): UndefinedTableError, KeyError.
            r"(?-i:\b[A-Z][a-z]+(?:[A-Z][a-z]+)*(?:Error|Exception)\b)",
            r"ExceptionGroup",
        ]
    ),
    re.IGNORECASE,
)
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")

# The fuzzed table: one column of each kind of input function, so that generated filter
# values reach PostgreSQL's parsers (the value checks before the query), not only ours.
TYPES_TABLE = "hostile_types"
TYPES_SQL = [
    "CREATE TYPE public.hostile_mood AS ENUM ('sad', 'ok')",
    "CREATE DOMAIN public.hostile_positive AS integer CHECK (VALUE > 0)",
    """
    CREATE TABLE public.hostile_types (
        id integer PRIMARY KEY, i2 smallint, i8 bigint, n numeric(5,2), f4 real,
        f8 double precision, b boolean, t text, vc varchar(5), c char(2), u uuid, d date,
        tm time, ts timestamp, tz timestamptz, iv interval, j json, jb jsonb, x xml, by bytea,
        ip inet, mac macaddr, bits bit(3), m money, arr integer[], tarr text[],
        r int4range, q tsquery, v tsvector, p point, mood public.hostile_mood,
        pos public.hostile_positive
    )
    """,
    """
    INSERT INTO public.hostile_types VALUES
      (1, 1, 9007199254740993, 1.5, 1.5, 0.1, true, 'a''b"c\\d', 'short', 'ab',
       '00000000-0000-0000-0000-000000000001', '2024-02-29', '12:00', '2024-01-01 00:00',
       '2024-01-01 00:00+00', '1 day', '{"k": [1, "x"]}', '{"k": 1}', NULL, '\\x00ff',
       '10.0.0.1', '08:00:2b:01:02:03', B'101', 12.34, '{1,2}', '{a,"b,c"}', '[1,5)',
       'a & b', 'a b', '(1,2)', 'ok', 7),
      (2, NULL, NULL, NULL, 'NaN', '-Infinity', NULL, '', NULL, NULL, NULL, 'infinity', NULL,
       NULL, NULL, NULL, 'null', 'null', NULL, '', NULL, NULL, NULL, NULL, '{}', '{}',
       'empty', NULL, '', NULL, NULL, NULL)
    """,
]
TYPES_COLUMNS = [
    "id", "i2", "i8", "n", "f4", "f8", "b", "t", "vc", "c", "u", "d", "tm", "ts", "tz", "iv",
    "j", "jb", "x", "by", "ip", "mac", "bits", "m", "arr", "tarr", "r", "q", "v", "p", "mood",
    "pos",
]  # fmt: skip
# The dataset patterns of a second key, on both servers' names (bare and qualified).
SCOPE = ("people", "public.people", "sales.*", "*types")
PEOPLE_COLUMNS = ["id", "name", "age", "score", "height", "active", "born", "seen_at", "tag"]
PEOPLE_COLUMNS += ["code", "doc"]

# The service's own schema and PostgreSQL's, spelled every way a client might try.
OWN_SPELLINGS = [
    "api_keys",
    "export_log",
    "alembic_version",
    "exporter.api_keys",
    "exporter.export_log",
    "exporter.alembic_version",
    "EXPORTER.api_keys",
    "Exporter.Api_Keys",
    "API_KEYS",
    '"exporter"."api_keys"',
    '"exporter".api_keys',
    'exporter."api_keys"',
    '"exporter.api_keys"',
    "exporter..api_keys",
    ".exporter.api_keys",
    "exporter/api_keys",
    "exporter%2Eapi_keys",
    "exporter%2eapi_keys",
    "exporter\x00.api_keys",
    "exporter.api_keys\x00",
    "api_keys\x00",
    "exporter.api_keys ",
    " exporter.api_keys",
    "exporter.api_keys;",
    "exporter.api_keys--",
    "exporter\uff0eapi_keys",  # fullwidth full stop
    "exporter\u3002api_keys",
    "\uff45xporter.api_keys",
    "exporter.api\u200bkeys",
    "public.api_keys",
    "public/../exporter.api_keys",
    "../exporter.api_keys",
    "..%2Fexporter.api_keys",
    "sales.api_keys",
    "sales/../../exporter/api_keys",
    "exporter.*",
    "exporter.%",
    "exporter.api_%",
    "*api_keys*",
    "exporter.api_keys.csv",
    "exporter.api_keys.ndjson",
    "pg_catalog.pg_authid",
    "pg_authid",
    "pg_catalog.pg_shadow",
    "pg_shadow",
    "pg_catalog.pg_class",
    "pg_class",
    "information_schema.tables",
    "pg_toast.pg_toast_1260",
]

SQL_FRAGMENTS = [
    '"; DROP TABLE people; --',
    "'; DROP TABLE people; --",
    "1; DROP SCHEMA exporter CASCADE",
    "1 OR 1=1",
    "' OR '1'='1",
    "1) OR (1=1",
    "id); SELECT pg_sleep(10); --",
    "pg_sleep(10)",
    "(SELECT pg_sleep(10))",
    "1' AND pg_sleep(10) IS NULL --",
    "$$ OR true $$",
    "$1",
    "$1::text",
    "E'\\x27",
    "\\'",
    "%' OR 1=1 --",
    "(SELECT digest FROM exporter.api_keys)",
    "id FROM exporter.api_keys --",
    "name,(SELECT string_agg(encode(digest,'hex'),',') FROM exporter.api_keys)",
    "current_setting('exporter.p1')",
    "set_config('statement_timeout', '0', false)",
    "COPY people TO PROGRAM 'id'",
    "*/ DROP TABLE people /*",
    "id::text",
    'id COLLATE "C"',
    "row_to_json(t.*)",
    "t.*",
    "*",
    "ALL",
    "NULL",
    "null",
    "\\N",
    "\\.",
    "{}",
    "{{{{{{{1}}}}}}}",
    "[" * 50 + "]" * 50,
    "9" * 400,
    "1e999999",
    "-0",
    "NaN",
    "Infinity",
    "epoch",
    "now",
    "allballs",
    "J2451187",
    "2024-02-30",
    "99999-01-01",
    "2024-01-01 Mars/Olympus",
    "P1000000000000Y",
    "\\x0",
    "a &",
    "!!",
    "<a",
    "(1,2",
    "[2,1]",
    "08:00:2b",
    "$1,000,000,000,000,000,000.00",
    "../../etc/passwd",
    "..\\..\\windows",
    "%00",
    "%ff%fe",
    "%zz",
    "%",
    "\x00",
    "a\x00b",
    "\\",
    "\\\\",
    "'",
    '"',
    '""',
    "`",
    ";",
    "--",
    "/*",
    ",",
    ",,",
    "(",
    ")",
    "()",
    "in.(",
    "not.not.eq.1",
    "\r\n",
    "\t",
    "\u202eevil",
    "\ufeff",
    "\ufffd",
    "😀",
    "\U0010ffff",
    "Ａ",
    "٣",
]
SQL_FRAGMENTS += OWN_SPELLINGS

OPERATORS = ["eq", "neq", "gt", "gte", "lt", "lte", "like", "ilike", "in", "is"]
FORMAT_OPTIONS = {
    "header": ["true", "false"],
    "delimiter": [",", ";", "|", "\t", "\\t", "tab"],
    "null": ["", "NULL", "\\N", "-"],
    "bom": ["true", "false"],
    "quote": ["all", "minimal"],
    "crlf": ["true", "false"],
    "profile": ["excel"],
    "numbers": ["number", "string"],
}
MEDIA_TYPES = ["application/json", "text/csv", "application/x-ndjson", "*/*", "text/*"]
CODINGS = ["gzip", "zstd", "identity", "*", "x-gzip", "br", "deflate"]


# Strategies


def _repeat(text: str, times: int) -> str:
    return text * times


long_text = st.builds(
    _repeat,
    st.sampled_from(["a", "%", "\\", "'", '"', "é", "[", "{", ",", ".", "*", "\x00", "😀"]),
    st.integers(min_value=100, max_value=3_000),
)
special_text = st.text(
    alphabet=st.sampled_from(list("\x00\\'\"`%*.,;()[]{}$:_-=&+# \t\r\n") + ["é", "\u202e"]),
    max_size=30,
)
hostile_text = st.one_of(
    st.sampled_from(SQL_FRAGMENTS),
    st.text(max_size=40),
    special_text,
    long_text,
    st.builds(lambda a, b: a + b, st.sampled_from(SQL_FRAGMENTS), st.text(max_size=10)),
)
typed_text = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats().map(repr),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.dates().map(str),
    st.datetimes().map(str),
    st.uuids().map(str),
    st.booleans().map(str),
)
# LIKE patterns: wildcards, PostgREST's star and the escape character, where LIKE's own errors
# live (a pattern ending in its escape fails only once matching reaches it).
like_text = st.text(alphabet=st.sampled_from(list("%_*\\a")), max_size=4)
value_text = st.one_of(hostile_text, typed_text, like_text)


def mostly(
    valid: st.SearchStrategy[str], hostile: st.SearchStrategy[str]
) -> st.SearchStrategy[str]:
    """Three draws in four valid: a request must get past its first parameter for the later
    ones (and PostgreSQL) to meet hostile values at all."""
    return st.one_of(valid, valid, valid, hostile)


def quoted_list(items: Sequence[str]) -> str:
    return ",".join('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items)


@st.composite
def filters(draw: st.DrawFn, columns: Sequence[str]) -> tuple[str, str]:
    column = draw(mostly(st.sampled_from(columns), hostile_text))
    operator = draw(mostly(st.sampled_from(OPERATORS), hostile_text))
    if draw(st.booleans()):
        operator = "not." + operator
    if operator.endswith("in") and draw(st.booleans()):
        items = draw(st.lists(value_text, max_size=5))
        value = "(" + (quoted_list(items) if draw(st.booleans()) else ",".join(items)) + ")"
    elif operator.endswith("is") and draw(st.booleans()):
        value = draw(st.sampled_from(["null", "true", "false", "unknown", "NULL", "maybe"]))
    else:
        value = draw(value_text)
    return column, f"{operator}.{value}" if draw(st.integers(0, 9)) else operator + value


@st.composite
def query_params(draw: st.DrawFn, columns: Sequence[str]) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    name = mostly(st.sampled_from(columns), hostile_text)
    if draw(st.booleans()):
        names = draw(st.lists(name, max_size=4))
        select = quoted_list(names) if draw(st.booleans()) else ",".join(names)
        params.append(("select", select))
    if draw(st.booleans()):
        term = st.builds(
            lambda n, m: n + m,
            name,
            st.sampled_from(["", ".asc", ".desc", ".desc.nullsfirst", ".nullslast", ".x"]),
        )
        params.append(("order", ",".join(draw(st.lists(term, min_size=1, max_size=3)))))
    # Mostly a small valid limit, so that an export that succeeds stays small.
    limit = draw(mostly(st.integers(0, 3).map(str), hostile_text))
    params.append(("limit", limit))
    params += draw(st.lists(filters(columns), max_size=4))
    for option in draw(st.lists(st.sampled_from(sorted(FORMAT_OPTIONS)), max_size=3)):
        params.append((option, draw(mostly(st.sampled_from(FORMAT_OPTIONS[option]), hostile_text))))
    if params and draw(st.integers(0, 9)) == 0:
        params.append(draw(st.sampled_from(params)))  # a parameter given twice
    return draw(st.permutations(params))


# Raw pieces of a query string: malformed percent-escapes, empty and odd pairs.
RAW_QUERY_JUNK = ["%", "%zz", "%E2%82", "%C0%80", "%ED%A0%80", "=", "==", "&", "a=%", "%00=%00"]
RAW_QUERY_JUNK += ["select=%FF", "+", ";", "a;b=c", "%2526", "limit=1&limit=2"]


def header_value(text: str) -> bytes:
    """What HTTP lets a header value hold (no control characters but tab, no leading or
    trailing whitespace): otherwise uvicorn refuses the request before the app sees it."""
    raw = text.encode("utf-8", "replace")
    raw = bytes(b for b in raw if b == 9 or 32 <= b < 127 or b >= 128)
    return raw.strip(b" \t")


@st.composite
def accept_headers(draw: st.DrawFn, choices: Sequence[str]) -> bytes:
    items = draw(
        st.lists(
            st.one_of(
                st.builds(
                    lambda m, q: m + q,
                    st.sampled_from(choices),
                    st.sampled_from(
                        ["", ";q=0", ";q=0.5", ";q=1", ";q=nan", ";q=inf", ";q=-1", ";q=1e9"]
                        + [";q=", ";q=0.0001", ";level=1", ";q=0.5;q=0"]
                    ),
                ),
                hostile_text,
            ),
            max_size=4,
        )
    )
    return header_value(", ".join(items))


@dataclass(frozen=True)
class Target:
    """A server of this module and what it should serve."""

    server: Server
    datasets: frozenset[str]  # as listed at the start
    people: str  # the names of the fixture datasets on this server
    types: str

    def __repr__(self) -> str:
        return f"Target({self.server.base_url})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Short, in Hypothesis's report of a failing example.
        printer.text(repr(self))


@dataclass(frozen=True)
class Context:
    targets: list[Target]
    key: str
    scoped_key: str  # reaches SCOPE only
    secrets: list[str]  # the keys and every key digest, in the forms a leak might take

    def __repr__(self) -> str:
        return f"Context({self.targets})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


@dataclass
class Request:
    target: str
    headers: list[tuple[str, bytes]]
    authorized: bool  # the Authorization header carries a key, in a form that is accepted
    route: str
    dataset: str | None = None
    request_id: bytes | None = None
    scope: tuple[str, ...] = ("*",)  # the dataset patterns of the key sent

    def may_read(self, dataset: str) -> bool:
        return any(fnmatch.fnmatchcase(dataset, pattern) for pattern in self.scope)


def encode(text: str) -> str:
    return urllib.parse.quote(text, safe="")


@st.composite
def requests(draw: st.DrawFn, target: Target, context: Context) -> Request:
    # Mostly the routes that read data.
    route = draw(st.sampled_from(["describe", "csv", "ndjson"] * 2 + ["list", "healthz", "readyz"]))
    # The fixture's datasets but its large ones (which a request with a hostile limit would
    # export whole), the fuzzed tables twice as likely.
    known = [target.people, target.types]
    known += sorted(n for n in target.datasets if "big" not in n and "small_copy" not in n)
    dataset = draw(
        mostly(st.sampled_from(known), st.one_of(st.sampled_from(OWN_SPELLINGS), hostile_text))
    )
    columns = TYPES_COLUMNS if dataset == target.types else PEOPLE_COLUMNS
    params = draw(query_params(columns))
    pairs = [f"{encode(k)}={encode(v)}" for k, v in params]
    if draw(st.integers(0, 4)) == 0:
        junk = draw(st.lists(st.sampled_from(RAW_QUERY_JUNK), min_size=1, max_size=3))
        pairs = draw(st.permutations(pairs + junk))
    path = {
        "list": "/datasets",
        "describe": f"/datasets/{encode(dataset)}",
        "csv": f"/datasets/{encode(dataset)}.csv",
        "ndjson": f"/datasets/{encode(dataset)}.ndjson",
        "healthz": "/healthz",
        "readyz": "/readyz",
    }[route]
    url = path + ("?" + "&".join(pairs) if pairs else "")

    headers: list[tuple[str, bytes]] = []
    key = context.key
    auth = draw(
        st.sampled_from(["key"] * 5 + ["scoped"] * 2 + ["bearer", "none", "hostile", "near"])
    )
    authorized = auth in ("key", "scoped", "bearer")
    scope: tuple[str, ...] = ("*",)
    if auth == "key":
        headers.append(("Authorization", f"Bearer {key}".encode()))
    elif auth == "scoped":
        headers.append(("Authorization", f"Bearer {context.scoped_key}".encode()))
        scope = SCOPE
    elif auth == "bearer":
        headers.append(
            ("Authorization", f"{draw(st.sampled_from(['bearer', 'BEARER']))} {key}".encode())
        )
    elif auth == "hostile":
        headers.append(("Authorization", header_value(draw(hostile_text))))
    elif auth == "near":
        # Almost the key: a prefix, a suffix, another case, another scheme, padding.
        near = draw(
            st.sampled_from(
                [key[:-1], key + "x", key.upper(), key.swapcase(), f"{key} {key}", key[4:]]
            )
        )
        scheme = draw(st.sampled_from(["Bearer ", "Bearer  ", "Token ", "Bearer\t", ""]))
        if draw(st.booleans()):
            headers.append(("Authorization", (scheme + near).encode()))
        else:
            basic = base64.b64encode(f"{draw(st.sampled_from([key, near]))}:".encode())
            headers.append(("Authorization", b"Basic " + basic))
    if draw(st.booleans()):
        headers.append(("Accept", draw(accept_headers(MEDIA_TYPES))))
    if draw(st.booleans()):
        headers.append(("Accept-Encoding", draw(accept_headers(CODINGS))))
    request_id = None
    if draw(st.booleans()):
        request_id = draw(
            st.one_of(
                st.from_regex(REQUEST_ID.pattern.decode(), fullmatch=True).map(str.encode),
                hostile_text.map(header_value),
            )
        )
        headers.append(("X-Request-Id", request_id))
    # What uvicorn reads itself: X-Forwarded-* (trusted from 127.0.0.1 by default, so the
    # export log's client address is whatever they say) and Host (the slash redirect's).
    for name in ("X-Forwarded-For", "X-Forwarded-Proto", "Host"):
        if draw(st.integers(0, 5)) == 0:
            headers.append((name, header_value(draw(hostile_text))))
    return Request(url, headers, authorized, route, dataset, request_id, scope)


# The client


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def send(
    server: Server, target: str, headers: Sequence[tuple[str, bytes]], method: str = "GET"
) -> Reply:
    """A request through http.client: httpx normalises URLs and refuses long ones, and this
    must send exactly the bytes a hostile client would."""
    address = urllib.parse.urlsplit(server.base_url)
    assert address.hostname is not None and address.port is not None
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    started = time.monotonic()
    try:
        skip_host = any(name.lower() == "host" for name, _ in headers)
        connection.putrequest(method, target, skip_host=skip_host, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        # An export broken off midway raises IncompleteRead here: a failure, as it should be.
        body = response.read()
        elapsed = time.monotonic() - started
        reply_headers: dict[str, str] = {}
        for field_name, field_value in response.getheaders():
            reply_headers.setdefault(field_name.lower(), field_value)
        return Reply(response.status, reply_headers, body, elapsed)
    finally:
        connection.close()


def decoded(reply: Reply) -> bytes:
    coding = reply.headers.get("content-encoding")
    if coding == "gzip":
        inflate = zlib.decompressobj(wbits=31)
        data = inflate.decompress(reply.body)
        assert inflate.eof, "gzip stream without its end"
        return data
    if coding == "zstd":
        result: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(reply.body)
        return result
    assert coding is None, coding
    return reply.body


def secrets_of(database: ExportDatabase, *keys: str) -> list[str]:
    """Every key digest, in each form a leak might take, and the keys themselves."""
    rows = run_sql(database.url, "SELECT digest FROM exporter.api_keys")
    forms = list(keys)
    for row in rows:
        digest = bytes(row["digest"])
        forms += [
            digest.hex(),
            digest.hex().upper(),
            base64.b64encode(digest).decode(),
            base64.urlsafe_b64encode(digest).decode().rstrip("="),
        ]
    return forms


def check(reply: Reply, request: Request, target: Target, secrets: Sequence[str]) -> None:
    """What holds for every response to every request."""
    context = f"{request.target[:300]!r} {request.headers!r:.300} -> {reply.status}"
    assert reply.status < 500, f"{context}: {reply.text()[:1000]}"
    assert reply.elapsed < SLOW_S, f"{context}: took {reply.elapsed:.1f} s"
    if reply.body == UVICORN_REFUSAL:
        # Only a request HTTP itself forbids may be refused before the app.
        assert reply.status == 400 and len(request.target) > UVICORN_MAX_TARGET, context
        return
    # Every response of the app: a request id (the client's, if well-formed) and the
    # security headers.
    response_id = reply.headers.get("x-request-id", "")
    if request.request_id is not None and REQUEST_ID.fullmatch(request.request_id):
        assert response_id == request.request_id.decode(), context
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", response_id), context
    assert reply.headers.get("x-content-type-options") == "nosniff", context

    body = decoded(reply)
    text = body.decode("utf-8", "replace")
    leak = LEAK_MARKERS.search(text) or LEAK_MARKERS.search(json.dumps(reply.headers))
    assert leak is None, f"{context}: {leak.group(0)!r} in {text[:1000]!r}"
    for secret in secrets:
        assert secret not in text, f"{context}: a key or key digest in the response"

    if 400 <= reply.status < 500:
        assert reply.headers.get("content-type") == PROBLEM, f"{context}: {text[:500]}"
        problem = json.loads(body)
        assert problem["status"] == reply.status and problem["title"], context
        assert problem["request_id"] == response_id, context

    if request.route in ("healthz", "readyz"):
        # No key needed, nothing to refuse but what the header limits refuse.
        assert reply.status in (200, 400, 431), context
        return
    if not request.authorized:
        # Refused for the key, unless the path routes nowhere (a name holding a slash, or
        # none: /datasets/ redirects to /datasets).
        refusals = {401, 400, 431}
        if request.dataset is not None and ("/" in request.dataset or not request.dataset):
            refusals |= {404, 307}
        assert reply.status in refusals, f"{context}: {text[:300]}"
    # Only the datasets of the listing that the key may read are listed, described or exported.
    readable = {d for d in target.datasets if request.may_read(d)}
    if reply.status == 200 and request.route == "list":
        assert {d["name"] for d in json.loads(body)} == readable, context
    elif reply.status == 200:
        assert request.dataset in readable, context


# Fixtures


@pytest.fixture(scope="module")
def types_table(database: ExportDatabase) -> Iterator[None]:
    run_sql(database.url, *TYPES_SQL)
    try:
        yield
    finally:
        run_sql(
            database.url,
            "DROP TABLE public.hostile_types",
            "DROP TYPE public.hostile_mood",
            "DROP DOMAIN public.hostile_positive",
        )


@pytest.fixture(scope="module")
def qualified_server(
    database: ExportDatabase, types_table: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A second server, configured as carelessly as possible: the own schema listed among the
    exposed ones (it must stay hidden), names qualified by schema; and rows read through a
    server-side cursor instead of COPY, so that both read paths meet the generated requests."""
    with running_server(
        database.url,
        tmp_path_factory.mktemp("hostile"),
        schemas="public,sales,exporter",
        use_copy="false",
    ) as running:
        yield running


def listed(server: Server, key: str) -> frozenset[str]:
    reply = send(server, "/datasets", [("Authorization", f"Bearer {key}".encode())])
    assert reply.status == 200, reply.body[:500]
    return frozenset(d["name"] for d in json.loads(reply.body))


@pytest.fixture(scope="module")
def targets(
    server: Server, qualified_server: Server, database: ExportDatabase, types_table: None
) -> list[Target]:
    return [
        Target(server, listed(server, database.key), "people", TYPES_TABLE),
        Target(
            qualified_server,
            listed(qualified_server, database.key),
            "public.people",
            f"public.{TYPES_TABLE}",
        ),
    ]


# The database's catalog (what defines objects, privileges and settings, not statistics)
# and the rows of the fixture tables. Roles and databases are cluster-wide, and other test
# runs may share the server: only this database's row and the roles that existed before
# are compared.
CATALOG_SQL = """
SELECT md5(string_agg(line, E'\\n' ORDER BY line)) AS checksum FROM (
    SELECT concat_ws(' ', 'class', oid, relname, relnamespace, relkind, relowner,
                     relacl::text, relrowsecurity, relforcerowsecurity)
    FROM pg_catalog.pg_class
    UNION ALL
    SELECT concat_ws(' ', 'attribute', attrelid, attnum, attname, atttypid, attnotnull,
                     attisdropped, attacl::text)
    FROM pg_catalog.pg_attribute
    UNION ALL
    SELECT concat_ws(' ', 'proc', oid, proname, pronamespace, md5(prosrc), prosecdef,
                     proacl::text)
    FROM pg_catalog.pg_proc
    UNION ALL
    SELECT concat_ws(' ', 'namespace', oid, nspname, nspowner, nspacl::text)
    FROM pg_catalog.pg_namespace
    UNION ALL
    SELECT concat_ws(' ', 'type', oid, typname, typnamespace, typowner, typacl::text)
    FROM pg_catalog.pg_type
    UNION ALL
    SELECT concat_ws(' ', 'constraint', oid, conname, conrelid, contypid,
                     pg_catalog.pg_get_constraintdef(oid))
    FROM pg_catalog.pg_constraint
    UNION ALL
    SELECT concat_ws(' ', 'default', oid, adrelid, adnum, md5(adbin::text))
    FROM pg_catalog.pg_attrdef
    UNION ALL
    SELECT concat_ws(' ', 'trigger', oid, tgname, tgrelid, tgenabled, tgfoid)
    FROM pg_catalog.pg_trigger
    UNION ALL
    SELECT concat_ws(' ', 'rule', oid, rulename, ev_class, md5(ev_action::text))
    FROM pg_catalog.pg_rewrite
    UNION ALL
    SELECT concat_ws(' ', 'policy', oid, polname, polrelid, polcmd, polqual::text)
    FROM pg_catalog.pg_policy
    UNION ALL
    SELECT concat_ws(' ', 'extension', extname, extversion) FROM pg_catalog.pg_extension
    UNION ALL
    SELECT concat_ws(' ', 'event trigger', evtname, evtenabled)
    FROM pg_catalog.pg_event_trigger
    UNION ALL
    SELECT concat_ws(' ', 'large object', oid) FROM pg_catalog.pg_largeobject_metadata
    UNION ALL
    SELECT concat_ws(' ', 'default acl', oid, defaclrole, defaclobjtype, defaclacl::text)
    FROM pg_catalog.pg_default_acl
    UNION ALL
    SELECT concat_ws(' ', 'database', datname, datdba, datacl::text, datallowconn,
                     datconnlimit)
    FROM pg_catalog.pg_database WHERE datname = current_database()
    UNION ALL
    SELECT concat_ws(' ', 'setting', setrole, setconfig::text)
    FROM pg_catalog.pg_db_role_setting s JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase
    WHERE d.datname = current_database()
) AS catalog(line)
"""
DATA_SQL = """
SELECT (SELECT md5(string_agg(t::text, E'\\n' ORDER BY t::text)) FROM public.people t)
           AS people,
       (SELECT md5(string_agg(t::text, E'\\n' ORDER BY t::text)) FROM sales.orders t)
           AS orders,
       (SELECT md5(string_agg(t::text, E'\\n' ORDER BY t::text)) FROM public.hostile_types t)
           AS types,
       (SELECT md5(string_agg(t::text, E'\\n' ORDER BY t::text)) FROM exporter.api_keys t)
           AS api_keys,
       (SELECT count(*) FROM public.big) AS big,
       (SELECT count(*) FROM public.small_copy) AS small_copy
"""


def roles_sql(database: ExportDatabase) -> str:
    # pg_authid (with the password hash) where this user may read it, else pg_roles.
    readable = run_sql(
        database.url, "SELECT has_table_privilege('pg_catalog.pg_authid', 'SELECT') AS ok"
    )[0]["ok"]
    table, password = ("pg_authid", "rolpassword") if readable else ("pg_roles", "NULL")
    return (
        f"SELECT oid, concat_ws(' ', rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb,"
        f" rolcanlogin, rolreplication, rolbypassrls, rolconnlimit, {password}, rolvaliduntil)"
        f" AS line FROM pg_catalog.{table}"
    )


def snapshot(database: ExportDatabase, roles: str) -> dict[str, Any]:
    state = dict(run_sql(database.url, DATA_SQL)[0])
    state["catalog"] = run_sql(database.url, CATALOG_SQL)[0]["checksum"]
    state["roles"] = {row["oid"]: row["line"] for row in run_sql(database.url, roles)}
    state["members"] = sorted(
        tuple(r.values())
        for r in run_sql(database.url, "SELECT roleid, member FROM pg_catalog.pg_auth_members")
    )
    return state


@pytest.fixture(scope="module", autouse=True)
def nothing_changes(database: ExportDatabase, context: Context) -> Iterator[None]:
    """Whatever the module's requests did, the catalog and the data are as they were."""
    roles = roles_sql(database)
    before = snapshot(database, roles)
    yield
    after = snapshot(database, roles)
    # Roles other runs create or drop meanwhile are theirs: compare the roles that exist in
    # both, and memberships among roles that existed before.
    for state in (before, after):
        state["roles"] = {
            oid: line
            for oid, line in state["roles"].items()
            if oid in before["roles"] and oid in after["roles"]
        }
        state["members"] = [
            m for m in state["members"] if m[0] in before["roles"] and m[1] in before["roles"]
        ]
    assert after == before


@pytest.fixture(scope="module")
def context(targets: list[Target], database: ExportDatabase) -> Iterator[Context]:
    async def make_key() -> str:
        pool = await Pool.open(database.url, size=1)
        try:
            return await create_key(pool, "hostile-scoped", SCOPE)
        finally:
            await pool.close()

    scoped_key = asyncio.run(make_key())
    try:
        secrets = secrets_of(database, database.key, scoped_key)
        yield Context(targets, database.key, scoped_key, secrets)
    finally:
        run_sql(database.url, "DELETE FROM exporter.api_keys WHERE name = 'hostile-scoped'")


# The properties


@hostile(1_000)
@given(data=st.data())
def test_every_route_survives_hostile_requests(data: st.DataObject, context: Context) -> None:
    target = data.draw(st.sampled_from(context.targets), label="server")
    request = data.draw(requests(target, context), label="request")
    reply = send(target.server, request.target, request.headers)
    check(reply, request, target, context.secrets)


@hostile(600)
@given(data=st.data())
def test_hostile_filter_values_reach_every_input_function(
    data: st.DataObject, context: Context
) -> None:
    """Valid names and operators, generated values: every column type's input function (and
    the checks before it) meets them. A value is either a 400 naming its filter or an export."""
    target = data.draw(st.sampled_from(context.targets), label="server")
    column = data.draw(st.sampled_from(TYPES_COLUMNS[1:]), label="column")
    operator = data.draw(st.sampled_from(OPERATORS), label="operator")
    negated = data.draw(st.booleans(), label="not")
    if operator == "in":
        items = data.draw(st.lists(value_text, max_size=4), label="items")
        value = "(" + quoted_list(items) + ")"
    elif operator in ("like", "ilike") and data.draw(st.booleans(), label="pattern"):
        value = data.draw(like_text, label="value")
    else:
        value = data.draw(value_text, label="value")
    expression = ("not." if negated else "") + f"{operator}.{value}"
    extension = data.draw(st.sampled_from(["csv", "ndjson"]), label="format")
    params = [("select", "id"), ("limit", "3"), (column, expression)]
    if extension == "csv" and data.draw(st.booleans(), label="excel"):
        params.append(("profile", "excel"))  # the CSV rendered in SQL, through a cursor
    url = f"/datasets/{encode(target.types)}.{extension}?" + urllib.parse.urlencode(params)
    request = Request(
        url,
        [("Authorization", f"Bearer {context.key}".encode())],
        authorized=True,
        route=extension,
        dataset=target.types,
    )
    reply = send(target.server, url, request.headers)
    check(reply, request, target, context.secrets)
    assert reply.status in (200, 400), reply.text()[:500]
    if reply.status == 400:
        names = [p["name"] for p in json.loads(reply.body)["invalid-params"]]
        assert column in names, reply.text()[:500]


def test_fixture_datasets_are_what_the_properties_expect(context: Context) -> None:
    # Guards the properties above: they only mean something if the exports can succeed, and
    # if the scoped key reaches some datasets and not others.
    first, second = context.targets
    assert {first.people, first.types} <= first.datasets
    assert {second.people, second.types, "sales.orders"} <= second.datasets
    assert listed(first.server, context.scoped_key) == {"people", "hostile_types"}
    scoped = {"public.people", "public.hostile_types", "sales.orders"}
    assert listed(second.server, context.scoped_key) == scoped


# The own schema


@pytest.mark.parametrize("spelling", OWN_SPELLINGS)
def test_own_schema_is_never_reachable(spelling: str, context: Context) -> None:
    auth = [("Authorization", f"Bearer {context.key}".encode())]
    for target in context.targets:
        for route, suffix, accept in [
            ("describe", "", None),
            ("describe", "", b"text/csv"),
            ("describe", "", b"application/x-ndjson"),
            ("csv", ".csv", None),
            ("ndjson", ".ndjson", None),
        ]:
            headers = auth + ([("Accept", accept)] if accept else [])
            url = f"/datasets/{encode(spelling)}{suffix}"
            request = Request(url, headers, True, route, spelling)
            reply = send(target.server, url, headers)
            check(reply, request, target, context.secrets)
            assert reply.status == 404, (target.server.base_url, url, reply.text()[:300])
            # Not even unencoded, as a client that does not percent-encode would send it.
            raw = "/datasets/" + urllib.parse.quote(spelling, safe="/.%*\"';") + suffix
            reply = send(target.server, raw, headers)
            assert reply.status in (400, 404), (raw, reply.status)


def test_listings_never_show_the_own_schema(
    targets: list[Target], database: ExportDatabase
) -> None:
    own = {
        row["relname"]
        for row in run_sql(
            database.url,
            "SELECT c.relname FROM pg_catalog.pg_class c"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'exporter'",
        )
    }
    assert {"api_keys", "export_log"} <= own
    # With one schema, names are bare relation names; none of the own schema's appear.
    assert not own & targets[0].datasets
    # With several (the own one among them, by mistake), none is of the own schema.
    assert not any(name.startswith("exporter.") for name in targets[1].datasets)
    assert not {name.partition(".")[2] for name in targets[1].datasets} & own


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "HEAD"])
def test_other_methods_are_405(method: str, context: Context) -> None:
    auth = [("Authorization", f"Bearer {context.key}".encode())]
    target = context.targets[0]
    for path in [
        "/datasets",
        "/datasets/people",
        "/datasets/people.csv",
        "/datasets/exporter.api_keys.ndjson",
        "/healthz",
        "/readyz",
    ]:
        reply = send(target.server, path, auth, method)
        assert reply.status == 405, (method, path, reply.body[:200])
        assert reply.headers["content-type"] == PROBLEM
        if method != "HEAD":
            check(reply, Request(path, auth, True, "method"), target, context.secrets)


# Oversized requests: each refused at once, never a 500, never a slow query.


def auth_headers(database: ExportDatabase) -> list[tuple[str, bytes]]:
    return [("Authorization", f"Bearer {database.key}".encode())]


def refused_quickly(reply: Reply, *statuses: int) -> Reply:
    assert reply.status in statuses, (reply.status, reply.body[:300])
    assert reply.elapsed < 2, reply.elapsed
    return reply


def test_oversized_query_parameters(server: Server, database: ExportDatabase) -> None:
    headers = auth_headers(database)
    # A 100 KB select: past uvicorn's request-target limit (httptools parses URLs with 16-bit
    # offsets), refused before the app, as text/plain.
    reply = refused_quickly(
        send(server, "/datasets/people.csv?select=" + "a" * 100_000, headers), 400
    )
    assert reply.body == UVICORN_REFUSAL
    # Under that limit, the app's own bound on a value: a problem naming the parameter, and
    # the oversized value not echoed back whole.
    reply = refused_quickly(
        send(server, "/datasets/people.csv?select=" + "a" * 60_000, headers), 400
    )
    assert json.loads(reply.body)["invalid-params"][0]["name"] == "select"
    assert len(reply.body) < 2_000
    # Ten thousand filters: as many as fit under the target limit reach the app, which counts
    # the parameters before anything else; more are uvicorn's.
    short = "/datasets/people.csv?" + "&".join(["id=1"] * 10_000)
    reply = refused_quickly(send(server, short, headers), 400)
    assert json.loads(reply.body)["invalid-params"][0]["name"] == "query"
    long = "/datasets/people.csv?" + "&".join(f"age=gt.{i}" for i in range(10_000))
    assert refused_quickly(send(server, long, headers), 400).body == UVICORN_REFUSAL


def test_oversized_names_and_urls(server: Server, database: ExportDatabase) -> None:
    headers = auth_headers(database)
    for name in ("a" * 10_000, "é" * 5_000, "exporter.api_keys" * 3_000):
        reply = refused_quickly(send(server, f"/datasets/{encode(name)}.csv", headers), 404)
        assert reply.headers["content-type"] == PROBLEM
    for length in (100_000, 1_000_000):
        reply = send(server, "/datasets/people.csv?" + "x" * length, headers)
        assert refused_quickly(reply, 400).body == UVICORN_REFUSAL
        reply = send(server, "/datasets/" + "a" * length, headers)
        assert refused_quickly(reply, 400).body == UVICORN_REFUSAL


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("X-Filler", 1_000_000),
        ("Authorization", 1_000_000),
        ("Accept", 1_000_000),
        ("Accept-Encoding", 1_000_000),
        ("X-Request-Id", 1_000_000),
        ("X-Filler", 40_000),
    ],
)
def test_oversized_headers_are_431(
    server: Server, database: ExportDatabase, name: str, size: int
) -> None:
    # uvicorn's httptools parser bounds no header: a 30 MB one reached the app, which now
    # refuses more than 32 KiB of header fields before it looks at any of them.
    headers = [(name, b"a" * size)]
    if name != "Authorization":
        headers = auth_headers(database) + headers
    for path in ("/datasets/people.csv", "/datasets", "/healthz"):
        reply = refused_quickly(send(server, path, headers), 431)
        assert reply.headers["content-type"] == PROBLEM
        assert re.fullmatch(r"[0-9a-f]{32}", reply.headers["x-request-id"])
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert json.loads(reply.body)["title"] == "Request Header Fields Too Large"


def test_header_limits(server: Server, database: ExportDatabase) -> None:
    headers = auth_headers(database)
    # Up to the limits, a request is served.
    filler = [(f"X-Filler-{i}", b"a" * 300) for i in range(90)]
    assert send(server, "/datasets/people.csv?limit=1", headers + filler).status == 200
    for count in (101, 100_000):
        many = [(f"X-Filler-{i}", b"a") for i in range(count)]
        reply = refused_quickly(send(server, "/datasets/people.csv", headers + many), 431)
        assert "header fields" in json.loads(reply.body)["detail"]
    # Two Authorization fields: which one a proxy in front checked is anyone's guess.
    for second in (headers[0][1], b"Bearer exp_other"):
        reply = send(server, "/datasets/people.csv", headers + [("Authorization", second)])
        assert refused_quickly(reply, 400).headers["content-type"] == PROBLEM
