import asyncio

from exporter.db.pool import Pool
from exporter.pipeline.catalog import find_dataset
from exporter.pipeline.encoders import ENCODERS
from exporter.pipeline.query import parse_query
from exporter.pipeline.stream import ExportStream, Outcome
from exporter.settings import Settings
from tests.support.database import ExportDatabase


def _chunks(url: str, fmt: str, limit: int) -> tuple[list[bytes], ExportStream]:
    settings = Settings(database_url=url, batch_rows=5000, chunk_bytes=32 * 1024)

    async def run() -> tuple[list[bytes], ExportStream]:
        pool = await Pool.open(url, size=1)
        try:
            dataset = await find_dataset(pool, ("public",), "big")
            assert dataset is not None
            query = parse_query(dataset, [("limit", str(limit))])
            stream = ExportStream(query, ENCODERS[fmt], pool, settings, "exporter test")
            await stream.open()
            return [chunk async for chunk in stream.chunks()], stream
        finally:
            await pool.close()

    return asyncio.run(run())


def test_output_is_coalesced_into_chunks_of_about_chunk_bytes(database: ExportDatabase) -> None:
    for fmt in ("csv", "ndjson"):
        chunks, stream = _chunks(database.url, fmt, 100_000)
        sizes = [len(chunk) for chunk in chunks]
        # Not one write per row, and not one per 5000-row batch either.
        assert all(32 * 1024 <= size < 48 * 1024 for size in sizes[:-1]), sizes
        assert len(sizes) > 20
        assert stream.outcome is Outcome.COMPLETED
        assert stream.rows == 100_000 and stream.bytes == sum(sizes)
        lines = b"".join(chunks).count(b"\n")
        assert lines == 100_000 + (1 if fmt == "csv" else 0)


def test_a_small_export_is_one_chunk(database: ExportDatabase) -> None:
    chunks, stream = _chunks(database.url, "csv", 3)
    assert chunks == [
        b"id,label,amount,at\n"
        b"1,row 1,0.14285714285714285714,2024-01-01 00:00:01+00\n"
        b"2,row 2,0.28571428571428571429,2024-01-01 00:00:02+00\n"
        b"3,row 3,0.42857142857142857143,2024-01-01 00:00:03+00\n"
    ]
    assert stream.rows == 3
