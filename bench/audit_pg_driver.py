"""Which PostgreSQL driver for the audit log: asyncpg against psycopg 3 (+ psycopg-pool), on the append path.

    python bench/audit_pg_driver.py                      # smoke sizes (about a minute)
    python bench/audit_pg_driver.py --batches 200 --singles 2000

DSN: ``$WARDEN_BENCH_DSN`` or ``postgresql://postgres@127.0.0.1:5432/test``.
Each run works in a schema of its own (created, then dropped).  The records
are real projected exchanges (``Projector.exchange``, ~3 KB each), hashed
with :func:`proxy.audit.chain.leaf_hash` as the store does.

Two shapes of append, each with the chain-head update in the same transaction:

1. **batch**: ``--batch`` records (default 256) per transaction, one writer
   (one chain).  Ways to send them:

   - ``cte``: one statement: ``WITH h AS (UPDATE chain ... WHERE seq = old
     RETURNING ...) INSERT ... SELECT FROM h, unnest($arrays)`` (autocommit:
     the statement is its own transaction, one round trip);
   - ``executemany``: ``BEGIN``, one INSERT per record (the drivers pipeline
     them), the UPDATE, ``COMMIT``;
   - ``copy``: ``BEGIN``, binary ``COPY``, the UPDATE, ``COMMIT``.

2. **single**: one record per transaction, one writer, back to back, fsynced
   commit (``synchronous_commit = on``): p50/p99 of the call.  ``cte`` as
   above; ``tx``: ``BEGIN``/INSERT/UPDATE/``COMMIT`` (psycopg sends the four in
   one pipeline, asyncpg one after another); also 16 writers (16 connections,
   16 chains) at once: records/s.

Besides wall time, the client's own CPU per record (``time.process_time``):
on a 2-core machine that CPU is taken from PostgreSQL and the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_warden.proxy.audit.chain import genesis_hash, leaf_hash  # noqa: E402
from llm_warden.proxy.audit.record import Prepared, Projector  # noqa: E402
from tests.proxy.audit.helpers import make_exchange  # noqa: E402

PSY_BINARY = os.environ.get("PSY_BINARY", "1") == "1"
DSN = os.environ.get("WARDEN_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/test")

SCHEMA = """
CREATE TABLE chains (chain_id bigint PRIMARY KEY, seq bigint NOT NULL, hash bytea NOT NULL);
CREATE TABLE records (
    chain_id bigint NOT NULL, seq bigint NOT NULL, ts_us bigint NOT NULL, kind text NOT NULL,
    request_id text, tenant text, subject text, tools text, call_ids text, status integer,
    prev_hash bytea NOT NULL, hash bytea NOT NULL, body bytea NOT NULL,
    PRIMARY KEY (chain_id, seq)
);
ALTER TABLE records ALTER COLUMN body SET COMPRESSION lz4;
CREATE INDEX records_request ON records (request_id);
CREATE INDEX records_tenant_ts ON records (tenant, ts_us);
CREATE INDEX records_ts ON records (ts_us);
"""
COLS = "(chain_id, seq, ts_us, kind, request_id, tenant, subject, tools, call_ids, status, prev_hash, hash, body)"
COLNAMES = [c.strip() for c in COLS.strip("()").split(",")]
CTE = (
    "WITH h AS (UPDATE chains SET seq = {p}2, hash = {p}3 WHERE chain_id = {p}1 AND seq = {p}4 RETURNING chain_id) "
    f"INSERT INTO records {COLS} SELECT h.chain_id, r.* FROM h, unnest("
    "{p}5::bigint[], {p}6::bigint[], {p}7::text[], {p}8::text[], {p}9::text[], {p}10::text[], {p}11::text[], {p}12::text[], "
    "{p}13::integer[], {p}14::bytea[], {p}15::bytea[], {p}16::bytea[]) AS r"
)
INSERT = f"INSERT INTO records {COLS} VALUES ({{p}}1, {{p}}2, {{p}}3, {{p}}4, {{p}}5, {{p}}6, {{p}}7, {{p}}8, {{p}}9, {{p}}10, {{p}}11, {{p}}12, {{p}}13)"
UPDATE = "UPDATE chains SET seq = {p}2, hash = {p}3 WHERE chain_id = {p}1 AND seq = {p}4"


def asyncpg_sql(s: str) -> str:
    return s.replace("{p}", "$")


def psycopg_sql(s: str) -> str:
    """The statement with psycopg's named placeholders (``%(pN)s``); pass :func:`named` of the arguments."""
    return re.sub(r"\{p\}(\d+)", r"%(p\1)s", s)


def named(*args: Any) -> dict[str, Any]:
    return {f"p{i}": v for i, v in enumerate(args, 1)}


