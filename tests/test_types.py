"""Fidelity: one column of every type the README's type map names, rows of adversarial values;
CSV loads back with COPY FROM and equals COPY's own output; NDJSON parses strictly and loads
back with jsonb_populate_record. Both read paths (COPY and cursor) through a real server."""

import asyncio
import base64
import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support.app import in_process_app
from tests.support.database import (
    ExportDatabase,
    asyncpg_dsn,
    create_case_insensitive_collation,
    run_sql,
)
from tests.support.server import Server

COLUMNS_SQL = """
    id integer PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint, num numeric, num30 numeric(61,30),
    r4 real, r8 double precision, b boolean, t text, vc varchar(20), c char(5),
    en fidelity_mood, j json, jb jsonb, ia integer[], ia2 integer[], ta text[], ba bytea,
    u uuid, ip inet, cid cidr, mac macaddr, m money, iv interval, rng int4range,
    comp fidelity_pair, dom fidelity_positive, d date, ts timestamp, tstz timestamptz,
    tm time, tmtz timetz
"""

SETUP_SQL = [
    "CREATE TYPE fidelity_mood AS ENUM ('sad', 'ok', 'happy \"quoted\"')",
    "CREATE TYPE fidelity_pair AS (a integer, b text)",
    "CREATE DOMAIN fidelity_positive AS numeric CHECK (VALUE > 0)",
    f"CREATE TABLE fidelity ({COLUMNS_SQL})",
    # 1: every value NULL
    "INSERT INTO fidelity (id) VALUES (1)",
    # 2: zeros and empties
    """INSERT INTO fidelity VALUES (2, 0, 0, 0, 0, 0, 0, 0, false, '', '', '', 'sad', '{}', '{}',
        '{}', '{}', '{}', '', '00000000-0000-0000-0000-000000000000', '0.0.0.0', '0.0.0.0/0',
        '00:00:00:00:00:00', 0, '0', 'empty', '(,)', 1, '2000-01-01', '2000-01-01',
        '2000-01-01 00:00+00', '00:00', '00:00+00')""",
    # 3: quotes, delimiters, line breaks, \\N, a lone backslash, astral Unicode, nesting
    r"""INSERT INTO fidelity VALUES (3, 1, 2, 3, 1.50, 2.5, 1.5, 0.1, true,
        E'say "hi", a,b;c|d\ttab\nLF\r\nCRLF  ', '\N', '\', 'happy "quoted"',
        E'{\n  "k": [1, 2.50, "x\\ny"],\n  "n": null\n}',
        '{"a": {"b": [1, "\u00e9\ud83d\ude00"]}, "s": "line\nbreak", "q": "\"\\"}',
        '{1,NULL,3}', '{{1,2},{3,NULL}}', '{NULL,"a\"b","c,d","",NULL,"😀 é"}',
        '\x00ff0a0d22', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2001:db8::1/64',
        '10.0.0.0/8', '08:00:2b:01:02:03', -1234.56, '-1 days +02:03:04.5', '[1,5)',
        '(1,"a ""b"", c")', 1.5, '2024-02-29', '2024-02-29 13:14:15.123456',
        '2024-02-29 13:14:15.123456+05:30', '13:14:15.123456', '13:14:15+05:30')""",
    # 4: the edges of the numbers, and infinities
    """INSERT INTO fidelity (id, i2, i4, i8, num, num30, r4, r8, t, d, ts, tstz, tm, tmtz)
        VALUES (4, -32768, 2147483647, 9223372036854775807, 'NaN',
        '123456789012345678901234567890.123456789012345678901234567890', 'Infinity', '-0',
        ' leading and trailing ', 'infinity', '-infinity', 'infinity', '24:00:00',
        '23:59:59.999999-12:00')""",
    """INSERT INTO fidelity (id, i8, num, num30, r4, r8, ba, d, m, iv)
        VALUES (5, -9223372036854775808, 'Infinity', '-0.000000000000000000000000000001',
        3.4028235e38, 5e-324, decode(repeat('ab', 100), 'hex'), '0044-03-15 BC', 0.01,
        '1 year 2 mons 3 days 04:05:06.789')""",
    """INSERT INTO fidelity (id, num, r8, i4, t, vc, c, ta)
        VALUES (6, -1.5, -1.5, -1, '@SUM(A1)', '+1', ' =x', '{"=1"}')""",
    r"""INSERT INTO fidelity (id, t, vc, c) VALUES (7, E'\t=tab', '-2', '=')""",
    "INSERT INTO fidelity (id, r8, num) VALUES (8, 'NaN', '-Infinity')",
]

