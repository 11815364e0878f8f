"""Audit on PostgreSQL beside SQLite, in one run: throughput and the latency a request gains.

    python bench/audit_pg.py                            # smoke sizes (a minute or so)
    python bench/audit_pg.py --records 30000 --requests 1000

DSN: ``$WARDEN_BENCH_DSN`` or ``postgresql://postgres@127.0.0.1:5432/test``;
each PostgreSQL cell runs in a fresh schema (migrated, then dropped), each
SQLite cell in a fresh file in a temp dir.  Both stores
get the same records (real projected exchanges, ~3 KB).

1. Throughput, records/s with ``--writers`` concurrent writers: ``batch`` and
   ``sync``, end to end (``record_exchange``: projection on the event loop,
   queue, group commit) and store only (records projected beforehand).
   Goal for PostgreSQL ``batch``: at least 10,000 records/s on this 2-core
   machine, where PostgreSQL shares the cores with the benchmark.
2. Added latency: each simulated request waits for a provider (0.5-1.5x
   ``--upstream-ms``, the same seeded sequence in every cell, kept by another
   process: ``bench/delay.py``) and then records its exchange; p50/p99 of the
   whole request minus audit off, and of the ``record_exchange`` call itself,
   at concurrency 1 and 16.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from bench.delay import Delays  # noqa: E402
from llm_warden.proxy.audit.chain import seed_bytes  # noqa: E402
from llm_warden.proxy.audit.postgres import PostgresAuditLog  # noqa: E402
from llm_warden.proxy.audit.sqlite import SQLiteAuditLog  # noqa: E402
from llm_warden.proxy.config import AuditConfig, DatabaseConfig  # noqa: E402
from llm_warden.proxy.db.migrate import COMPONENTS, migrate  # noqa: E402
from tests.proxy.audit.helpers import make_exchange  # noqa: E402

DSN = os.environ.get("WARDEN_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/test")
UPSTREAM_KEY = "sk-bench-upstream-key-0123456789abcdef"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class Stores:
    """Makes a started store of either kind, each in a place of its own; cleans up after it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.key = tmp / "fleet.key"
        self.key.write_text(base64.b64encode(seed_bytes(Ed25519PrivateKey.generate())).decode())
        self.schemas: list[str] = []

    async def make(self, kind: str, **cfg: Any) -> Any:
        tag = secrets.token_hex(4)
        if kind == "sqlite":
            log: Any = SQLiteAuditLog(AuditConfig(**cfg), self.tmp / f"{tag}.db", upstream_key=UPSTREAM_KEY, provider="openai")
        else:
            schema = f"bench_audit_{tag}"
            admin = await asyncpg.connect(DSN)
            try:
                await admin.execute(f"CREATE SCHEMA {schema}")
            finally:
                await admin.close()
            self.schemas.append(schema)
            dsn = f"{DSN}{'&' if '?' in DSN else '?'}options=-csearch_path%3D{schema}"
            await migrate(dsn, "audit", COMPONENTS["audit"])
            log = PostgresAuditLog(
                AuditConfig(backend="postgres", signing_key_file=str(self.key), **cfg),
                DatabaseConfig(pool_max=4),
                dsn=dsn,
                upstream_key=UPSTREAM_KEY,
                provider="openai",
            )
        await log.start()
        return log

    async def close(self) -> None:
        admin = await asyncpg.connect(DSN)
        try:
            for schema in self.schemas:
                await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await admin.close()


async def throughput(stores: Stores, kind: str, mode: str, n: int, writers: int, prepared: bool) -> tuple[float, int]:
    log = await stores.make(kind, durability=mode, checkpoint_every=10_000)
    exs = [make_exchange() for _ in range(n)]
    preps = [log.projector.exchange(e) for e in exs] if prepared else []
    it = iter(range(n))
    commits = 0

    def count(_s: float, _n: int) -> None:
        nonlocal commits
        commits += 1

    log.on_commit = count

    async def worker() -> None:
        for i in it:
            if prepared:
                await log._submit(preps[i], wait=mode == "sync")
            else:
                await log.record_exchange(exs[i])
            await asyncio.sleep(0)  # a request handler yields at least once per request (its network I/O)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(writers)))
    await log.stop()
    dt = time.perf_counter() - t0
    assert log.records_written == n, (log.records_written, n)
    return n / dt, commits


