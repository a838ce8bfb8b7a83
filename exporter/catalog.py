"""What may be read: the tables and views of the exposed schemas, introspected from PostgreSQL."""

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.settings import OWN_SCHEMA

# Types with no btree ordering: a default order over "all columns" of a view must skip them.
UNORDERABLE_TYPES = frozenset(
    {"json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle"}
)

KINDS = {
    "r": "table",
    "p": "table",
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
}


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # as PostgreSQL shows it, typmod included: "numeric(10,2)"
    type_sql: str  # the type without typmod, for casts of bound values: "numeric"
    base_type: str  # typname after resolving domains ("int4", "_text" for text[])

    @property
    def orderable(self) -> bool:
        return self.base_type.lstrip("_") not in UNORDERABLE_TYPES


@dataclass(frozen=True)
class Dataset:
    name: str
    schema: str
    relation: str
    kind: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    estimated_rows: int | None

    def column(self, name: str) -> Column | None:
        for column in self.columns:
            if column.name == name:
                return column
        return None

    @property
    def default_order(self) -> tuple[str, ...]:
        if self.primary_key:
            return self.primary_key
        return tuple(c.name for c in self.columns if c.orderable)


_CATALOG_SQL = text(
    """
    SELECT n.nspname AS schema, c.relname AS relation, c.relkind::text AS kind,
           CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::bigint END AS estimated_rows,
           a.attname AS column_name,
           format_type(a.atttypid, a.atttypmod) AS column_type,
           -- -1, not NULL: with NULL, char(n) and bit(n) come out as "character" and "bit",
           -- which in a cast mean char(1) and bit(1).
           format_type(a.atttypid, -1) AS column_type_sql,
           coalesce(bt.typname, t.typname) AS base_type,
           coalesce(pk.position, 0) AS pk_position
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_catalog.pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
    LEFT JOIN LATERAL (
        SELECT k.position
        FROM pg_catalog.pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
        WHERE i.indrelid = c.oid AND i.indisprimary AND k.attnum = a.attnum
    ) pk ON true
    WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
      AND NOT c.relispartition
      AND n.nspname = ANY(CAST(:schemas AS text[]))
      AND n.nspname <> CAST(:own_schema AS text)
      AND has_schema_privilege(n.oid, 'USAGE')
      AND (CAST(:relation AS text) IS NULL OR c.relname = CAST(:relation AS text))
    ORDER BY n.nspname, c.relname, a.attnum
    """
)


def dataset_name(schema: str, relation: str, schemas: tuple[str, ...]) -> str:
    # With one exposed schema the schema is implied; with several, names carry it.
    return relation if len(schemas) == 1 else f"{schema}.{relation}"


async def load_datasets(
    engine: AsyncEngine, schemas: tuple[str, ...], relation: str | None = None
) -> list[Dataset]:
    """Introspect the exposed schemas; with `relation`, only relations of that name."""
    exposed = [s for s in schemas if s != OWN_SCHEMA]
    async with engine.connect() as conn:
        result = await conn.execute(
            _CATALOG_SQL,
            {"schemas": exposed, "own_schema": OWN_SCHEMA, "relation": relation},
        )
        rows = result.mappings().all()

    grouped: dict[tuple[str, str], list[dict[str, object]]] = {}
    for row in rows:
        grouped.setdefault((row["schema"], row["relation"]), []).append(dict(row))

    datasets = []
    for (schema, relation_name), columns in grouped.items():
        first = columns[0]
        pk = sorted(
            (int(str(c["pk_position"])), str(c["column_name"]))
            for c in columns
            if int(str(c["pk_position"])) > 0
        )
        estimated = first["estimated_rows"]
        datasets.append(
            Dataset(
                name=dataset_name(schema, relation_name, tuple(exposed)),
                schema=schema,
                relation=relation_name,
                kind=KINDS[str(first["kind"])],
                columns=tuple(
                    Column(
                        name=str(c["column_name"]),
                        type=str(c["column_type"]),
                        type_sql=str(c["column_type_sql"]),
                        base_type=str(c["base_type"]),
                    )
                    for c in columns
                ),
                primary_key=tuple(name for _, name in pk),
                estimated_rows=int(str(estimated)) if estimated is not None else None,
            )
        )
    return datasets


async def find_dataset(engine: AsyncEngine, schemas: tuple[str, ...], name: str) -> Dataset | None:
    exposed = tuple(s for s in schemas if s != OWN_SCHEMA)
    if len(exposed) == 1:
        relation = name
    else:
        schema, dot, relation = name.partition(".")
        if not dot or schema not in exposed:
            return None
    for dataset in await load_datasets(engine, exposed, relation):
        if dataset.name == name:
            return dataset
    return None
