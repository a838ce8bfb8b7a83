import asyncio
import csv
import io
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from exporter.db.pool import Pool
from exporter.pipeline.catalog import Dataset, find_dataset, load_datasets
from exporter.settings import Settings
from tests.support.app import in_process_app
from tests.support.database import ExportDatabase, asyncpg_dsn, run_sql, xml_unsupported


def _load(url: str, schemas: tuple[str, ...], name: str | None = None) -> list[Dataset]:
    async def run() -> list[Dataset]:
        pool = await Pool.open(url, size=1)
        try:
            if name is None:
                return await load_datasets(pool, schemas)
            found = await find_dataset(pool, schemas, name)
            return [found] if found else []
        finally:
            await pool.close()

    return asyncio.run(run())


def test_one_schema_names_datasets_by_relation(database: ExportDatabase) -> None:
    datasets = {d.name: d for d in _load(database.url, ("public",))}
    assert {"people", "adults", "big"} <= datasets.keys()
    assert datasets["people"].primary_key == ("id",)
    assert datasets["adults"].primary_key == ()
    assert datasets["adults"].default_order == ("id", "name", "age")
    doc = datasets["people"].column("doc")
    assert doc is not None and doc.type == "jsonb" and doc.base_type == "jsonb"
    code = datasets["people"].column("code")
    assert code is not None and code.type == "character(4)" and code.type_sql == "bpchar"


def test_several_schemas_qualify_names(database: ExportDatabase) -> None:
    names = {d.name for d in _load(database.url, ("public", "sales"))}
    assert {"public.people", "sales.orders"} <= names
    assert "people" not in names
    (orders,) = _load(database.url, ("public", "sales"), "sales.orders")
    assert orders.schema == "sales" and orders.relation == "orders"
    assert _load(database.url, ("public", "sales"), "orders") == []


def test_own_schema_is_never_exposed(database: ExportDatabase) -> None:
    assert _load(database.url, ("exporter",)) == []
    assert _load(database.url, ("exporter",), "api_keys") == []
    names = {d.name for d in _load(database.url, ("public", "exporter"))}
    assert not any(name.startswith("exporter.") for name in names)
    assert Settings(schemas="public, exporter").exposed_schemas == ("public",)  # type: ignore[arg-type]


def test_exposed_schemas_setting_through_the_app(database: ExportDatabase, tmp_path: Path) -> None:
    with in_process_app(
        database.url, tmp_path, database.key, schemas="public,sales,exporter"
    ) as client:
        names = {d["name"] for d in client.get("/datasets").json()}
        assert "sales.orders" in names and "public.people" in names
        assert not any(n.startswith("exporter.") for n in names)
        response = client.get("/datasets/sales.orders.csv")
        assert response.status_code == 200
        assert list(csv.reader(io.StringIO(response.text))) == [
            ["id", "total"],
            ["1", "10.5"],
            ["2", "20"],
        ]
        assert client.get("/datasets/exporter.api_keys.csv").status_code == 404
        assert client.get("/datasets/exporter.api_keys").status_code == 404


def test_a_name_with_nul_names_nothing(database: ExportDatabase, client: httpx.Client) -> None:
    # PostgreSQL refuses NUL in a bound text: asking the catalog for such a name was a 500.
    assert _load(database.url, ("public",), "people\x00") == []
    assert _load(database.url, ("public", "sales"), "sales.orders\x00") == []
    for path in ("/datasets/%00", "/datasets/people%00.csv", "/datasets/%00.ndjson"):
        response = client.get(path)
        assert response.status_code == 404, (path, response.text)
        assert response.headers["content-type"] == "application/problem+json"