async def latency(stores: Stores, kind: str | None, mode: str, n: int, concurrency: int, upstream_s: float) -> tuple[list[float], list[float]]:
    log = await stores.make(kind, durability=mode) if kind is not None else None
    exs = [make_exchange() for _ in range(n)]
    rnd = random.Random(7)
    waits = [upstream_s * rnd.uniform(0.5, 1.5) for _ in range(n)]
    it = iter(range(n))
    out: list[float] = []
    calls: list[float] = []
    provider = Delays()
    await provider.start()

    async def worker(k: int) -> None:
        await provider.sleep(upstream_s * k / concurrency)
        for i in it:
            t0 = time.perf_counter()
            await provider.sleep(waits[i])
            t1 = time.perf_counter()
            if log is not None:
                await log.record_exchange(exs[i])
            t2 = time.perf_counter()
            out.append(t2 - t0)
            calls.append(t2 - t1)

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    await provider.close()
    if log is not None:
        await log.stop()
    return out, calls


async def commit_floor(n: int, gap_s: float) -> tuple[float, float]:
    """One 3 KB insert per fsynced commit on a bare table, one statement, after ``gap_s`` idle: what the server costs."""
    conn = await asyncpg.connect(DSN)
    try:
        table = f"bench_floor_{secrets.token_hex(4)}"
        await conn.execute(f"CREATE TABLE public.{table} (b bytea)")
        xs = []
        body = b"x" * 3000
        try:
            for _ in range(n):
                await asyncio.sleep(gap_s)
                t0 = time.perf_counter()
                await conn.execute(f"INSERT INTO public.{table} VALUES ($1)", body)
                xs.append(time.perf_counter() - t0)
        finally:
            await conn.execute(f"DROP TABLE public.{table}")
    finally:
        await conn.close()
    return pct(xs, 0.5), pct(xs, 0.99)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=8000, help="records per throughput cell")
    ap.add_argument("--writers", type=int, default=64, help="concurrent writers in the throughput cells")
    ap.add_argument("--requests", type=int, default=400, help="requests per latency cell")
    ap.add_argument("--upstream-ms", type=float, default=20.0, help="mean simulated provider time per request")
    args = ap.parse_args()
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    tmp = Path(tempfile.mkdtemp(prefix="warden-audit-pg-bench-"))
    stores = Stores(tmp)
    admin = await asyncpg.connect(DSN)
    server = await admin.fetchval("SHOW server_version")
    sc = await admin.fetchval("SHOW synchronous_commit")
    await admin.close()
    print(f"audit on PostgreSQL {server} (synchronous_commit default {sc}) beside SQLite ({loop_name}; SQLite files in {tmp})\n")
    try:
        print(f"1. Throughput, {args.records} records, {args.writers} concurrent writers (commits = transactions)")
        print(f"   {'store':<10}{'durability':<12}{'path':<26}{'records/s':>11}{'commits':>9}{'rec/commit':>12}")
        for mode in ("batch", "sync"):
            for prepared in (False, True):
                for kind in ("postgres", "sqlite"):
                    rate, commits = await throughput(stores, kind, mode, args.records, args.writers, prepared)
                    label = "store only (prepared)" if prepared else "record_exchange (e2e)"
                    print(f"   {kind:<10}{mode:<12}{label:<26}{rate:>11,.0f}{commits:>9}{args.records / max(commits, 1):>12.1f}")

        print(f"\n2. Request latency with a {args.upstream_ms:g} ms provider, {args.requests} requests per cell")
        print("   (added = request p50/p99 minus audit off; call = time inside record_exchange)")
        print(f"   {'store':<10}{'audit':<8}{'conc':>5}{'p50 ms':>9}{'added p50':>11}{'added p99':>11}{'call p50':>10}{'call p99':>10}")
        up = args.upstream_ms / 1000
        f50, f99 = await commit_floor(min(args.requests, 300), up)
        print(f"   floor: one bare 3 KB PostgreSQL insert, fsynced commit, after {args.upstream_ms:g} ms idle: p50 {f50 * 1e3:.3f} ms, p99 {f99 * 1e3:.3f} ms")
        for conc in (1, 16):
            base, _ = await latency(stores, None, "sync", args.requests, conc, up)
            b50, b99 = pct(base, 0.5), pct(base, 0.99)
            print(f"   {'-':<10}{'off':<8}{conc:>5}{b50 * 1e3:>9.3f}{'-':>11}{'-':>11}{'-':>10}{'-':>10}")
            for mode in ("sync", "batch"):
                for kind in ("postgres", "sqlite"):
                    xs, cs = await latency(stores, kind, mode, args.requests, conc, up)
                    p50, p99 = pct(xs, 0.5), pct(xs, 0.99)
                    print(
                        f"   {kind:<10}{mode:<8}{conc:>5}{p50 * 1e3:>9.3f}{(p50 - b50) * 1e3:>11.3f}{(p99 - b99) * 1e3:>11.3f}"
                        f"{pct(cs, 0.5) * 1e3:>10.3f}{pct(cs, 0.99) * 1e3:>10.3f}"
                    )
    finally:
        await stores.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import logging

    logging.getLogger("warden.audit").setLevel(logging.ERROR)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
