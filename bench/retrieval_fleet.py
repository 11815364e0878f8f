"""Retrieval as a fleet: ingest rate vs store size, freshness across replicas, cold start.

Every number goes through real ``warden serve`` processes and their admin API
(bootstrap token, no embeddings: ``embedder = "none"``, BM25), with the store
of record on SQLite or on the local PostgreSQL (a schema of its own, dropped
afterwards).

- ``ingest``: at each store size, ``--probe`` single-document PUTs (one
  document per request, ``--concurrency`` clients) — the acknowledged rate,
  and the rate until the replica *serves* them (its indexes caught up) — then
  the store is filled to the next size with the bulk endpoint (its rate too).
- ``freshness`` (PostgreSQL): two replicas; a PUT (or DELETE) acknowledged by
  replica A, then replica B is searched in a tight loop until it serves the
  change: lag from acknowledgement to served, p50/p99/max (``--load``: while
  a bulk stream of that many documents/s goes into A).
- ``coldstart`` (PostgreSQL): the store filled to ``--chunks`` chunks, then a
  replica with an empty index folder is started: seconds from spawn to
  ``/readyz`` 200 (and again with its index folder kept: a restart), next to
  the spawn-to-ready time of a replica on an empty store.

    .venv/bin/python bench/retrieval_fleet.py ingest --store sqlite --sizes 0,10k,50k,100k
    .venv/bin/python bench/retrieval_fleet.py ingest --store postgres --sizes 0,10k,50k,100k
    .venv/bin/python bench/retrieval_fleet.py freshness --samples 300 --load 100
    .venv/bin/python bench/retrieval_fleet.py coldstart --chunks 100k
    .venv/bin/python bench/retrieval_fleet.py coldstart --chunks 100k --vectors 384
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_warden.plugins.retrieval.pgstore import MIGRATIONS  # noqa: E402
from llm_warden.proxy.db.migrate import migrate  # noqa: E402

TOKEN = "bench-admin-" + secrets.token_hex(12)
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
BASE_DSN = os.environ.get("WARDEN_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
LOGS = Path(tempfile.mkdtemp(prefix="warden-fleet-logs-"))


def size(v: str) -> int:
    v = v.strip().lower()
    return int(float(v[:-1]) * 1000) if v.endswith("k") else int(v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Corpus:
    """Markdown documents of about three chunks, made fast from a pool of Zipf-worded paragraphs."""

    def __init__(self, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        vocab = np.array([f"w{i}" for i in range(20000)])
        p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.07
        words = rng.choice(vocab, size=(3000, 70), p=p / p.sum())
        self.paras = [" ".join(row) + "." for row in words]
        self.rng = rng

    def doc(self, i: int) -> dict[str, Any]:
        a, b, c, d = (int(x) for x in self.rng.integers(0, len(self.paras), 4))
        text = (f"# Document {i}\n\nuniq{i} {self.paras[a]}\n\n## Details\n\n{self.paras[b]}\n\n{self.paras[c]}\n\n"
                f"### More\n\n{self.paras[d]}\n")
        return {"text": text, "kind": "markdown", "title": f"Doc {i}", "acl": {"allow_groups": [f"g{i % 20}"]}}


class Replica:
    """One ``warden serve`` process with retrieval on the given store."""

    def __init__(self, store: str, folder: Path, env: dict[str, str], **retrieval: Any) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.admin_port}"
        self.env = env
        settings = {"embedder": "none", "mode": "bm25", "bulk_max_documents": 1000, **retrieval}
        extra = "".join(f"{k} = {v!r}\n".replace("'", '"') if not isinstance(v, bool) else f"{k} = {str(v).lower()}\n" for k, v in settings.items())
        (folder / "config.toml").write_text(f"""