# Column -> (type, two distinct values, whether PostgreSQL can ORDER BY it). The test below
# asks PostgreSQL itself too; these verdicts only make the intent readable.
ORDERING_COLUMNS: dict[str, tuple[str, str, str, bool]] = {
    "c_int": ("integer", "1", "2", True),
    "c_text": ("text", "'a'", "'b'", True),
    "c_varchar": ("varchar(10)", "'a'", "'b'", True),  # text_ops, through a binary coercion
    "c_char": ("char(3)", "'a'", "'b'", True),
    "c_numeric": ("numeric(8,2)", "1.5", "2.5", True),
    "c_timestamptz": ("timestamptz", "'2024-01-01 00:00Z'", "'2024-01-02 00:00Z'", True),
    "c_uuid": (
        "uuid",
        "'00000000-0000-0000-0000-000000000001'",
        "'00000000-0000-0000-0000-000000000002'",
        True,
    ),
    "c_bool": ("boolean", "true", "false", True),
    "c_enum": ("ordering.mood", "'sad'", "'happy'", True),
    "c_int4range": ("int4range", "'[1,2)'", "'[2,3)'", True),
    "c_int_array": ("integer[]", "'{1}'", "'{2}'", True),
    "c_text_array": ("text[]", "'{a}'", "'{b}'", True),
    "c_jsonb": ("jsonb", "'{}'", """'{"a": 1}'""", True),
    "c_json": ("json", "'{}'", """'{"a": 1}'""", False),
    # array_ops takes any array, but PostgreSQL refuses one whose elements have no order.
    "c_json_array": ("json[]", "ARRAY['{}'::json]", "ARRAY['[1]'::json]", False),
    "c_point": ("point", "'(1,2)'", "'(3,4)'", False),
    "c_xml": ("xml", "'<a/>'", "'<b/>'", False),
    "c_xid": ("xid", "'1'", "'2'", False),  # hash only; xid8 has btree
    "c_xid8": ("xid8", "'1'", "'2'", True),
    "c_cidr": ("cidr", "'10.0.0.0/8'", "'11.0.0.0/8'", True),  # inet_ops
    "c_regclass": ("regclass", "'pg_class'", "'pg_type'", True),  # oid_ops
    "c_small": ("ordering.small_positive", "1", "2", True),  # domain over domain over int
    "c_small_array": ("ordering.small_positive[]", "'{1}'", "'{2}'", True),
    "c_doc": ("ordering.doc", "'{}'", "'[1]'", False),  # domain over json
    "c_deep_doc": ("ordering.deep_doc", "'{}'", "'[1]'", False),  # domain over that domain
    "c_docs": ("ordering.docs", "ARRAY['{}'::json]", "ARRAY['[1]'::json]", False),
    # Composites compare field by field: orderable when every field is, recursively.
    "c_located": ("ordering.located", "ROW('a', '(1,2)')", "ROW('b', '(3,4)')", False),
    "c_pair": ("ordering.pair", "ROW(1, 'a')", "ROW(2, 'b')", True),
    "c_pair_array": (
        "ordering.pair[]",
        "ARRAY[ROW(1, 'a')::ordering.pair]",
        "ARRAY[ROW(2, 'b')::ordering.pair]",
        True,
    ),
    "c_nested": ("ordering.nested", "ROW(ROW(1, 'a'), 5)", "ROW(ROW(2, 'b'), 6)", True),
    "c_nested_json": (
        "ordering.nested_json",
        "ROW(ROW(1, 'a'), ARRAY['{}'::json])",
        "ROW(ROW(2, 'b'), ARRAY['[1]'::json])",
        False,
    ),
}
MULTIRANGE_COLUMN = ("c_int4multirange", ("int4multirange", "'{[1,2)}'", "'{[2,3)}'", True))


@pytest.fixture(scope="module")
def ordering_columns(database: ExportDatabase) -> Iterator[dict[str, tuple[str, str, str, bool]]]:
    """A table in its own schema with a column of each type in ORDERING_COLUMNS, two rows."""
    columns = dict(ORDERING_COLUMNS)
    if xml_unsupported(database.url):
        # The xml type is there, but without libxml no value of it can be made.
        del columns["c_xml"]
    (version,) = run_sql(database.url, "SHOW server_version_num")
    if int(version[0]) >= 140000:
        columns.update([MULTIRANGE_COLUMN])
    definitions = ", ".join(f"{name} {type_}" for name, (type_, _, _, _) in columns.items())
    first = ", ".join(values[1] for values in columns.values())
    second = ", ".join(values[2] for values in columns.values())
    try:
        run_sql(
            database.url,
            "CREATE SCHEMA ordering",
            "CREATE TYPE ordering.mood AS ENUM ('sad', 'happy')",
            "CREATE DOMAIN ordering.positive AS integer CHECK (VALUE > 0)",
            "CREATE DOMAIN ordering.small_positive AS ordering.positive CHECK (VALUE < 100)",
            "CREATE DOMAIN ordering.doc AS json",
            "CREATE DOMAIN ordering.deep_doc AS ordering.doc",
            "CREATE DOMAIN ordering.docs AS json[]",
            "CREATE TYPE ordering.located AS (name text, at point)",
            "CREATE TYPE ordering.pair AS (a integer, b text)",
            "CREATE TYPE ordering.nested AS (p ordering.pair, n ordering.small_positive)",
            "CREATE TYPE ordering.nested_json AS (p ordering.pair, docs json[])",
            f"CREATE TABLE ordering.everything ({definitions})",
            f"INSERT INTO ordering.everything VALUES ({first}), ({second})",
        )
        yield columns
    finally:
        run_sql(database.url, "DROP SCHEMA IF EXISTS ordering CASCADE")


