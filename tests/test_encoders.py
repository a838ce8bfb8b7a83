import csv
import io
import json

from exporter.pipeline.catalog import Column
from exporter.pipeline.encoders import ENCODERS, Encoder, Rendering, encoder_for_media_type
from exporter.pipeline.encoders.csv import CsvEncoder
from exporter.pipeline.encoders.ndjson import NdjsonEncoder

COLUMNS = (Column("id", "integer", "integer", "int4"), Column("text", "text", "text", "text"))


def test_registry_maps_formats_and_media_types() -> None:
    assert set(ENCODERS) == {"csv", "ndjson"}
    assert encoder_for_media_type("text/csv") is CsvEncoder
    assert encoder_for_media_type("application/x-ndjson") is NdjsonEncoder
    assert encoder_for_media_type("application/xml") is None
    for encoder in ENCODERS.values():
        assert issubclass(encoder, Encoder) and isinstance(encoder.rendering, Rendering)


def test_csv_joins_rendered_records_in_one_reused_buffer() -> None:
    encoder = CsvEncoder(COLUMNS)
    buffer = encoder.buffer
    encoder.begin()
    encoder.write_rows([("1,plain",), ('2,"a ""quoted"", comma"',), ('3,"two\nlines"',)])
    first = encoder.take()
    assert first == 'id,text\n1,plain\n2,"a ""quoted"", comma"\n3,"two\nlines"\n'
    assert list(csv.reader(io.StringIO(first)))[2] == ["2", 'a "quoted", comma']
    assert encoder.pending() == 0
    encoder.write_rows([("4,é 🎉",)])
    assert encoder.take() == "4,é 🎉\n"
    assert encoder.buffer is buffer


def test_csv_header_is_quoted_as_copy_quotes_it() -> None:
    odd = (
        Column("a,b", "text", "text", "text"),
        Column('say "x"', "text", "text", "text"),
        Column("=cmd", "text", "text", "text"),
    )
    encoder = CsvEncoder(odd, [("crlf", "true")])
    encoder.begin()
    assert encoder.take() == '"a,b","say ""x""",=cmd\r\n'
    excel = CsvEncoder(odd, [("profile", "excel"), ("delimiter", ";")])
    excel.begin()
    assert excel.take() == '\ufeffa,b;"say ""x""";\'=cmd\r\n'
    assert CsvEncoder(odd, [("header", "false")]).copy_options() == {
        "format": "csv",
        "header": False,
    }
    assert excel.copy_options() is None  # formula escaping is beyond COPY


def test_formula_escape_rule() -> None:
    from exporter.pipeline.encoders.csv import needs_formula_escape

    for value in ("=1+1", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "\nx", "  =x", " \t", "\v-1"):
        assert needs_formula_escape(value), value
    # After any Unicode space (and the invisible ones), and full-width (issue 14).
    for value in ("\u00a0=x", "\u3000+1", "\u2003@x", "\ufeff=1", "\u200b-1", "\uff1d1", "\uff20x"):
        assert needs_formula_escape(value), value
    for value in ("", "plain", " plain", "a=b", "1-2", "'=x", "\u00a0", "x\uff1d1", "\u00a0x=1"):
        assert not needs_formula_escape(value), value


def test_ndjson_joins_rendered_lines() -> None:
    encoder = NdjsonEncoder(COLUMNS)
    encoder.begin()
    encoder.write_rows([])
    assert encoder.pending() == 0
    encoder.write_rows([('{"id":1,"text":"a"}',), ('{"id":2,"text":null}',)])
    lines = encoder.take().splitlines()
    assert [json.loads(line) for line in lines] == [{"id": 1, "text": "a"}, {"id": 2, "text": None}]


def test_csv_counts_lines_after_the_header_across_block_boundaries() -> None:
    text = b'id,"na""me"\n1,"two\nlines"\n2,"say ""hi"""\n3,\n'
    for size in range(1, len(text) + 1):
        encoder = CsvEncoder(COLUMNS)
        blocks = [text[i : i + size] for i in range(0, len(text), size)]
        # The line break inside a field counts: an export's exact count comes from COPY.
        assert sum(encoder.count_records(block) for block in blocks) == 4, size


def test_crlf_ends_records_only_across_chunk_boundaries() -> None:
    copy_output = b'id,"na""me"\n1,"two\nlines"\n2,"say ""hi"""\n3,\n4,"\r\n"\n'
    expected = b'id,"na""me"\r\n1,"two\nlines"\r\n2,"say ""hi"""\r\n3,\r\n4,"\r\n"\r\n'
    for size in range(1, len(copy_output) + 1):
        encoder = CsvEncoder(COLUMNS, [("crlf", "true")])
        chunks = [copy_output[i : i + size] for i in range(0, len(copy_output), size)]
        assert b"".join(encoder.convert(chunk) for chunk in chunks) == expected, size
    assert CsvEncoder(COLUMNS).convert(copy_output) == copy_output
