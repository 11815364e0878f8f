"""Audit log benchmark: throughput and added latency, side by side in one run.

    python bench/audit.py                         # smoke sizes (a few seconds)
    python bench/audit.py --records 50000 --requests 3000

Three tables:

1. Per-record CPU on the request path: projection + redaction +
   canonicalization of one realistic exchange (2 turns' worth of messages,
   a tool call and a tool result), per ``store_content`` mode.
2. Sustained throughput (records/s) with many concurrent writers, ``batch``
   and ``sync``: end to end (``record_exchange``: projection, redaction,
   queue, group commit) and store only (records prepared beforehand).
3. Added request latency: each simulated request waits for the provider
   and then records its exchange; p50/p99 of the whole request with audit
   off, ``batch``, ``sync`` and ``sync`` with ``fsync = false``, at
   concurrency 1 and 16.  Two arrival patterns: ``jittered`` (each provider
   time drawn uniformly from 0.5-1.5x ``--upstream-ms``, the same seeded
   sequence in every cell, and at 16 worker k starts k/16 of a provider time
   late: requests arrive as from independent clients) and, at 16,
   ``lockstep`` (all 16 start together and, with a constant provider time,
   finish together forever: every record queues behind 15 others' projection
   on the one event loop, and a group commit releases them together — the
   worst case).  A constant provider time with staggered starts drifts into
   lockstep too: each group commit releases its requests at the same moment.
   The provider's mean time is 20 ms by default (``--upstream-ms``; still
   far quicker than a language model): with 2 ms, concurrency 16 is 7-8k
   requests/s, and on a 2-core machine the load itself (event loop, writer,
   the provider's clock) saturates the cores, so the table would show CPU
   contention more than the wait for the audit log.

The database lives in a temporary directory on the same disk as the repo
(``--dir`` to choose); ``synchronous=FULL`` in sync mode really fsyncs.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.delay import Delays  # noqa: E402
from llm_warden.proxy.audit.record import Projector  # noqa: E402
from llm_warden.proxy.audit.sqlite import SQLiteAuditLog  # noqa: E402
from llm_warden.proxy.config import AuditConfig  # noqa: E402
from tests.proxy.audit.helpers import make_exchange  # noqa: E402

UPSTREAM_KEY = "sk-bench-upstream-key-0123456789abcdef"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def projection_cost(n: int) -> list[tuple[str, float, float, int]]:
    rows = []
    ex = make_exchange()
    for mode in ("full", "redacted", "hashes"):
        pj = Projector(mode, pii=["email", "phone", "card"], upstream_key=UPSTREAM_KEY, provider="openai")  # type: ignore[arg-type]
        size = len(pj.exchange(ex).body)
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                pj.exchange(ex)
            samples.append((time.perf_counter() - t0) / n * 1e6)
        rows.append((mode, min(samples), statistics.median(samples), size))
    return rows


async def throughput(tmp: Path, mode: str, n: int, writers: int, prepared: bool) -> tuple[float, int]:
    path = tmp / f"tp-{mode}-{prepared}.db"
    log = SQLiteAuditLog(AuditConfig(durability=mode, checkpoint_every=10_000), path, upstream_key=UPSTREAM_KEY, provider="openai")  # type: ignore[arg-type]
    await log.start()
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
            # A request handler yields at least once per request (its network I/O); without this the
            # writers would run back to back until the queue is full and starve the writer task.
            await asyncio.sleep(0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(writers)))
    await log.stop()
    dt = time.perf_counter() - t0
    assert log.records_written == n, (log.records_written, n)
    return n / dt, commits


async def latency(
    tmp: Path, mode: str | None, n: int, concurrency: int, upstream_s: float, jitter: bool = True, fsync: bool = True
) -> tuple[list[float], list[float]]:
    log = None
    if mode is not None:
        log = SQLiteAuditLog(
            AuditConfig(durability=mode, fsync=fsync),  # type: ignore[arg-type]
            tmp / f"lat-{mode}-{fsync}-{concurrency}-{jitter}.db",
            upstream_key=UPSTREAM_KEY,
            provider="openai",
        )
        await log.start()
    exs = [make_exchange() for _ in range(n)]
    rnd = random.Random(7)
    waits = [upstream_s * rnd.uniform(0.5, 1.5) if jitter else upstream_s for _ in range(n)]
    it = iter(range(n))
    out: list[float] = []
    calls: list[float] = []

    provider = Delays()
    await provider.start()

    async def worker(k: int) -> None:
        if jitter:
            await provider.sleep(upstream_s * k / concurrency)
        for i in it:
            t0 = time.perf_counter()
            await provider.sleep(waits[i])  # kept by another process (bench/delay.py: uvloop's timers count whole ms)
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


def store_floor(tmp: Path, n: int, batch: int = 256) -> float:
    """Records/s of bare SQLite on this machine: the same 3 KB bodies, 256 per transaction, one
    thread, no chain, no indexes, synchronous=NORMAL — what the disk and SQLite allow at most."""
    body = make_exchange().request_id.encode() + b"x" * 3070
    conn = sqlite3.connect(tmp / "store-floor.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO t (body) VALUES (?)", [(body,)] * min(batch, n - s))
        conn.execute("COMMIT")
    dt = time.perf_counter() - t0
    conn.close()
    return n / dt


def commit_floor(tmp: Path, n: int, gap_s: float, synchronous: str) -> tuple[float, float]:
    """One 3 KB insert per transaction on the same disk and pacing: what the disk itself costs."""
    conn = sqlite3.connect(tmp / f"floor-{synchronous}.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("CREATE TABLE IF NOT EXISTS t (b BLOB)")
    xs = []
    for _ in range(n):
        time.sleep(gap_s)
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?)", (b"x" * 3000,))
        conn.execute("COMMIT")
        xs.append(time.perf_counter() - t0)
    conn.close()
    return pct(xs, 0.5), pct(xs, 0.99)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=5000, help="records per throughput cell")
    ap.add_argument("--writers", type=int, default=64, help="concurrent writers in the throughput cells")
    ap.add_argument("--requests", type=int, default=800, help="requests per latency cell")
    ap.add_argument("--upstream-ms", type=float, default=20.0, help="mean simulated provider time per request (see the docstring)")
    ap.add_argument("--projections", type=int, default=2000)
    ap.add_argument("--dir", help="where the databases go (default: a temp dir)")
    args = ap.parse_args()
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]  # "uvloop" or "asyncio"
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="warden-audit-bench-"))

    print(f"audit benchmark ({loop_name}, databases in {tmp})\n")
    print("1. CPU per record on the request path (projection + redaction + canonical JSON)")
    print(f"   {'store_content':<14}{'best µs':>10}{'median µs':>11}{'bytes':>8}")
    for mode, best, med, size in projection_cost(args.projections):
        print(f"   {mode:<14}{best:>10.1f}{med:>11.1f}{size:>8}")

    print(f"\n2. Sustained throughput, {args.records} records, {args.writers} concurrent writers")
    print("   (e2e: record_exchange, projection on the event loop + the writer process; store only: records")
    print("   projected beforehand; commits = writer transactions)")
    print(f"   floor: bare SQLite, same-size bodies, 256 per transaction, no chain or indexes: {store_floor(tmp, args.records):,.0f} records/s")
    print(f"   {'durability':<12}{'path':<26}{'records/s':>11}{'commits':>9}{'rec/commit':>12}")
    for mode in ("batch", "sync"):
        for prepared in (False, True):
            rate, commits = await throughput(tmp, mode, args.records, args.writers, prepared)
            label = "store only (prepared)" if prepared else "record_exchange (e2e)"
            print(f"   {mode:<12}{label:<26}{rate:>11,.0f}{commits:>9}{args.records / max(commits, 1):>12.1f}")

    print(f"\n3. Request latency with a {args.upstream_ms:g} ms provider, {args.requests} requests per cell")
    print("   (call = time inside record_exchange; added = request p50/p99 minus audit off)")
    for sync in ("NORMAL", "FULL"):
        f50, f99 = commit_floor(tmp, min(args.requests, 300), args.upstream_ms / 1000, sync)
        print(f"   floor: one bare SQLite commit, synchronous={sync}: p50 {f50 * 1e3:.3f} ms, p99 {f99 * 1e3:.3f} ms")
    head = f"   {'audit':<12}{'conc':>5}  {'arrivals':<10}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}{'added p99':>11}"
    print(head + f"{'call p50':>10}{'call p99':>10}")
    up = args.upstream_ms / 1000
    for conc, jitter in ((1, True), (16, True), (16, False)):
        arrivals = "jittered" if jitter else "lockstep"
        base, _ = await latency(tmp, None, args.requests, conc, up, jitter)
        b50, b99 = pct(base, 0.5), pct(base, 0.99)
        print(f"   {'off':<12}{conc:>5}  {arrivals:<10}{b50 * 1e3:>9.3f}{b99 * 1e3:>9.3f}{'-':>11}{'-':>11}{'-':>10}{'-':>10}")
        for mode, fsync in (("batch", True), ("sync", True), ("sync", False)):
            xs, cs = await latency(tmp, mode, args.requests, conc, up, jitter, fsync)
            p50, p99 = pct(xs, 0.5), pct(xs, 0.99)
            label = mode if fsync or mode != "sync" else "sync nofsync"
            print(
                f"   {label:<12}{conc:>5}  {arrivals:<10}{p50 * 1e3:>9.3f}{p99 * 1e3:>9.3f}{(p50 - b50) * 1e3:>11.3f}{(p99 - b99) * 1e3:>11.3f}"
                f"{pct(cs, 0.5) * 1e3:>10.3f}{pct(cs, 0.99) * 1e3:>10.3f}"
            )
    print("   (sync nofsync = [audit] fsync = false: the response still waits for the commit, which survives a")
    print("   crash or SIGKILL of Warden but not a power cut)")

if __name__ == "__main__":
    import logging

    logging.getLogger("warden.audit").setLevel(logging.ERROR)  # each fresh store logs its generated key: keep the table readable
    try:
        import uvloop

        uvloop.install()  # before the loop is made, as `warden serve` does
    except ImportError:
        pass
    asyncio.run(main())