def _postgresql_orders(url: str, columns: list[str]) -> dict[str, bool]:
    async def run() -> dict[str, bool]:
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            verdicts = {}
            for name in columns:
                try:
                    await conn.fetch(f"SELECT {name} FROM ordering.everything ORDER BY {name}")
                    verdicts[name] = True
                except asyncpg.PostgresError:
                    verdicts[name] = False
            return verdicts
        finally:
            await conn.close()

    return asyncio.run(run())


def test_orderable_agrees_with_postgresql(
    database: ExportDatabase, ordering_columns: dict[str, tuple[str, str, str, bool]]
) -> None:
    (dataset,) = _load(database.url, ("ordering",), "everything")
    catalog = {c.name: c.orderable for c in dataset.columns}
    postgresql = _postgresql_orders(database.url, list(ordering_columns))
    expected = {name: values[3] for name, values in ordering_columns.items()}
    assert catalog == postgresql
    assert catalog == expected
    assert dataset.default_order == tuple(name for name, ok in expected.items() if ok)
    if "c_xml" not in ordering_columns:
        # Every other type agreed; say so rather than pass as if xml had been asked too.
        pytest.skip(f"c_xml left out: {xml_unsupported(database.url)}")


def test_base_type_resolves_every_domain(
    database: ExportDatabase, ordering_columns: dict[str, tuple[str, str, str, bool]]
) -> None:
    (dataset,) = _load(database.url, ("ordering",), "everything")
    base_types = {c.name: c.base_type for c in dataset.columns}
    assert base_types["c_small"] == "int4"
    assert base_types["c_deep_doc"] == "json"
    assert base_types["c_docs"] == "_json"
    assert base_types["c_varchar"] == "varchar"
    assert base_types["c_int_array"] == "_int4"
    # Outside pg_catalog, qualified: a user type named like a built-in is not taken for it.
    assert base_types["c_enum"] == "ordering.mood"
    small = dataset.column("c_small")
    assert small is not None and small.type == "ordering.small_positive"


@pytest.fixture
def unorderable_view(database: ExportDatabase) -> Iterator[str]:
    # xid and a domain over a domain over json were missing from the old fixed list of
    # unorderable types, and made the default order fail inside PostgreSQL.
    run_sql(
        database.url,
        "CREATE DOMAIN public.catalog_doc AS json",
        "CREATE DOMAIN public.catalog_deep_doc AS public.catalog_doc",
        """
        CREATE VIEW public.catalog_unorderable AS
        SELECT id, doc::json AS payload, point(id, age) AS at, name,
               '7'::xid AS txid, doc::json::public.catalog_deep_doc AS deep
        FROM public.people
        """,
    )
    try:
        yield "catalog_unorderable"
    finally:
        run_sql(
            database.url,
            "DROP VIEW public.catalog_unorderable",
            "DROP DOMAIN public.catalog_deep_doc",
            "DROP DOMAIN public.catalog_doc",
        )


def test_view_default_order_skips_unorderable_columns(
    database: ExportDatabase, client: httpx.Client, unorderable_view: str
) -> None:
    (view,) = _load(database.url, ("public",), unorderable_view)
    assert view.primary_key == ()
    assert view.default_order == ("id", "name")

    response = client.get(f"/datasets/{unorderable_view}.csv")
    assert response.status_code == 200, response.text
    table = list(csv.reader(io.StringIO(response.text)))
    assert table[0] == ["id", "payload", "at", "name", "txid", "deep"]
    assert [row[0] for row in table[1:]] == ["1", "2", "3", "4", "5"]

    for column in ("payload", "at", "txid", "deep"):
        refused = client.get(f"/datasets/{unorderable_view}.csv", params={"order": column})
        assert refused.status_code == 400, refused.text
        assert [p["name"] for p in refused.json()["invalid-params"]] == ["order"]
