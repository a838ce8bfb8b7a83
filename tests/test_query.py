"""parse_query and build_sql as pure functions, on Dataset/Column objects built here."""

import re
import time

import pytest

from exporter.pipeline.catalog import Column, Dataset
from exporter.pipeline.encoders import Rendering
from exporter.pipeline.query import (
    MAX_PARAMETERS,
    MAX_VALUE_LENGTH,
    ExportQuery,
    Filter,
    OrderTerm,
    QueryError,
    parse_query,
)
from exporter.pipeline.source import build_sql


def _column(
    name: str,
    type_: str,
    type_sql: str | None = None,
    base: str | None = None,
    orderable: bool = True,
) -> Column:
    return Column(
        name=name,
        type=type_,
        type_sql=type_sql or type_,
        base_type=base or type_,
        orderable=orderable,
    )


COLUMNS = (
    _column("id", "integer", base="int4"),
    _column("name", "text"),
    _column("small", "smallint", base="int2"),
    _column("big", "bigint", base="int8"),
    _column("score", "numeric(10,3)", "numeric", "numeric"),
    _column("height", "real", base="float4"),
    _column("ratio", "double precision", base="float8"),
    _column("active", "boolean", base="bool"),
    _column("born", "date"),
    _column("seen_at", "timestamp with time zone", base="timestamptz"),
    _column("tag", "uuid"),
    # type_sql as the catalog has it: format_type(oid, -1), which keeps char(n) and bit(n) whole.
    _column("code", "character(4)", "bpchar", "bpchar"),
    _column("flags", "bit(3)", '"bit"', "bit"),
    _column("codes", "character(2)[]", "bpchar[]", "_bpchar"),
    _column("doc", "jsonb"),
    _column("payload", "json", orderable=False),
    _column("points", "point[]", base="_point", orderable=False),
    _column("tags", "text[]", base="_text"),
    _column('a"b', "text"),
    _column("x; drop table people", "text"),
    _column("a,b", "integer", base="int4"),
    _column("a.b", "integer", base="int4"),
)
TABLE = Dataset(
    name="things",
    schema="public",
    relation="things",
    kind="table",
    columns=COLUMNS,
    primary_key=("id",),
    estimated_rows=5,
)
VIEW = Dataset(
    name="thing_view",
    schema="public",
    relation="thing_view",
    kind="view",
    columns=(
        _column("id", "integer", base="int4"),
        _column("payload", "json", orderable=False),
        _column("name", "text"),
        _column("points", "point[]", base="_point", orderable=False),
        _column("age", "integer", base="int4"),
    ),
    primary_key=(),
    estimated_rows=None,
)


def parse(*params: tuple[str, str], max_limit: int | None = None) -> ExportQuery:
    return parse_query(TABLE, params, max_limit=max_limit)


def error(*params: tuple[str, str], max_limit: int | None = None) -> QueryError:
    with pytest.raises(QueryError) as caught:
        parse(*params, max_limit=max_limit)
    return caught.value


def one_filter(name: str, expression: str) -> Filter:
    (only,) = parse((name, expression)).filters
    return only


def names(columns: tuple[Column, ...]) -> list[str]:
    return [c.name for c in columns]


# select


def test_no_select_means_every_column_in_table_order() -> None:
    assert parse().columns == COLUMNS


def test_select_keeps_the_requested_order() -> None:
    assert names(parse(("select", "name,id,code")).columns) == ["name", "id", "code"]


def test_select_quoted_names_may_hold_commas_quotes_and_dots() -> None:
    query = parse(("select", '"a,b",a.b,"a\\"b",x; drop table people'))
    assert names(query.columns) == ["a,b", "a.b", 'a"b', "x; drop table people"]


@pytest.mark.parametrize(
    ("select", "reason"),
    [
        ("id,name,id", "twice"),
        ("nope", "unknown column 'nope'"),
        ("id,,name", "empty item"),
        ("id,", "empty item"),
        ("", "empty item"),
        ('"id', "unterminated"),
        ("ID", "unknown column"),
        (" id", "unknown column"),
        ('""', "unknown column ''"),
        ("id;select 1", "unknown column"),
    ],
)
def test_bad_select_names_select(select: str, reason: str) -> None:
    problem = error(("id", "eq.1"), ("select", select), ("limit", "3"))
    assert problem.parameter == "select"
    assert reason in problem.reason


