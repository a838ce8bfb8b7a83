"""What may be read: the tables and views of the exposed schemas, introspected from PostgreSQL."""

import logging
from dataclasses import dataclass

import asyncpg

from exporter.db.connection import Connection
from exporter.db.pool import Pool, RoleUnavailable
from exporter.settings import OWN_SCHEMA

log = logging.getLogger(__name__)

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
    # typname after resolving every level of domain ("int4", "_text" for text[]); outside
    # pg_catalog qualified ("public.mood"), so that a user type named date is not a date
    base_type: str
    # Whether PostgreSQL can ORDER BY it, as the catalog query finds; the default is for
    # columns built by hand. A default order skips the others, an explicit one is a 400.
    orderable: bool = True


@dataclass(frozen=True)
class Dataset:
    name: str
    schema: str
    relation: str
    kind: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    estimated_rows: int | None
    # pg_class.oid: what a cursor token checks to know a table dropped and made again.
    relid: int = 0
    # relkind: r, p (partitioned), v, m, f.
    relkind: str = "r"

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


# One query, run per request. Whether a column is orderable is PostgreSQL's own rule
# (lookup_type_cache, GetDefaultOpClass): domains resolved to their base type, however deep; a
# default btree operator class for that type, its own or one it reaches through a binary
# coercion (varchar -> text_ops) or a polymorphic class (enum, range, multirange, array,
# composite); and, since arrays and records compare element by element, the same recursively
# for an array's element type and for every attribute of a composite type.
_CATALOG_SQL = """
    WITH RECURSIVE columns AS MATERIALIZED (
        SELECT n.nspname AS schema, c.relname AS relation, c.relkind::text AS kind,
               c.oid::bigint AS relid,
               -- A key's role that row-level security restricts would learn the whole
               -- table's count from the statistics: none then.
               CASE WHEN c.reltuples < 0 OR ($4::text IS NOT NULL AND c.relrowsecurity)
                   THEN NULL ELSE c.reltuples::bigint END
                   AS estimated_rows,
               a.attnum, a.attname AS column_name, a.atttypid,
               format_type(a.atttypid, a.atttypmod) AS column_type,
               -- -1, not NULL: with NULL, char(n) and bit(n) come out as "character" and
               -- "bit", which in a cast mean char(1) and bit(1).
               format_type(a.atttypid, -1) AS column_type_sql,
               coalesce(pk.position, 0) AS pk_position
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_catalog.pg_attribute a
            ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN LATERAL (
            SELECT k.position
            FROM pg_catalog.pg_index i,
                 unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
            WHERE i.indrelid = c.oid AND i.indisprimary AND k.attnum = a.attnum
        ) pk ON true
        WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND NOT c.relispartition
          AND n.nspname = ANY($1::text[])
          AND n.nspname <> $2::text
          AND has_schema_privilege(n.oid, 'USAGE')
          AND ($3::text IS NULL OR c.relname = $3::text)
          -- A key with a role sees what the role may read, column by column.
          AND ($4::text IS NULL OR (
              has_schema_privilege($4::text, n.oid, 'USAGE')
              AND has_column_privilege($4::text, c.oid, a.attnum, 'SELECT')))
    ),
    -- For each column type, the types its ordering involves: itself and the domains below it
    -- down to the base type (own), and then the element type of an array and the attribute
    -- types of a composite, recursively. A range needs nothing more: its subtype has a btree
    -- class by construction, and PostgreSQL checks no further either.
    parts AS (
        -- Types outside pg_catalog by qualified name: a public.date is not a date.
        SELECT u.column_type, true AS own, t.oid,
               CASE WHEN t.typnamespace = 'pg_catalog'::regnamespace THEN t.typname::text
                   ELSE t.typnamespace::regnamespace::text || '.' || t.typname END AS typname,
               t.typtype, t.typbasetype,
               t.typelem, t.typlen, t.typrelid, t.typcategory
        -- Seeded through an array, which the planner guesses at ten elements: a guess of one
        -- row per column, multiplied through the recursion, priced large catalogs above
        -- jit_above_cost, and compiling the plan took a second where the query takes 2 ms.
        FROM (SELECT array_agg(DISTINCT atttypid) AS types FROM columns) s
        CROSS JOIN unnest(s.types) AS u(column_type)
        JOIN pg_catalog.pg_type t ON t.oid = u.column_type
        UNION
        SELECT p.column_type, p.own AND child.own, t.oid,
               CASE WHEN t.typnamespace = 'pg_catalog'::regnamespace THEN t.typname::text
                   ELSE t.typnamespace::regnamespace::text || '.' || t.typname END AS typname,
               t.typtype, t.typbasetype,
               t.typelem, t.typlen, t.typrelid, t.typcategory
        FROM parts p
        CROSS JOIN LATERAL (
            SELECT p.typbasetype, true WHERE p.typtype = 'd'
            UNION ALL
            -- A true array (not point's or name's fixed-length subscripting); typsubscript
            -- would say so too, but PostgreSQL 13 has no typsubscript.
            SELECT p.typelem, false WHERE p.typtype = 'b' AND p.typelem <> 0 AND p.typlen = -1
            UNION ALL
            SELECT a.atttypid, false
            FROM pg_catalog.pg_attribute a
            WHERE p.typtype = 'c' AND a.attrelid = p.typrelid
              AND a.attnum > 0 AND NOT a.attisdropped
        ) AS child(oid, own)
        JOIN pg_catalog.pg_type t ON t.oid = child.oid
    ),
    -- Polymorphic classes by their input type's name, as text: anymultirange exists from
    -- PostgreSQL 14 only, so a regtype literal would fail on 13.
    btree_classes AS MATERIALIZED (
        SELECT oc.opcintype,
               CASE WHEN it.typtype = 'p' THEN it.typname::text END AS polymorphic,
               it.typispreferred, it.typcategory
        FROM pg_catalog.pg_opclass oc
        JOIN pg_catalog.pg_am am ON am.oid = oc.opcmethod
        JOIN pg_catalog.pg_type it ON it.oid = oc.opcintype
        WHERE am.amname = 'btree' AND oc.opcdefault
    ),
    -- The types that need a btree class of their own: all but domains.
    leaves AS MATERIALIZED (
        SELECT DISTINCT oid, typname::text AS typname, typtype, typcategory,
               CASE
                   WHEN typtype = 'b' AND typelem <> 0 AND typlen = -1 THEN 'anyarray'
                   WHEN typtype = 'e' THEN 'anyenum'
                   WHEN typtype = 'r' THEN 'anyrange'
                   WHEN typtype = 'm' THEN 'anymultirange'
                   WHEN typtype = 'c' THEN 'record'
               END AS polymorphic
        FROM parts
        WHERE typtype <> 'd'
    ),
    -- The default btree classes a leaf type may use: its own, those of the types it is
    -- binary-coercible to without a cast function (varchar -> text, cidr -> inet,
    -- regclass -> oid), and the polymorphic one of its kind.
    candidates AS (
        SELECT l.oid AS leaf, b.*
        FROM leaves l
        JOIN btree_classes b ON b.opcintype = l.oid
        UNION ALL
        SELECT l.oid, b.*
        FROM leaves l
        JOIN pg_catalog.pg_cast k
            ON k.castsource = l.oid AND k.castmethod = 'b' AND k.castcontext = 'i'
        JOIN btree_classes b ON b.opcintype = k.casttarget
        UNION ALL
        SELECT l.oid, b.*
        FROM leaves l
        JOIN btree_classes b ON b.polymorphic = l.polymorphic
    ),
    -- As GetDefaultOpClass picks: the type's own class; else the only candidate, or the only
    -- one whose type is the preferred type of the category (varchar: text_ops, not
    -- bpchar_ops). A pseudo-type column (anyarray, in views over pg_stats) has no elements
    -- to compare.
    leaf_orderable AS (
        SELECT l.oid, l.typname,
               l.typtype <> 'p' AND (
                   count(*) FILTER (WHERE c.opcintype = l.oid) > 0
                   OR count(*) FILTER (WHERE c.opcintype <> l.oid AND c.typispreferred
                                         AND c.typcategory = l.typcategory) = 1
                   OR count(c.opcintype) = 1
               ) AS orderable
        FROM leaves l
        LEFT JOIN candidates c ON c.leaf = l.oid
        GROUP BY l.oid, l.typname, l.typtype, l.typcategory
    ),
    types AS (
        SELECT p.column_type,
               min(lo.typname) FILTER (WHERE p.own) AS base_type,
               bool_and(lo.orderable) AS orderable
        FROM parts p
        JOIN leaf_orderable lo ON lo.oid = p.oid
        GROUP BY p.column_type
    )
    SELECT c.schema, c.relation, c.kind, c.relid, c.estimated_rows, c.column_name, c.column_type,
           c.column_type_sql, types.base_type, types.orderable, c.pk_position
    FROM columns c
    JOIN types ON types.column_type = c.atttypid
    ORDER BY c.schema, c.relation, c.attnum
"""