ROWS = 8


@pytest.fixture(scope="module")
def fidelity(database: ExportDatabase) -> Iterator[ExportDatabase]:
    run_sql(database.url, *SETUP_SQL)
    try:
        yield database
    finally:
        run_sql(
            database.url,
            "DROP TABLE IF EXISTS fidelity, fidelity_back",
            "DROP DOMAIN fidelity_positive",
            "DROP TYPE fidelity_pair, fidelity_mood",
        )


@pytest.fixture(scope="module", params=["copy", "cursor"])
def path_client(
    fidelity: ExportDatabase,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[httpx.Client]:
    """The fidelity database's exports, read through COPY and through a server-side cursor
    (values only: the app runs in the test's process)."""
    use_copy = "true" if request.param == "copy" else "false"
    with in_process_app(
        fidelity.url, tmp_path_factory.mktemp("types"), fidelity.key, use_copy=use_copy
    ) as client:
        yield client


def export(client: httpx.Client, fmt: str, **params: str) -> bytes:
    response = client.get(f"/datasets/fidelity.{fmt}", params=params)
    assert response.status_code == 200, response.text
    return response.content


def copy_out(url: str, sql: str, **options: Any) -> bytes:
    async def run() -> bytes:
        connection = await asyncpg.connect(asyncpg_dsn(url))
        try:
            chunks: list[bytes] = []

            async def sink(data: bytes) -> None:
                chunks.append(data)

            await connection.copy_from_query(sql, output=sink, **options)
            return b"".join(chunks)
        finally:
            await connection.close()

    return asyncio.run(run())


def copy_in(url: str, table: str, data: bytes, **options: Any) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await connection.copy_to_table(table, source=io.BytesIO(data), **options)
        finally:
            await connection.close()

    asyncio.run(run())


def fresh_back_table(url: str) -> None:
    run_sql(
        url,
        "DROP TABLE IF EXISTS fidelity_back",
        f"CREATE TABLE fidelity_back ({COLUMNS_SQL})",
    )


def differing_columns(url: str) -> dict[str, int]:
    """Columns whose values differ between fidelity and fidelity_back, by id (json compared
    as jsonb: its whitespace is not data)."""
    columns = [
        row["attname"]
        for row in run_sql(
            url,
            "SELECT attname FROM pg_attribute WHERE attrelid = 'fidelity'::regclass"
            " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        )
    ]
    checks = ", ".join(
        f"count(*) FILTER (WHERE a.{c}{'::jsonb' if c == 'j' else ''}::text"
        f" IS DISTINCT FROM b.{c}{'::jsonb' if c == 'j' else ''}::text) AS {c}"
        for c in columns
    )
    row = run_sql(
        url,
        f"SELECT count(b.id) AS matched, {checks}"
        " FROM fidelity a LEFT JOIN fidelity_back b USING (id)",
    )[0]
    assert row["matched"] == ROWS
    return {c: row[c] for c in columns if row[c]}


# CSV


def test_csv_is_byte_for_byte_what_copy_writes(
    fidelity: ExportDatabase, path_client: httpx.Client
) -> None:
    ours = export(path_client, "csv", order="id")
    theirs = copy_out(fidelity.url, "SELECT * FROM fidelity ORDER BY id", format="csv", header=True)
    assert ours == theirs


@pytest.mark.parametrize(
    ("params", "copy_options"),
    [
        ({"header": "false"}, {"header": False}),
        ({"delimiter": ";"}, {"header": True, "delimiter": ";"}),
        ({"delimiter": "\t", "null": "\\N"}, {"header": True, "delimiter": "\t", "null": "\\N"}),
        ({"delimiter": "|", "null": "NULL"}, {"header": True, "delimiter": "|", "null": "NULL"}),
        ({"quote": "all"}, {"header": True, "force_quote": True}),
        ({"null": "1"}, {"header": True, "null": "1"}),
        ({"null": "it's \\"}, {"header": True, "null": "it's \\"}),
    ],
)
def test_csv_options_write_what_copy_writes_with_them(
    fidelity: ExportDatabase,
    path_client: httpx.Client,
    params: dict[str, str],
    copy_options: dict[str, Any],
) -> None:
    ours = export(path_client, "csv", order="id", **params)
    theirs = copy_out(
        fidelity.url, "SELECT * FROM fidelity ORDER BY id", format="csv", **copy_options
    )
    assert ours == theirs


def test_csv_loads_back_identical_with_copy_from(
    fidelity: ExportDatabase, path_client: httpx.Client
) -> None:
    fresh_back_table(fidelity.url)
    copy_in(
        fidelity.url,
        "fidelity_back",
        export(path_client, "csv"),
        format="csv",
        header=True,
    )
    assert differing_columns(fidelity.url) == {}


def _records_with_crlf(lf_text: str) -> str:
    """COPY's output with each record's line end made CRLF, line breaks inside quoted fields
    kept as they are."""
    out = []
    quoted = False
    for char in lf_text:
        if char == '"':
            quoted = not quoted
        if char == "\n" and not quoted:
            out.append("\r\n")
        else:
            out.append(char)
    return "".join(out)


def test_crlf_ends_records_only(fidelity: ExportDatabase, path_client: httpx.Client) -> None:
    ours = export(path_client, "csv", order="id", crlf="true").decode()
    theirs = copy_out(fidelity.url, "SELECT * FROM fidelity ORDER BY id", format="csv", header=True)
    assert ours == _records_with_crlf(theirs.decode())
    # Loads back exactly: the line breaks inside values are the values' own.
    fresh_back_table(fidelity.url)
    copy_in(fidelity.url, "fidelity_back", ours.encode(), format="csv", header=True)
    assert differing_columns(fidelity.url) == {}


def test_bom_precedes_everything(fidelity: ExportDatabase, path_client: httpx.Client) -> None:
    body = export(path_client, "csv", bom="true", select="id", order="id")
    assert body == b"\xef\xbb\xbfid\n" + b"".join(b"%d\n" % i for i in range(1, ROWS + 1))
    empty = export(path_client, "csv", bom="true", header="false", limit="0")
    assert empty == b"\xef\xbb\xbf"


def _bare_line_feeds(text: str) -> int:
    """Line feeds outside quoted fields that do not end a CRLF."""
    quoted, count = False, 0
    for i, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif char == "\n" and not quoted and (i == 0 or text[i - 1] != "\r"):
            count += 1
    return count


def test_excel_profile(fidelity: ExportDatabase, path_client: httpx.Client) -> None:
    body = export(path_client, "csv", profile="excel", order="id")
    assert body.startswith(b"\xef\xbb\xbf")
    text = body[3:].decode()
    assert text.endswith("\r\n") and _bare_line_feeds(text) == 0
    rows = list(csv.reader(io.StringIO(text, newline="")))
    header = rows[0]
    by_id = {row[0]: dict(zip(header, row, strict=True)) for row in rows[1:]}
    assert by_id["6"]["t"] == "'@SUM(A1)" and by_id["6"]["vc"] == "'+1"
    assert by_id["6"]["c"] == "' =x  "
    assert by_id["7"]["t"] == "'\t=tab" and by_id["7"]["vc"] == "'-2"
    assert by_id["7"]["c"] == "'=    "
    # Numbers stay numbers; a formula character later in a value changes nothing.
    assert by_id["6"]["num"] == "-1.5" and by_id["6"]["r8"] == "-1.5" and by_id["6"]["i4"] == "-1"
    assert by_id["8"]["num"] == "-Infinity" and by_id["3"]["m"].startswith("-")
    assert by_id["6"]["ta"] == "{=1}"
    # Every other field is the one COPY writes.
    plain = copy_out(fidelity.url, "SELECT * FROM fidelity ORDER BY id", format="csv", header=True)
    original = list(csv.reader(io.StringIO(plain.decode(), newline="")))
    assert original[0] == header
    changed = {
        (ours[0], name)
        for ours, theirs in zip(rows[1:], original[1:], strict=True)
        for name, mine, copied in zip(header, ours, theirs, strict=True)
        if mine != copied
    }
    # The escaped ones, and two non-numeric values that start with "-": an interval and
    # -infinity.
    assert changed == {
        ("6", "t"),
        ("6", "vc"),
        ("6", "c"),
        ("7", "t"),
        ("7", "vc"),
        ("7", "c"),
        ("3", "iv"),
        ("4", "ts"),
    }
    assert by_id["3"]["iv"] == "'-1 days +02:03:04.5" and by_id["4"]["ts"] == "'-infinity"


@pytest.mark.parametrize(
    ("params", "name", "detail"),
    [
        ({"header": "yes"}, "header", "header must be true or false"),
        ({"bom": "1"}, "bom", "bom must be true or false"),
        ({"crlf": "TRUE"}, "crlf", "crlf must be true or false"),
        ({"delimiter": "::"}, "delimiter", "delimiter must be one of"),
        ({"delimiter": "a"}, "delimiter", "delimiter must be one of"),
        ({"quote": "some"}, "quote", "quote must be all or minimal"),
        ({"profile": "lotus"}, "profile", "profile must be excel"),
        ({"null": "a,b"}, "null", "may not contain the delimiter"),
        ({"null": 'say "x"'}, "null", "may not contain the delimiter or a double quote"),
        ({"null": "a\nb"}, "null", "line break"),
        ({"null": "x" * 101}, "null", "at most 100"),
        ({"numbers": "string"}, "numbers", "applies to ndjson exports only"),
        ({"header": "true", "header2": "x"}, "header2", "unknown column"),
    ],
)
def test_bad_csv_options_are_400(
    server: Server, fidelity: ExportDatabase, params: dict[str, str], name: str, detail: str
) -> None:
    with server.client(fidelity.key) as client:
        response = client.get("/datasets/fidelity.csv", params=params)
    assert response.status_code == 400, response.text
    problem = response.json()
    assert problem["invalid-params"][0]["name"] == name
    assert detail in problem["invalid-params"][0]["reason"]


def test_bad_ndjson_options_are_400(server: Server, fidelity: ExportDatabase) -> None:
    with server.client(fidelity.key) as client:
        for params, name in (({"numbers": "float"}, "numbers"), ({"bom": "true"}, "bom")):
            response = client.get("/datasets/fidelity.ndjson", params=params)
            assert response.status_code == 400, response.text
            assert response.json()["invalid-params"][0]["name"] == name
        response = client.get("/datasets/fidelity.ndjson", params={"delimiter": ";"})
        assert "applies to csv exports only" in response.text


# NDJSON


def strict_lines(body: bytes) -> list[dict[str, Any]]:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    text = body.decode()
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=refuse) for line in text.split("\n")[:-1]]