class Chain:
    """An in-memory head: appends compute the rows and the new head; ``commit`` makes it current."""

    def __init__(self, chain_id: int) -> None:
        self.id = chain_id
        self.seq = 0
        self.hash = genesis_hash(f"bench/{chain_id}")

    def rows(self, preps: Sequence[Prepared]) -> tuple[list[tuple[Any, ...]], int, bytes]:
        seq, h = self.seq, self.hash
        out = []
        for p in preps:
            seq += 1
            prev, h = h, leaf_hash(h, seq, p.body)
            out.append((self.id, seq, p.ts_us, p.kind, p.request_id, p.tenant, p.subject, p.tools, p.call_ids, p.status, prev, h, p.body))
        return out, seq, h

    def arrays(self, rows: list[tuple[Any, ...]]) -> list[list[Any]]:
        return [[r[i] for r in rows] for i in range(1, 13)]


# -- asyncpg -----------------------------------------------------------------


async def asyncpg_append(conn: Any, chain: Chain, preps: Sequence[Prepared], how: str) -> None:
    rows, seq, h = chain.rows(preps)
    old = chain.seq
    if how == "cte":
        status = await conn.execute(asyncpg_sql(CTE), chain.id, seq, h, old, *chain.arrays(rows))
        assert status == f"INSERT 0 {len(rows)}", status
    else:
        async with conn.transaction():
            if how == "executemany":
                await conn.executemany(asyncpg_sql(INSERT), rows)
            elif how == "copy":
                await conn.copy_records_to_table("records", records=rows, columns=COLNAMES)
            else:  # "tx": one row
                await conn.execute(asyncpg_sql(INSERT), *rows[0])
            status = await conn.execute(asyncpg_sql(UPDATE), chain.id, seq, h, old)
            assert status == "UPDATE 1", status
    chain.seq, chain.hash = seq, h


async def asyncpg_connect(schema: str) -> Any:
    import asyncpg

    return await asyncpg.connect(DSN, server_settings={"search_path": schema})


# -- psycopg -----------------------------------------------------------------


async def psycopg_append(conn: Any, chain: Chain, preps: Sequence[Prepared], how: str) -> None:
    rows, seq, h = chain.rows(preps)
    old = chain.seq
    if how == "cte":
        cur = await conn.execute(psycopg_sql(CTE), named(chain.id, seq, h, old, *chain.arrays(rows)), binary=PSY_BINARY)
        assert cur.rowcount == len(rows), cur.rowcount
    elif how == "tx":
        async with conn.pipeline():
            await conn.execute("BEGIN")
            await conn.execute(psycopg_sql(INSERT), named(*rows[0]), binary=True)
            cur = await conn.execute(psycopg_sql(UPDATE), named(chain.id, seq, h, old), binary=True)
            await conn.execute("COMMIT")
        assert cur.rowcount == 1
    else:
        async with conn.transaction():
            async with conn.cursor(binary=True) as cur:
                if how == "executemany":
                    await cur.executemany(psycopg_sql(INSERT), [named(*r) for r in rows])
                else:
                    async with cur.copy(f"COPY records {COLS} FROM STDIN (FORMAT BINARY)") as cp:
                        cp.set_types(["int8", "int8", "int8", "text", "text", "text", "text", "text", "text", "int4", "bytea", "bytea", "bytea"])
                        for r in rows:
                            await cp.write_row(r)
                await cur.execute(psycopg_sql(UPDATE), named(chain.id, seq, h, old))
                assert cur.rowcount == 1
    chain.seq, chain.hash = seq, h


async def psycopg_connect(schema: str) -> Any:
    import psycopg

    return await psycopg.AsyncConnection.connect(DSN, autocommit=True, options=f"-c search_path={schema}")


async def psycopg_pool_probe(schema: str, n: int) -> float:
    """µs per getconn/putconn round of psycopg-pool (what a pooled store pays per commit besides the commit)."""
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(DSN, min_size=1, max_size=4, kwargs={"autocommit": True, "options": f"-c search_path={schema}"}, open=False)
    await pool.open(wait=True)
    t0 = time.perf_counter()
    for _ in range(n):
        async with pool.connection():
            pass
    dt = time.perf_counter() - t0
    await pool.close()
    return dt / n * 1e6


async def asyncpg_pool_probe(schema: str, n: int) -> float:
    import asyncpg

    pool = await asyncpg.create_pool(DSN, min_size=1, max_size=4, server_settings={"search_path": schema})
    t0 = time.perf_counter()
    for _ in range(n):
        async with pool.acquire():
            pass
    dt = time.perf_counter() - t0
    await pool.close()
    return dt / n * 1e6


DRIVERS: dict[str, tuple[Callable[[str], Awaitable[Any]], Callable[..., Awaitable[None]]]] = {
    "asyncpg": (asyncpg_connect, asyncpg_append),
    "psycopg": (psycopg_connect, psycopg_append),
}


# -- the cells -----------------------------------------------------------------


async def setup(schema: str) -> None:
    conn = await asyncpg_connect("public")
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"SET search_path = {schema}")
        await conn.execute(SCHEMA)
    finally:
        await conn.close()


async def teardown(schema: str) -> None:
    conn = await asyncpg_connect("public")
    try:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


_chain_ids = iter(range(1, 1 << 30))