def dataset_name(schema: str, relation: str, schemas: tuple[str, ...]) -> str:
    # With one exposed schema the schema is implied; with several, names carry it.
    return relation if len(schemas) == 1 else f"{schema}.{relation}"


async def load_datasets(
    pool: Pool, schemas: tuple[str, ...], relation: str | None = None, role: str | None = None
) -> list[Dataset]:
    """Introspect the exposed schemas; with `relation`, only relations of that name; with
    `role`, only the relations and columns that role may SELECT (RoleUnavailable if it does
    not exist)."""
    exposed = [s for s in schemas if s != OWN_SCHEMA]
    async with pool.connection() as connection:
        if role is not None:
            await _check_role(connection, role)
        rows = await connection.fetch(_CATALOG_SQL, exposed, OWN_SCHEMA, relation, role)

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
                        orderable=bool(c["orderable"]),
                    )
                    for c in columns
                ),
                primary_key=tuple(name for _, name in pk),
                estimated_rows=int(str(estimated)) if estimated is not None else None,
                relid=int(str(first["relid"])),
                relkind=str(first["kind"]),
            )
        )
    return datasets


async def _check_role(connection: Connection, role: str) -> None:
    """RoleUnavailable unless the role exists and the service may take it (SET ROLE needs
    membership), so that the catalog never shows what an export could not read."""
    try:
        member = await connection.fetchval("SELECT pg_has_role(current_user, $1, 'MEMBER')", role)
    except asyncpg.exceptions.UndefinedObjectError as exc:
        member = False
        reason: BaseException | None = exc
    else:
        reason = None
    if not member:
        log.warning("cannot export as role %r: %s", role, reason or "not a member of it")
        raise RoleUnavailable("this key's PostgreSQL role cannot be used") from reason


async def find_dataset(
    pool: Pool, schemas: tuple[str, ...], name: str, role: str | None = None
) -> Dataset | None:
    if "\x00" in name:
        # PostgreSQL refuses NUL in any text it is sent (an error, not "no such relation"),
        # and no identifier can hold one: such a name names nothing.
        return None
    exposed = tuple(s for s in schemas if s != OWN_SCHEMA)
    if len(exposed) == 1:
        relation = name
    else:
        schema, dot, relation = name.partition(".")
        if not dot or schema not in exposed:
            return None
    for dataset in await load_datasets(pool, exposed, relation, role):
        if dataset.name == name:
            return dataset
    return None