def test_ndjson_parses_strictly_and_follows_the_type_map(
    fidelity: ExportDatabase, path_client: httpx.Client
) -> None:
    body = export(path_client, "ndjson", order="id")
    lines = body.decode().split("\n")[:-1]
    rows = {row["id"]: row for row in strict_lines(body)}
    assert len(rows) == ROWS
    assert all(value is None for name, value in rows[1].items() if name != "id")
    three, four, five = rows[3], rows[4], rows[5]
    # Numbers: exact digits, as PostgreSQL prints them.
    assert '"i8":9223372036854775807' in lines[3] and four["i8"] == 2**63 - 1
    assert '"num30":123456789012345678901234567890.123456789012345678901234567890' in lines[3]
    assert '"num":1.50' in lines[2] and '"r8":0.1,' in lines[2]
    assert four["num"] == "NaN" and four["r4"] == "Infinity" and rows[8]["num"] == "-Infinity"
    assert '"r8":-0' in lines[3] and '"r8":5e-324' in lines[4] and '"r4":3.4028235e+38' in lines[4]
    # Strings, json embedded as JSON, arrays nested, bytea as base64.
    assert three["t"] == 'say "hi", a,b;c|d\ttab\nLF\r\nCRLF  '
    assert three["vc"] == "\\N" and three["c"] == "\\    " and three["en"] == 'happy "quoted"'
    assert three["j"] == {"k": [1, 2.5, "x\ny"], "n": None}
    assert three["jb"] == {"a": {"b": [1, "é😀"]}, "s": "line\nbreak", "q": '"\\'}
    assert three["ia"] == [1, None, 3] and three["ia2"] == [[1, 2], [3, None]]
    assert three["ta"] == [None, 'a"b', "c,d", "", None, "😀 é"]
    assert base64.b64decode(three["ba"]) == b"\x00\xff\x0a\x0d\x22"
    assert base64.b64decode(five["ba"]) == b"\xab" * 100 and "\\n" not in lines[4]
    assert rows[2]["ba"] == "" and rows[2]["ia"] == [] and rows[2]["j"] == {}
    # Text forms.
    assert three["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11" and three["ip"] == "2001:db8::1/64"
    assert three["mac"] == "08:00:2b:01:02:03" and three["rng"] == "[1,5)"
    assert three["iv"] == "-1 days +02:03:04.5" and rows[2]["rng"] == "empty"
    assert three["comp"] == {"a": 1, "b": 'a "b", c'} and three["dom"] == 1.5
    # Dates and times: ISO 8601, timestamptz with its offset; infinities as strings.
    assert three["d"] == "2024-02-29" and three["ts"] == "2024-02-29T13:14:15.123456"
    assert three["tstz"].endswith("+00:00") or three["tstz"][-6] in "+-"
    assert three["tm"] == "13:14:15.123456" and three["tmtz"] == "13:14:15+05:30"
    assert four["d"] == "infinity" and four["ts"] == "-infinity" and four["tstz"] == "infinity"
    assert five["d"] == "0044-03-15 BC"


def test_numbers_as_strings(fidelity: ExportDatabase, path_client: httpx.Client) -> None:
    rows = {row["id"]: row for row in strict_lines(export(path_client, "ndjson", numbers="string"))}
    assert rows[4]["i8"] == "9223372036854775807" and rows[4]["i4"] == 2147483647
    assert rows[4]["num30"] == "123456789012345678901234567890.123456789012345678901234567890"
    assert rows[3]["num"] == "1.50" and rows[3]["dom"] == "1.5" and rows[3]["r8"] == 0.1
    assert rows[1]["i8"] is None


def _populate_back(url: str, lines: list[str]) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await connection.executemany(
                "INSERT INTO fidelity_back"
                " SELECT * FROM jsonb_populate_record(NULL::fidelity_back, $1::jsonb)",
                [(line,) for line in lines],
            )
        finally:
            await connection.close()

    asyncio.run(run())


@pytest.mark.parametrize("numbers", ["number", "string"])
def test_ndjson_loads_back_with_jsonb_populate_record(
    fidelity: ExportDatabase, path_client: httpx.Client, numbers: str
) -> None:
    fresh_back_table(fidelity.url)
    body = export(path_client, "ndjson", numbers=numbers)
    _populate_back(fidelity.url, body.decode().split("\n")[:-1])
    # Every type but two. bytea: PostgreSQL's JSON input reads a string as bytea's own text
    # form, not base64 (decode(value, 'base64') loads it; the empty value is alike). And a
    # double precision -0 comes back as 0: JSON numbers go through numeric, which has no -0.
    assert differing_columns(fidelity.url) == {"ba": 2, "r8": 1}
    run_sql(
        fidelity.url,
        "UPDATE fidelity_back b SET ba = decode(convert_from(b.ba, 'UTF8'), 'base64')",
        "UPDATE fidelity_back SET r8 = '-0' WHERE id = 4 AND r8 = 0",
    )
    assert differing_columns(fidelity.url) == {}


def test_filters_and_select_combine_with_options(
    fidelity: ExportDatabase, path_client: httpx.Client
) -> None:
    body = export(path_client, "csv", select="id,t", id="in.(3,6)", delimiter=";", crlf="true")
    assert body.decode() == 'id;t\r\n3;"say ""hi"", a,b;c|d\ttab\nLF\r\nCRLF  "\r\n6;@SUM(A1)\r\n'


@pytest.fixture(scope="module")
def case_insensitive(fidelity: ExportDatabase) -> Iterator[str]:
    create_case_insensitive_collation(fidelity.url, "fidelity_ci")
    run_sql(
        fidelity.url,
        "CREATE TABLE fidelity_ci (id integer PRIMARY KEY, v text COLLATE fidelity_ci)",
        "INSERT INTO fidelity_ci VALUES (1, 'NULL'), (2, 'null'), (3, 'a,b'), (4, '=1+1'),"
        " (5, NULL), (6, '')",
    )
    try:
        yield "fidelity_ci"
    finally:
        run_sql(fidelity.url, "DROP TABLE fidelity_ci", "DROP COLLATION public.fidelity_ci")


def test_nondeterministic_collations_render_like_copy(
    fidelity: ExportDatabase, path_client: httpx.Client, case_insensitive: str
) -> None:
    # strpos() and regular expressions refuse such collations, and the null string must match
    # byte for byte ('null' is not 'NULL'), as in COPY.
    for params in ({"null": "NULL"}, {"null": "NULL", "crlf": "true"}):
        ours = path_client.get(f"/datasets/{case_insensitive}.csv", params=params)
        assert ours.status_code == 200, ours.text
        theirs = copy_out(
            fidelity.url,
            f"SELECT * FROM {case_insensitive} ORDER BY id",
            format="csv",
            header=True,
            null="NULL",
        )
        expected = theirs.replace(b"\n", b"\r\n") if "crlf" in params else theirs
        assert ours.content == expected
    excel = path_client.get(f"/datasets/{case_insensitive}.csv", params={"profile": "excel"})
    assert excel.status_code == 200, excel.text
    assert b"\r\n4,'=1+1\r\n" in excel.content


def test_sql_formula_rule_is_the_python_rule(fidelity: ExportDatabase) -> None:
    from exporter.pipeline.encoders.csv import needs_formula_escape
    from exporter.pipeline.source import FORMULA_PATTERN_SQL

    values = [
        "=1",
        "+1",
        "-1",
        "@a",
        "\t",
        "\r",
        "\n",
        " \t",
        "  =x",
        "\v-1",
        "\f@",
        "\v",
        " ",
        "",
        "a",
        " a",
        "a=b",
        "1-2",
        "\u00a0=x",
        "'=x",
        "\u3000+1",
        "x\n=1",
        # Issue 14: Unicode's other spaces before a trigger, and the full-width triggers.
        "\uff1d1+1",
        "\uff0b1",
        "\uff0d1",
        "\uff20SUM(A1)",
        "\u2003@x",
        "\u0085=1",
        "\u202f\u205f+1",
        "\ufeff=1",
        "\u200b-1",
        "\u00a0",
        "x\uff1d1",
        "\u00a0x=1",
    ]

    async def check() -> list[bool]:
        connection = await asyncpg.connect(asyncpg_dsn(fidelity.url))
        try:
            return [
                bool(
                    await connection.fetchval(
                        f'SELECT $1::text COLLATE "C" ~ {FORMULA_PATTERN_SQL}', value
                    )
                )
                for value in values
            ]
        finally:
            await connection.close()

    assert asyncio.run(check()) == [needs_formula_escape(v) for v in values]


def test_user_types_named_like_builtins_are_not_taken_for_them(
    fidelity: ExportDatabase, path_client: httpx.Client
) -> None:
    # An enum called public.date (or public.numeric) can hold a delimiter or a formula.
    run_sql(
        fidelity.url,
        "CREATE TYPE public.date AS ENUM ('a,b', '=1+1')",
        "CREATE TYPE public.numeric AS ENUM ('=2+2')",
        "CREATE TABLE fidelity_shadow (id integer PRIMARY KEY, d public.date, n public.numeric)",
        "INSERT INTO fidelity_shadow VALUES (1, 'a,b', '=2+2'), (2, '=1+1', NULL)",
    )
    try:
        plain = path_client.get("/datasets/fidelity_shadow.csv")
        excel = path_client.get("/datasets/fidelity_shadow.csv", params={"profile": "excel"})
        theirs = copy_out(
            fidelity.url, "SELECT * FROM fidelity_shadow ORDER BY id", format="csv", header=True
        )
        assert plain.content == theirs
        assert excel.content.decode() == "\ufeffid,d,n\r\n1,\"a,b\",'=2+2\r\n2,'=1+1,\r\n"
    finally:
        run_sql(
            fidelity.url,
            "DROP TABLE fidelity_shadow",
            "DROP TYPE public.date, public.numeric",
        )


def test_citext_is_a_string(fidelity: ExportDatabase, path_client: httpx.Client) -> None:
    available = run_sql(
        fidelity.url, "SELECT count(*) AS n FROM pg_available_extensions WHERE name = 'citext'"
    )[0]["n"]
    if not available:
        pytest.skip("the citext extension is not installed on this server")
    run_sql(
        fidelity.url,
        "CREATE EXTENSION IF NOT EXISTS citext",
        "CREATE TABLE fidelity_citext (id integer PRIMARY KEY, v citext)",
        "INSERT INTO fidelity_citext VALUES (1, 'Ünïcode, \"quoted\"'), (2, ''), (3, NULL)",
    )
    try:
        lines = strict_lines(path_client.get("/datasets/fidelity_citext.ndjson").content)
        csv_body = path_client.get("/datasets/fidelity_citext.csv").content
        assert [line["v"] for line in lines] == ['Ünïcode, "quoted"', "", None]
        theirs = copy_out(
            fidelity.url, "SELECT * FROM fidelity_citext ORDER BY id", format="csv", header=True
        )
        assert csv_body == theirs
    finally:
        run_sql(fidelity.url, "DROP TABLE fidelity_citext")