def test_many_duplicate_selects_fail_fast() -> None:
    started = time.perf_counter()
    problem = error(("select", ",".join(["id"] * 4_000)))
    assert time.perf_counter() - started < 0.1
    assert problem.parameter == "select"


# comparisons and their values


@pytest.mark.parametrize("operator", ["eq", "neq", "gt", "gte", "lt", "lte"])
def test_comparison_operators(operator: str) -> None:
    assert one_filter("id", f"{operator}.42") == Filter(COLUMNS[0], operator, False, "42", "id")  # type: ignore[arg-type]
    negated = one_filter("name", f"not.{operator}.a.b")
    assert (negated.operator, negated.negated, negated.value) == (operator, True, "a.b")


def test_value_keeps_everything_after_the_first_dot() -> None:
    assert one_filter("name", "eq.").value == ""
    assert one_filter("name", "eq. x.y ").value == " x.y "
    assert one_filter("name", "eq.not.eq.1").value == "not.eq.1"
    assert one_filter("name", "eq.*").value == "*"  # only like/ilike translate the star


@pytest.mark.parametrize("operator", ["like", "ilike"])
def test_like_turns_stars_into_percent(operator: str) -> None:
    found = one_filter("name", f"{operator}.*a*b_c%")
    assert (found.operator, found.value, found.negated) == (operator, "%a%b_c%", False)
    assert one_filter("name", f"not.{operator}.x*").negated


@pytest.mark.parametrize("operator", ["like", "ilike", "not.like"])
def test_a_pattern_ending_in_its_escape_character_is_refused(operator: str) -> None:
    # PostgreSQL raises this only when a row's matching reaches the end of the pattern:
    # left to it, `like.\` was a 500 after the request had been accepted.
    for pattern in ("\\", "a\\", "*\\", "\\\\\\", "a\\b\\"):
        problem = error(("name", f"{operator}.{pattern}"))
        assert problem.parameter == "name"
        assert "backslash" in problem.reason
    for pattern in ("\\\\", "a\\\\", "\\*", "a\\b", "\\\\\\*"):
        assert one_filter("name", f"{operator}.{pattern}").parameter == "name"


def test_filters_keep_their_order_and_repeat() -> None:
    query = parse(("id", "gt.1"), ("name", "like.A*"), ("id", "lt.9"))
    assert [(f.parameter, f.operator, f.value) for f in query.filters] == [
        ("id", "gt", "1"),
        ("name", "like", "A%"),
        ("id", "lt", "9"),
    ]


def test_in_list() -> None:
    assert one_filter("id", "in.(1,2,3)").value == ("1", "2", "3")
    assert one_filter("id", "not.in.(1)").negated
    assert one_filter("id", "in.()").value == ()
    quoted = one_filter("name", 'in.("Bob, \\"the builder\\"",Ada,"",")(")')
    assert quoted.value == ('Bob, "the builder"', "Ada", "", ")(")


@pytest.mark.parametrize(
    ("column", "expression", "reason"),
    [
        ("id", "in.1,2", "parenthesised"),
        ("id", "in.(1,2", "parenthesised"),
        ("id", "in.(", "parenthesised"),
        ("id", "in.(1,,2)", "empty item"),
        ("name", 'in.("a)', "unterminated"),
        ("id", "in.(1,x)", "'x' is not a valid integer"),
        ("tag", "in.(00000000-0000-0000-0000-000000000001,zzz)", "not a valid uuid"),
    ],
)
def test_bad_in_list_names_its_column(column: str, expression: str, reason: str) -> None:
    problem = error(("name", "eq.ok"), (column, expression))
    assert problem.parameter == column
    assert reason in problem.reason


def test_is() -> None:
    assert one_filter("name", "is.null").value == "null"
    assert one_filter("doc", "not.is.null").negated
    for value in ("true", "false", "unknown"):
        found = one_filter("active", f"is.{value}")
        assert (found.operator, found.value) == ("is", value)