[server]
listen = "127.0.0.1:{self.port}"
admin_listen = "127.0.0.1:{self.admin_port}"
[upstream]
base_url = "http://127.0.0.1:9/v1"
[auth]
mode = "none"
[admin]
token_env = "WARDEN_BENCH_ADMIN"
[audit]
enabled = false
[logging]
access_log = false
level = "warning"
[database]
dsn_env = "WARDEN_DATABASE_URL"
pool_max = 4
[plugins]
enabled = ["retrieval"]
[retrieval]
store = "{store}"
db = "{folder / 'r.db'}"
index_dir = "{folder / 'idx'}"
{extra}""")
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> float:
        out = open(LOGS / f"{self.folder.name}-{self.admin_port}.log", "ab")  # noqa: SIM115 (kept open for the child)
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "llm_warden.proxy", "serve", "--config", str(self.folder / "config.toml")], cwd=ROOT,
                                     env={**os.environ, **self.env, "WARDEN_BENCH_ADMIN": TOKEN, "PYTHONPATH": str(ROOT)},
                                     stdout=out, stderr=subprocess.STDOUT)
        return t0

    async def ready(self, since: float, within_s: float = 600.0) -> float:
        async with aiohttp.ClientSession() as s:
            while time.monotonic() - since < within_s:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"replica exited ({self.proc.returncode}); see {LOGS}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(f"{self.url}/readyz") as r:
                        if r.status == 200:
                            return time.monotonic() - since
                await asyncio.sleep(0.02)
        raise RuntimeError(f"replica not ready within {within_s}s; see {LOGS}")

    async def start(self) -> float:
        return await self.ready(self.spawn())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


@contextlib.asynccontextmanager
async def pg_schema() -> AsyncIterator[str]:
    schema = f"bench_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(BASE_DSN)
    await admin.execute(f"CREATE SCHEMA {schema}")
    dsn = f"{BASE_DSN}{'&' if '?' in BASE_DSN else '?'}options=-csearch_path%3D{schema}"
    try:
        await migrate(dsn, "retrieval", MIGRATIONS)
        yield dsn
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


async def put(s: aiohttp.ClientSession, r: Replica, doc_id: str, body: dict[str, Any]) -> int:
    async with s.put(f"{r.url}/admin/documents/acme/{doc_id}", json=body) as resp:
        out = await resp.json()
        if resp.status not in (200, 201):
            raise RuntimeError(f"PUT {doc_id}: {resp.status} {out}")
        return int(out["seq"])


async def put_all(s: aiohttp.ClientSession, r: Replica, work: list[tuple[str, dict[str, Any]]]) -> None:
    """One client: PUT documents from the shared list until it is empty."""
    while work:
        doc_id, body = work.pop(0)
        await put(s, r, doc_id, body)


async def bulk(s: aiohttp.ClientSession, r: Replica, start: int, n: int, corpus: Corpus) -> None:
    docs = [{"id": f"d{i}", **corpus.doc(i)} for i in range(start, start + n)]
    async with s.post(f"{r.url}/admin/documents/acme:bulk", json={"documents": docs}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"bulk: {resp.status} {await resp.text()}")


async def status(s: aiohttp.ClientSession, r: Replica) -> dict[str, Any]:
    async with s.get(f"{r.url}/admin/index/status") as resp:
        out: dict[str, Any] = await resp.json()
        return out


async def drained(s: aiohttp.ClientSession, r: Replica) -> dict[str, Any]:
    """Wait until the replica's indexes applied everything committed."""
    while True:
        st = await status(s, r)
        if st["engines"]["lexical"]["lag"] == 0:
            return st
        await asyncio.sleep(0.02)


