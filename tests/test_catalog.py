import asyncio
import csv
import io
from pathlib import Path

from exporter.catalog import Dataset, find_dataset, load_datasets
from exporter.db import create_engine
from exporter.settings import Settings
from tests.conftest import ExportDatabase, start_server, stop_server


def _load(url: str, schemas: tuple[str, ...], name: str | None = None) -> list[Dataset]:
    async def run() -> list[Dataset]:
        engine = create_engine(url, pool_size=1)
        try:
            if name is None:
                return await load_datasets(engine, schemas)
            found = await find_dataset(engine, schemas, name)
            return [found] if found else []
        finally:
            await engine.dispose()

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


def test_exposed_schemas_setting_through_the_server(
    database: ExportDatabase, tmp_path: Path
) -> None:
    server = start_server(database.url, tmp_path, schemas="public,sales,exporter")
    try:
        with server.client(database.key) as client:
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
    finally:
        stop_server(server)