async def new_chain(conn_driver: str, conn: Any) -> Chain:
    chain = Chain(next(_chain_ids))
    if conn_driver == "asyncpg":
        await conn.execute("INSERT INTO chains VALUES ($1, 0, $2)", chain.id, chain.hash)
    else:
        await conn.execute("INSERT INTO chains VALUES (%s, 0, %s)", (chain.id, chain.hash))
    return chain


async def batch_cell(driver: str, how: str, schema: str, preps: list[Prepared], batches: int, size: int) -> tuple[float, float]:
    connect, append = DRIVERS[driver]
    conn = await connect(schema)
    chain = await new_chain(driver, conn)
    await append(conn, chain, preps[:size], how)  # warm: statement preparation, type introspection
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(batches):
        start = (i * size) % (len(preps) - size)
        await append(conn, chain, preps[start : start + size], how)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    await conn.close()
    n = batches * size
    return n / dt, cpu / n * 1e6


async def single_cell(driver: str, how: str, schema: str, preps: list[Prepared], n: int) -> tuple[float, float, float]:
    connect, append = DRIVERS[driver]
    conn = await connect(schema)
    chain = await new_chain(driver, conn)
    for p in preps[:20]:
        await append(conn, chain, [p], how)
    xs = []
    c0 = time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        await append(conn, chain, [preps[i % len(preps)]], how)
        xs.append(time.perf_counter() - t0)
    cpu = time.process_time() - c0
    await conn.close()
    xs.sort()
    return xs[len(xs) // 2] * 1e6, xs[int(len(xs) * 0.99)] * 1e6, cpu / n * 1e6


async def concurrent_cell(driver: str, how: str, schema: str, preps: list[Prepared], n: int, writers: int) -> float:
    connect, append = DRIVERS[driver]
    conns = [await connect(schema) for _ in range(writers)]
    chains = [await new_chain(driver, c) for c in conns]
    it = iter(range(n))

    async def worker(k: int) -> None:
        for i in it:
            await append(conns[k], chains[k], [preps[i % len(preps)]], how)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(writers)))
    dt = time.perf_counter() - t0
    for c in conns:
        await c.close()
    return n / dt


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256, help="records per batch transaction")
    ap.add_argument("--batches", type=int, default=60, help="batch transactions per cell")
    ap.add_argument("--singles", type=int, default=600, help="single-record commits per cell")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median is printed)")
    args = ap.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    pj = Projector("redacted", pii=["email", "phone", "card"], provider="openai")
    preps = [pj.exchange(make_exchange()) for _ in range(max(args.batch * 4, 1024))]
    size = statistics.mean(len(p.body) for p in preps)
    print(f"records: {len(preps)} distinct, {size:.0f} bytes mean; batch {args.batch}; rounds {args.rounds}; {DSN.split('@')[-1]}")

    batch_res: dict[tuple[str, str], list[tuple[float, float]]] = {}
    single_res: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    conc_res: dict[tuple[str, str], list[float]] = {}
    pool_res: dict[str, list[float]] = {}
    for r in range(args.rounds):
        schema = f"bench_pgdrv_{secrets.token_hex(4)}"
        await setup(schema)
        try:
            order = list(DRIVERS) if r % 2 == 0 else list(reversed(DRIVERS))
            for driver in order:
                for how in ("cte", "executemany", "copy"):
                    batch_res.setdefault((driver, how), []).append(await batch_cell(driver, how, schema, preps, args.batches, args.batch))
                for how in ("cte", "tx"):
                    single_res.setdefault((driver, how), []).append(await single_cell(driver, how, schema, preps, args.singles))
                    conc_res.setdefault((driver, how), []).append(await concurrent_cell(driver, how, schema, preps, args.singles * 4, 16))
            pool_res.setdefault("asyncpg", []).append(await asyncpg_pool_probe(schema, 2000))
            pool_res.setdefault("psycopg", []).append(await psycopg_pool_probe(schema, 2000))
        finally:
            await teardown(schema)

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    print(f"\n1. batch append ({args.batch} records + chain update per transaction, one chain)")
    print(f"{'driver':<9} {'how':<12} {'records/s':>10} {'client CPU µs/record':>22}")
    for (driver, how), xs in batch_res.items():
        print(f"{driver:<9} {how:<12} {med([x[0] for x in xs]):>10,.0f} {med([x[1] for x in xs]):>22.1f}")
    print("\n2. single-record commit (chain update in the same transaction, synchronous_commit = on)")
    print(f"{'driver':<9} {'how':<6} {'p50 µs':>8} {'p99 µs':>8} {'client CPU µs':>14} {'16 writers rec/s':>17}")
    for (driver, how), ys in single_res.items():
        print(
            f"{driver:<9} {how:<6} {med([y[0] for y in ys]):>8.0f} {med([y[1] for y in ys]):>8.0f} {med([y[2] for y in ys]):>14.1f}"
            f" {med(conc_res[(driver, how)]):>17,.0f}"
        )
    print("\n3. pool acquire + release, µs: " + ", ".join(f"{d} {med(v):.1f}" for d, v in pool_res.items()))


if __name__ == "__main__":
    asyncio.run(main())