@pytest.mark.parametrize(
    ("column", "expression", "reason"),
    [
        ("active", "is.maybe", "null, true, false"),
        ("active", "is.NULL", "null, true, false"),
        ("active", "is.", "null, true, false"),
        ("id", "is.true", "boolean column"),
        ("name", "is.false", "boolean column"),
    ],
)
def test_bad_is(column: str, expression: str, reason: str) -> None:
    problem = error((column, expression))
    assert problem.parameter == column
    assert reason in problem.reason


@pytest.mark.parametrize(
    ("name", "expression", "reason"),
    [
        ("nope", "eq.1", "unknown column 'nope'"),
        ("Id", "eq.1", "unknown column"),
        ("", "eq.1", "unknown column"),
        ("id", "", "column=operator.value"),
        ("id", "eq", "column=operator.value"),
        ("id", "42", "column=operator.value"),
        ("id", "not.", "column=operator.value"),
        ("id", "not.eq", "column=operator.value"),
        ("id", "not.not.eq.1", "unknown operator 'not'"),
        ("id", "equals.1", "unknown operator 'equals'"),
        ("id", "EQ.1", "unknown operator 'EQ'"),
        ("id", "cs.{1}", "unknown operator 'cs'"),
        ("id", ".1", "unknown operator ''"),
    ],
)
def test_bad_filter_names_its_parameter(name: str, expression: str, reason: str) -> None:
    problem = error(("id", "gt.0"), (name, expression), ("name", "eq.x"))
    assert problem.parameter == name
    assert reason in problem.reason


@pytest.mark.parametrize(
    ("column", "good", "bad"),
    [
        ("small", ["-32768", "32767", " 7 ", "+5", "-0", "0000000000000000000000000042"],
         ["32768", "-32769", "1.0", "1e3", "", " ", "0x10", "1_000", "٣", "１", "- 1", "1 2"]),
        ("id", ["-2147483648", "2147483647", "\t\n1\r\f\v"],
         ["2147483648", "-2147483649", "abc", "\u00a01", "1\u2003"]),
        ("big", ["-9223372036854775808", "9223372036854775807"],
         ["9223372036854775808", "-9223372036854775809", "9" * 5_000, "1" + "0" * 5_000]),
        ("score", ["1", "-1.5", "+.5", "5.", "1e3", "1E-3", " 2 ", "NaN", "nan", "Infinity",
                   "-Infinity", "+inf", "1e131071", "1e-16383", "0e999999999", "1" * 9_990],
         ["", ".", "e3", "1e", "1.2.3", "1,5", "0x10", "1e131072", "1e-16384", "NaN1",
          "+nan", "1e99999999999", "١", "1" * 9_990 + "x"]),
        ("height", ["1.5", "-3.4e38", "1e-40", "0e-999", "NaN", "-inf", "Infinity"],
         ["3.5e38", "1e39", "1e-46", "1.5x", "", "infinite", "nan(1)"]),
        ("ratio", ["1.7976931348623157e308", "4e-320", "0.0", "+infinity", "NAN", "5e-324"],
         ["1e309", "-1e309", "1e-400", "1e-324", "0x1p3", "+-1"]),
        ("active", ["true", "FALSE", "t", "f", "tr", "fal", "yes", "y", "n", "no", "on",
                    "off", "of", "1", "0", " True "],
         ["o", "", "2", "truex", "yess", "nope", "10", "ok", "ön", "\u212aT"]),
        ("tag", ["00000000-0000-0000-0000-000000000001", "{00000000-0000-0000-0000-00000000000A}",
                 "00000000000000000000000000000001", "0000-0000-0000-0000-0000-0000-0000-0001",
                 "a0EEBC999C0B4EF8BB6D6BB9BD380A11"],
         ["", "1", "00000000-0000-0000-0000-00000000000g", " 00000000-0000-0000-0000-000000000001",
          "{00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000001}",
          "00000000-0000-0000-0000-0000000000012", "00000000--0000-0000-0000-000000000001"]),
    ],
)  # fmt: skip
def test_values_are_checked_against_the_column_type(
    column: str, good: list[str], bad: list[str]
) -> None:
    for value in good:
        assert one_filter(column, f"eq.{value}").value == value
    for value in bad:
        for expression in (f"eq.{value}", f"not.gte.{value}", f'in.("{value}")'):
            problem = error(("select", "id"), (column, expression))
            assert problem.parameter == column, (value, expression)
            assert "is not a valid" in problem.reason


