"""Change-log positions become visible in order: a follower reading "everything after my position" skips nothing.

A position from a plain sequence can commit after a higher one; the
retrieval schema hands positions out under a lock held until commit.  The
first test shows the hazard on a plain sequence table and its absence on
the real one, in the same interleaving; the second hammers the real one
with concurrent writers that hold their transactions open for a random
while, against a follower polling by position.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg

from llm_warden.plugins.retrieval.pgstore import PostgresStore

INSERT = "INSERT INTO {table} (tenant, doc_id, op, at) VALUES ('acme', $1, 'upsert', 0) RETURNING pos"


async def _waiting(admin: asyncpg.Connection, pid: int) -> bool:
    return bool(await admin.fetchval("SELECT count(*) > 0 FROM pg_locks WHERE pid = $1 AND NOT granted", pid))


async def _after(conn: asyncpg.Connection, table: str, pos: int) -> list[int]:
    return [r[0] for r in await conn.fetch(f"SELECT pos FROM {table} WHERE pos > $1 ORDER BY pos", pos)]


async def test_a_late_commit_of_a_lower_position_is_never_skipped(pg_dsn: str) -> None:
    c1, c2, reader = [await asyncpg.connect(pg_dsn) for _ in range(3)]
    try:
        # The hazard, on a table whose positions come from a sequence alone.
        await reader.execute("CREATE SEQUENCE naive_seq; CREATE TABLE naive_changes (pos bigint PRIMARY KEY DEFAULT nextval('naive_seq'), "
                             "tenant text, doc_id text, op text, at float8)")
        t1 = c1.transaction()
        await t1.start()
        low = await c1.fetchval(INSERT.format(table="naive_changes"), "a")
        async with c2.transaction():
            high = await c2.fetchval(INSERT.format(table="naive_changes"), "b")
        assert high > low
        seen = await _after(reader, "naive_changes", 0)
        assert seen == [high]  # the follower moves to `high` ...
        await t1.commit()
        assert await _after(reader, "naive_changes", max(seen)) == []  # ... and never sees `low`: skipped

        # The same interleaving on the retrieval change log: the second writer waits for the first one's commit.
        t1 = c1.transaction()
        await t1.start()
        first = await c1.fetchval(INSERT.format(table="retrieval_changes"), "a")

        async def second() -> int:
            async with c2.transaction():
                return int(await c2.fetchval(INSERT.format(table="retrieval_changes"), "b"))

        task = asyncio.create_task(second())
        for _ in range(500):  # the second writer blocks on the change-log lock
            if await _waiting(reader, c2.get_server_pid()):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the second writer never waited for the first one's commit")
        assert await _after(reader, "retrieval_changes", 0) == []
        await t1.commit()
        last = await task
        assert last > first
        assert await _after(reader, "retrieval_changes", 0) == [first, last]
    finally:
        for c in (c1, c2, reader):
            await c.close()


async def test_concurrent_writers_holding_transactions_open_never_let_a_follower_skip(pg_dsn: str) -> None:
    writers = [await asyncpg.connect(pg_dsn) for _ in range(6)]
    store = PostgresStore(pg_dsn, pool_max=2)
    await store.open()
    rng = random.Random(7)
    done = False
    seen: list[int] = []

    async def writer(conn: asyncpg.Connection, w: int) -> None:
        for i in range(25):
            tx = conn.transaction()
            await tx.start()
            await conn.fetchval(INSERT.format(table="retrieval_changes"), f"w{w}-{i}")
            await asyncio.sleep(rng.random() * 0.004)
            if rng.random() < 0.1:
                await tx.rollback()  # a gap: that position never commits
            else:
                await tx.commit()

    async def follower() -> None:
        pos = 0
        while True:
            finished = done  # read before the batch: a batch read after the writers finished sees all they committed
            batch = await store.changes_after(pos, 7)
            for ch in batch.changes:
                assert ch.seq > pos
                seen.append(ch.seq)
                pos = ch.seq
            if finished and not batch.changes:
                return
            await asyncio.sleep(0)

    try:
        follow = asyncio.create_task(follower())
        await asyncio.gather(*(writer(c, i) for i, c in enumerate(writers)))
        done = True
        await follow
        committed = [r[0] for r in await writers[0].fetch("SELECT pos FROM retrieval_changes ORDER BY pos")]
        assert seen == committed and len(committed) > 100
    finally:
        await store.close()
        for c in writers:
            await c.close()
