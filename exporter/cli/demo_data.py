"""Demo data: a million-row table of mixed types, a small one, and a view."""

from exporter.db.pool import Pool

SEED_SQL = [
    """
    CREATE TABLE public.customers (
        id integer PRIMARY KEY,
        name text NOT NULL,
        email text,
        country char(2),
        signed_up date NOT NULL,
        active boolean NOT NULL
    )
    """,
    """
    INSERT INTO public.customers
    SELECT i,
           'Customer ' || i || CASE WHEN i % 7 = 0 THEN ', "the best"' ELSE '' END,
           CASE WHEN i % 10 = 0 THEN NULL ELSE 'customer' || i || '@example.com' END,
           (ARRAY['DE', 'FR', 'JP', 'US', 'BR'])[1 + i % 5],
           date '2020-01-01' + (i % 1500),
           i % 3 <> 0
    FROM generate_series(1, 1000) AS i
    """,
    """
    CREATE TABLE public.events (
        id bigint NOT NULL,
        occurred_at timestamptz NOT NULL,
        customer_id integer NOT NULL,
        kind text NOT NULL,
        amount numeric(12, 2),
        ratio double precision,
        payload jsonb,
        note text
    )
    """,
    """
    INSERT INTO public.events
    SELECT i,
           timestamptz '2024-01-01 00:00:00+00' + i * interval '31 seconds',
           1 + i % 1000,
           (ARRAY['view', 'click', 'purchase', 'refund'])[1 + i % 4],
           CASE WHEN i % 13 = 0 THEN NULL ELSE round((i % 100000) / 7.0, 2) END,
           i / 3.0,
           jsonb_build_object('session', md5(i::text), 'items', i % 5),
           CASE i % 5 WHEN 0 THEN NULL WHEN 1 THEN '' WHEN 2 THEN 'says "hi", twice'
                      ELSE 'line one' || chr(10) || 'line two' END
    FROM generate_series(1, $1::integer) AS i
    """,
    # After the rows: one index build is faster than a million index insertions.
    "ALTER TABLE public.events ADD PRIMARY KEY (id)",
    """
    CREATE OR REPLACE VIEW public.daily_purchases AS
    SELECT date_trunc('day', occurred_at)::date AS day, count(*) AS purchases,
           sum(amount) AS total
    FROM public.events WHERE kind = 'purchase' GROUP BY 1
    """,
    "ANALYZE public.customers",
    "ANALYZE public.events",
]


_SEEDED = "SELECT to_regclass('public.events') IS NOT NULL"


async def is_seeded(pool: Pool) -> bool:
    async with pool.connection() as connection:
        return bool(await connection.fetchval(_SEEDED))


async def seed(pool: Pool, rows: int = 1_000_000) -> bool:
    """Create and fill the demo tables unless they exist; True if it did.

    One transaction: a seed that is interrupted leaves nothing, and the next run starts over;
    one that completed is reused as it is (its row count included).
    """
    async with pool.connection() as connection, connection.transaction():
        if await connection.fetchval(_SEEDED):
            return False
        for statement in SEED_SQL:
            if "$1" in statement:
                await connection.execute(statement, rows)
            else:
                await connection.execute(statement)
    return True