@pytest.mark.parametrize("expression", ["eq.a\x00b", "like.*\x00*", 'in.(a,"\x00")', "is.\x00"])
def test_nul_in_a_value_is_refused_for_every_type(expression: str) -> None:
    for column in ("name", "born", "doc", "active"):
        problem = error(("id", "gt.1"), (column, expression))
        assert problem.parameter == column
        assert "NUL" in problem.reason


def test_types_postgresql_checks_itself_pass_through() -> None:
    # Dates, timestamps, json and text are cast by PostgreSQL, which refuses bad values.
    for column in ("born", "seen_at", "doc", "name", "code", "tags"):
        assert one_filter(column, "eq.not a date").value == "not a date"


def test_long_numeric_values_do_not_backtrack() -> None:
    # A long run of digits that fails at its end once took seconds per value.
    value = "1" * (MAX_VALUE_LENGTH - 4) + "x"
    params = [("score", f"eq.{value}")] * 50 + [("ratio", f"eq.{value}")] * 50
    started = time.perf_counter()
    for param in params:
        problem = error(param)
        assert problem.parameter == param[0]
        assert "is not a valid" in problem.reason
    assert time.perf_counter() - started < 0.5


# order


def test_default_order_is_the_primary_key() -> None:
    assert parse().order == (OrderTerm(COLUMNS[0]),)


def test_default_order_of_a_view_is_every_orderable_column() -> None:
    order = parse_query(VIEW, []).order
    assert [(t.column.name, t.descending, t.nulls) for t in order] == [
        ("id", False, None),
        ("name", False, None),
        ("age", False, None),
    ]


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        ("id", [("id", False, None)]),
        ("id.asc", [("id", False, None)]),
        ("id.desc", [("id", True, None)]),
        ("id.nullsfirst", [("id", False, "first")]),
        ("id.desc.nullslast", [("id", True, "last")]),
        ("name.asc.nullsfirst,id.desc", [("name", False, "first"), ("id", True, None)]),
        ("a.b.desc", [("a.b", True, None)]),
        ("a.b", [("a.b", False, None)]),
        ('"a,b".desc,x; drop table people',
         [("a,b", True, None), ("x; drop table people", False, None)]),
        ("doc,tags", [("doc", False, None), ("tags", False, None)]),
    ],
)  # fmt: skip
def test_order(order: str, expected: list[tuple[str, bool, str | None]]) -> None:
    terms = parse(("order", order)).order
    assert [(t.column.name, t.descending, t.nulls) for t in terms] == expected


@pytest.mark.parametrize(
    ("order", "reason"),
    [
        ("nope", "unknown column 'nope'"),
        ("id.down", "unknown column 'id.down'"),
        ("id.asc.desc", "two directions"),
        ("id.nullsfirst.nullslast", "two nulls"),
        ("payload", "has no order"),
        ("payload.desc", "has no order"),
        ("points", "has no order"),
        ("id,", "empty item"),
        ("", "empty item"),
        ("id;drop table people", "unknown column"),
    ],
)
def test_bad_order_names_order(order: str, reason: str) -> None:
    problem = error(("id", "gt.0"), ("order", order), ("select", "id"))
    assert problem.parameter == "order"
    assert reason in problem.reason


# limit


@pytest.mark.parametrize("limit", ["0", "1", "000", "999999999999999999"])
def test_limit(limit: str) -> None:
    assert parse(("limit", limit)).limit == int(limit)
    assert parse().limit is None


@pytest.mark.parametrize(
    "limit", ["", "-1", "+1", "1.5", "1e3", "ten", " 1", "1 ", "9" * 19, "١", "１", "0x10"]
)
def test_bad_limit_names_limit(limit: str) -> None:
    problem = error(("id", "gt.0"), ("limit", limit))
    assert problem.parameter == "limit"
    assert "non-negative integer" in problem.reason


def test_limit_may_not_exceed_the_configured_maximum() -> None:
    assert parse(("limit", "100"), max_limit=100).limit == 100
    problem = error(("limit", "101"), max_limit=100)
    assert (problem.parameter, problem.reason) == ("limit", "limit may be at most 100")


# the request as a whole