async def cmd_ingest(a: argparse.Namespace) -> None:
    corpus = Corpus()
    sizes = [size(x) for x in a.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        async with contextlib.AsyncExitStack() as stack:
            env = {}
            if a.store == "postgres":
                env["WARDEN_DATABASE_URL"] = await stack.enter_async_context(pg_schema())
            rep = Replica(a.store, Path(d) / "a", env)
            await rep.start()
            stack.callback(rep.stop)
            n = 0
            async with aiohttp.ClientSession(headers=ADMIN) as s:
                for target in sizes:
                    t0, n0 = time.perf_counter(), n
                    while n < target:
                        step = min(a.bulk, target - n)
                        await bulk(s, rep, n, step, corpus)
                        n += step
                    fill = time.perf_counter() - t0
                    await drained(s, rep)
                    fill_served = time.perf_counter() - t0
                    filled = n - n0
                    # The probe in rounds: the machine is shared, so the median round and the worst one are both reported.
                    acked_rates: list[float] = []
                    per = max(1, a.probe // a.rounds)
                    t_all = time.perf_counter()
                    for _ in range(a.rounds):
                        work = [(f"d{i}", corpus.doc(i)) for i in range(n, n + per)]
                        t0 = time.perf_counter()
                        await asyncio.gather(*(put_all(s, rep, work) for _ in range(a.concurrency)))
                        acked_rates.append(per / (time.perf_counter() - t0))
                        n += per
                    st = await drained(s, rep)
                    served = per * a.rounds / (time.perf_counter() - t_all)
                    rows.append((target, statistics.median(acked_rates), min(acked_rates), served, filled / fill if filled else None,
                                 filled / fill_served if filled else None, st["documents"], st["chunks"], os.getloadavg()[0]))
                    acked = statistics.median(acked_rates)
                    print(f"  at {target}: {acked:.0f} acked/s (median round), {served:.0f} served/s", file=sys.stderr, flush=True)
    print(f"\nstore = {a.store}; single = PUT one document per request, {a.concurrency} client(s), {a.probe} documents in {a.rounds} rounds "
          f"(acked: median round / worst round; served: all rounds until the replica's indexes caught up); bulk = {a.bulk} documents per POST\n")
    print("| documents in store | single: acked/s (median / worst) | single: served/s | bulk fill: acked/s | bulk fill: served/s | chunks after | load avg |")
    print("|---|---|---|---|---|---|---|")
    for target, ack, worst, srv, bf, bfs, _docs, chunks, load in rows:
        print(f"| {target:,} | {ack:.0f} / {worst:.0f} | {srv:.0f} | {'-' if bf is None else f'{bf:.0f}'} | {'-' if bfs is None else f'{bfs:.0f}'} "
              f"| {chunks:,} | {load:.1f} |")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def cmd_freshness(a: argparse.Namespace) -> None:
    corpus = Corpus()
    with tempfile.TemporaryDirectory() as d:
        async with pg_schema() as dsn:
            env = {"WARDEN_DATABASE_URL": dsn}
            ra, rb = Replica("postgres", Path(d) / "a", env), Replica("postgres", Path(d) / "b", env)
            try:
                await ra.start()
                await rb.start()
                lags: dict[str, list[float]] = {"upsert": [], "delete": []}
                stop = asyncio.Event()
                async with aiohttp.ClientSession(headers=ADMIN) as s:
                    if a.preload:
                        for start in range(0, a.preload, 1000):
                            await bulk(s, ra, 10_000_000 + start, min(1000, a.preload - start), corpus)
                        await drained(s, rb)

                    async def load() -> None:
                        i = 20_000_000
                        while not stop.is_set():
                            t = time.perf_counter()
                            await bulk(s, ra, i, max(1, a.load // 10), corpus)
                            i += max(1, a.load // 10)
                            await asyncio.sleep(max(0.0, 0.1 - (time.perf_counter() - t)))

                    loader = asyncio.create_task(load()) if a.load else None

                    async def served_on_b(token: str, doc_id: str, present: bool) -> None:
                        body = {"tenant": "acme", "user": "bench", "groups": ["g0"], "query": token, "top_k": 1}
                        while True:
                            async with s.post(f"{rb.url}/admin/search", json=body) as resp:
                                out = await resp.json()
                            if (doc_id in [h["doc_id"] for h in out["injected"]]) == present:
                                return
                            if a.poll_ms:
                                await asyncio.sleep(a.poll_ms / 1000)

                    for k in range(a.samples):
                        doc = corpus.doc(k)
                        doc["acl"] = {"allow_groups": ["g0"]}
                        await put(s, ra, f"fresh{k}", doc)
                        t_ack = time.perf_counter()
                        await served_on_b(f"uniq{k}", f"fresh{k}", True)
                        lags["upsert"].append(time.perf_counter() - t_ack)
                        async with s.delete(f"{ra.url}/admin/documents/acme/fresh{k}") as resp:
                            assert resp.status == 200
                        t_ack = time.perf_counter()
                        await served_on_b(f"uniq{k}", f"fresh{k}", False)
                        lags["delete"].append(time.perf_counter() - t_ack)
                        await asyncio.sleep(a.gap_ms / 1000)
                    stop.set()
                    if loader is not None:
                        await loader
                    st = await status(s, rb)
            finally:
                ra.stop()
                rb.stop()
    print(f"\nfreshness: acknowledged by replica A (PUT / DELETE), then served (or no longer served) by replica B; {a.samples} samples, "
          f"background load {a.load} documents/s, store {st['documents']:,} documents; B polled back to back (search ~ms)\n")
    print("| change | p50 ms | p99 ms | max ms | bound |")
    print("|---|---|---|---|---|")
    for op, xs in lags.items():
        print(f"| {op} | {1000 * statistics.median(xs):.1f} | {1000 * pct(xs, 99):.1f} | {1000 * max(xs):.1f} | 2000 |")


async def fill_direct(dsn: str, chunks: int, dim: int, corpus: Corpus) -> int:
    """Write documents of three chunks with random unit vectors straight into the store (as if an embedder had run)."""
    from llm_warden.plugins.retrieval.pgstore import PostgresStore
    from llm_warden.plugins.retrieval.records import ChunkRow, DocumentRow

    store = PostgresStore(dsn, pool_max=2)
    await store.open()
    rng = np.random.default_rng(3)
    try:
        await store.set_meta("embedding_model", "bench-embed")
        await store.set_meta("embedding_dim", str(dim))
        n = 0
        while n * 3 < chunks:
            items = []
            for i in range(n, n + 1000):
                vecs = rng.standard_normal((3, dim)).astype(np.float32)
                vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
                doc = DocumentRow("acme", f"d{i}", f"h{i}", {"allow_groups": [f"g{i % 20}"]}, title=f"Doc {i}", embedding_model="bench-embed",
                                  n_chunks=3, tokens=300, size=1500)
                items.append((doc, [ChunkRow(f"acme/d{i}#h{i}.{j}", "acme", f"d{i}", j, ["Doc"], 0, 1, "text", corpus.paras[(i + j) % 3000],
                                             corpus.paras[(i + j) % 3000], 100, vecs[j]) for j in range(3)]))
            await store.write_documents(items)
            n += 1000
        return n * 3
    finally:
        await store.close()


async def cmd_coldstart(a: argparse.Namespace) -> None:
    corpus = Corpus()
    rows = []
    vec: dict[str, Any] = {}
    if a.vectors:
        # Vectors are read from the store at start: the embeddings endpoint is never called (nothing listens there).
        vec = {"embedder": "upstream", "mode": "hybrid", "embedding_model": "bench-embed", "embedding_dim": a.vectors,
               "embedding_base_url": "http://127.0.0.1:9/v1"}
    with tempfile.TemporaryDirectory() as d:
        async with pg_schema() as dsn:
            env = {"WARDEN_DATABASE_URL": dsn}
            empty = Replica("postgres", Path(d) / "empty", env, **vec)
            rows.append(("new replica, empty store", 0, await empty.start()))
            empty.stop()
            if a.vectors:
                chunks = await fill_direct(dsn, a.chunks, a.vectors, corpus)
            else:
                ra = Replica("postgres", Path(d) / "a", env)
                await ra.start()
                async with aiohttp.ClientSession(headers=ADMIN) as s:
                    n = 0
                    while (await status(s, ra))["chunks"] < a.chunks:
                        await bulk(s, ra, n, 1000, corpus)
                        n += 1000
                    chunks = (await status(s, ra))["chunks"]
                ra.stop()
            late = Replica("postgres", Path(d) / "late", env, **vec)
            rows.append(("new replica (empty index folder): builds from PostgreSQL", chunks, await late.start()))
            late.stop()
            rows.append(("restarted replica (index folder kept): catches up", chunks, await late.start()))
            late.stop()
    what = f"lexical + vector ({a.vectors}-dim HNSW) indexes" if a.vectors else "lexical index (no embedder)"
    print(f"\ncold start, {what}: seconds from process spawn to /readyz 200 (python start-up included: see the empty-store row)\n")
    print("| replica | chunks in store | seconds to ready |")
    print("|---|---|---|")
    for label, n_chunks, secs in rows:
        print(f"| {label} | {n_chunks:,} | {secs:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("ingest")
    i.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    i.add_argument("--sizes", default="0,10k,50k,100k")
    i.add_argument("--probe", type=int, default=1000, help="single-document PUTs measured at each size")
    i.add_argument("--rounds", type=int, default=5, help="the probe is split into this many rounds")
    i.add_argument("--concurrency", type=int, default=1)
    i.add_argument("--bulk", type=int, default=1000, help="documents per bulk POST when filling")
    f = sub.add_parser("freshness")
    f.add_argument("--samples", type=int, default=200)
    f.add_argument("--load", type=int, default=0, help="background bulk ingest into replica A, documents/s")
    f.add_argument("--preload", type=int, default=0, help="documents in the store before measuring")
    f.add_argument("--poll-ms", type=float, default=0.0)
    f.add_argument("--gap-ms", type=float, default=20.0)
    c = sub.add_parser("coldstart")
    c.add_argument("--chunks", type=size, default=100_000)
    c.add_argument("--vectors", type=int, default=0, help="also vectors of this dimension (written straight into the store)")
    a = p.parse_args()
    asyncio.run({"ingest": cmd_ingest, "freshness": cmd_freshness, "coldstart": cmd_coldstart}[a.cmd](a))


if __name__ == "__main__":
    main()