@pytest.mark.parametrize("name", ["select", "order", "limit"])
def test_reserved_parameters_once_only(name: str) -> None:
    value = {"select": "id", "order": "id", "limit": "1"}[name]
    problem = error((name, value), ("id", "gt.1"), (name, value))
    assert problem.parameter == name
    assert "more than once" in problem.reason


def test_parameter_count_is_capped() -> None:
    assert len(parse(*[("id", "gt.1")] * MAX_PARAMETERS).filters) == MAX_PARAMETERS
    problem = error(*[("id", "gt.1")] * (MAX_PARAMETERS + 1))
    assert problem.parameter == "query"
    started = time.perf_counter()
    assert error(*[("nope", "x")] * 10_000).parameter == "query"
    assert time.perf_counter() - started < 0.1


def test_value_and_name_lengths_are_capped() -> None:
    assert one_filter("name", "eq." + "x" * (MAX_VALUE_LENGTH - 3)).parameter == "name"
    problem = error(("name", "eq." + "x" * (MAX_VALUE_LENGTH - 2)))
    assert (problem.parameter, problem.reason) == ("name", "value longer than 10000 characters")
    assert error(("select", "id," * 40_000)).parameter == "select"
    long_name = "n" * 100_000
    problem = error((long_name, "eq.1"))
    assert problem.parameter == "n" * 100 + "..."
    assert problem.reason == "parameter name longer than 1000 characters"


@pytest.mark.parametrize(
    "params",
    [
        [("select", "x" * 9_000)],
        [("select", "id," + "x" * 9_000)],
        [("order", "x" * 9_000)],
        [("order", "id" + ".desc" * 1_800)],
        [("order", "id" + ".nullslast" * 900)],
        [("id", "x" * 9_000 + ".1")],
        [("x" * 900, "eq.1")],
        [("id", "eq." + "x" * 9_000)],
    ],
)
def test_errors_do_not_echo_long_client_text_whole(params: list[tuple[str, str]]) -> None:
    # An unknown 9,000-character column was quoted whole, twice in the problem: a 10 KB
    # request made a 20 KB answer.
    problem = error(*params)
    assert len(problem.reason) < 300, problem.reason[:50]


def test_filters_are_checked_before_select_and_select_before_limit() -> None:
    assert error(("id", "eq.x"), ("name", "bad.x")).parameter == "id"
    assert error(("id", "eq.1"), ("limit", "x"), ("select", "nope")).parameter == "select"


# build_sql: identifiers from the catalog, quoted; values only as arguments


HOSTILE = "'; DROP TABLE people; --"


def sql_of(*params: tuple[str, str], rendering: Rendering = Rendering.COLUMNS) -> str:
    sql, _ = build_sql(parse(*params), rendering)
    return sql


def test_values_never_reach_the_sql_text() -> None:
    params = [
        ("name", f"eq.{HOSTILE}"),
        ("name", f"not.like.*{HOSTILE}*"),
        ("name", f"ilike.{HOSTILE}"),
        ("name", f'in.("{HOSTILE}",$1,"$2::text")'),
        ("born", "gt.2000-01-01') OR (1=1"),
        ("id", "lt.7"),
        ("limit", "3"),
    ]
    for rendering in Rendering:
        sql, args = build_sql(parse(*params), rendering)
        assert "DROP" not in sql and "2000" not in sql and "1=1" not in sql and " 7" not in sql
        placeholders = re.findall(r"\$(\d+)", sql)
        if rendering is Rendering.CSV_LINE:
            # The null string is bound like any value, and used in every field.
            assert args.pop(0) == ""
            placeholders = [str(int(n) - 1) for n in placeholders if n != "1"]
        assert args == [
            HOSTILE,
            f"%{HOSTILE}%",
            HOSTILE,
            [HOSTILE, "$1", "$2::text"],
            "2000-01-01') OR (1=1",
            "7",
            3,
        ]
        assert placeholders == [str(i) for i in range(1, len(args) + 1)]


def test_conditions() -> None:
    sql, args = build_sql(
        parse(
            ("select", "id"),
            ("id", "gte.1"),
            ("name", "not.like.A*"),
            ("score", "not.in.(1,2.5)"),
            ("active", "not.is.true"),
            ("doc", "is.null"),
            ("seen_at", "lt.2024-01-01"),
            ("code", "neq.AB"),
        ),
        Rendering.COLUMNS,
    )
    assert sql == (
        'SELECT t."id" AS "id" FROM "public"."things" AS t WHERE '
        't."id" >= (SELECT CAST($1::text AS integer)) AND '
        'NOT (t."name"::text COLLATE "default" LIKE $2::text) AND '
        'NOT (t."score" IN (SELECT unnest((SELECT CAST($3::text[] AS numeric[]))))) AND '
        't."active" IS NOT TRUE AND '
        't."doc" IS NULL AND '
        't."seen_at" < (SELECT CAST($4::text AS timestamp with time zone)) AND '
        't."code" <> (SELECT CAST($5::text AS bpchar)) '
        'ORDER BY t."id" ASC'
    )
    assert args == ["1", "A%", ["1", "2.5"], "2024-01-01", "AB"]


def test_char_and_bit_values_are_cast_whole() -> None:
    # The catalog spells char(n) and bit(n) as bpchar and "bit" (format_type with -1):
    # CAST(x AS character) would be char(1), CAST(x AS bit) bit(1), cutting the value.
    sql, args = build_sql(
        parse(
            ("select", "id"),
            ("code", "eq.ABCD"),
            ("code", "in.(AB,CD)"),
            ("flags", "gt.101"),
            ("flags", "in.(1)"),
            ("codes", "eq.{AB}"),
        ),
        Rendering.COLUMNS,
    )
    assert sql.split(" WHERE ")[1] == (
        't."code" = (SELECT CAST($1::text AS bpchar)) AND '
        't."code" IN (SELECT unnest((SELECT CAST($2::text[] AS bpchar[])))) AND '
        't."flags" > (SELECT CAST($3::text AS "bit")) AND '
        't."flags" IN (SELECT unnest((SELECT CAST($4::text[] AS "bit"[])))) AND '
        't."codes" = (SELECT CAST($5::text AS bpchar[])) '
        'ORDER BY t."id" ASC'
    )
    assert args == ["ABCD", ["AB", "CD"], "101", ["1"], "{AB}"]


def test_identifiers_are_quoted() -> None:
    params = (
        ("select", '"a\\"b","x; drop table people",a.b,"a,b"'),
        ('a"b', "eq.1"),
        ("x; drop table people", "is.null"),
        ("order", '"a\\"b".desc.nullslast,x; drop table people'),
        ("limit", "2"),
    )
    sql = sql_of(*params)
    assert sql == (
        'SELECT t."a""b" AS "a""b", t."x; drop table people" AS "x; drop table people", '
        't."a.b" AS "a.b", t."a,b" AS "a,b" '
        'FROM "public"."things" AS t '
        'WHERE t."a""b" = (SELECT CAST($1::text AS text)) AND t."x; drop table people" IS NULL '
        'ORDER BY t."a""b" DESC NULLS LAST, t."x; drop table people" ASC LIMIT $2::bigint'
    )
    json_sql = sql_of(*params, rendering=Rendering.JSON_ROW)
    assert json_sql.startswith(
        'SELECT row_to_json(r.*)::text FROM "public"."things" AS t CROSS JOIN LATERAL '
        '(SELECT t."a""b" AS "a""b", t."x; drop table people" AS "x; drop table people", '
        't."a.b" AS "a.b", t."a,b" AS "a,b") AS r WHERE '
    )


def test_catalog_schema_and_relation_are_quoted() -> None:
    odd = Dataset(
        name='we"ird',
        schema='sch"ema',
        relation="rel; drop",
        kind="table",
        columns=(COLUMNS[0],),
        primary_key=(),
        estimated_rows=None,
    )
    sql, args = build_sql(parse_query(odd, []), Rendering.COLUMNS)
    assert sql == ('SELECT t."id" AS "id" FROM "sch""ema"."rel; drop" AS t ORDER BY t."id" ASC')
    assert args == []


def test_no_order_clause_without_orderable_columns() -> None:
    only_json = Dataset(
        name="j",
        schema="public",
        relation="j",
        kind="view",
        columns=(_column("payload", "json", orderable=False),),
        primary_key=(),
        estimated_rows=None,
    )
    sql, _ = build_sql(parse_query(only_json, []), Rendering.JSON_ROW)
    assert "ORDER BY" not in sql
