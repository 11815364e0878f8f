"""The cost of the permission re-check next to the search it follows, on both stores of record.

For each store (SQLite embedded; PostgreSQL on the local server, a schema of
its own dropped afterwards) a service is filled with ``--docs`` documents of
two chunks each (BM25, no embedder; every document readable by one of ten
groups, the reader is in three), then ``--queries`` searches run as that
reader.  For each, the search (engines, fusion, the store fetch with its own
ACL check) and the re-check of the chosen chunks (one batched read of their
documents from the store of record plus the independent ACL evaluation:
:func:`plugins.retrieval.slo.recheck`) are timed apart.

    .venv/bin/python -m bench.retrieval_recheck                       # 5k documents, both stores
    .venv/bin/python -m bench.retrieval_recheck --docs 50k --stores sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_warden.plugins.retrieval.acl import Acl, Reader  # noqa: E402
from llm_warden.plugins.retrieval.config import RetrievalConfig  # noqa: E402
from llm_warden.plugins.retrieval.records import DocumentInput  # noqa: E402
from llm_warden.plugins.retrieval.service import RetrievalService  # noqa: E402
from llm_warden.plugins.retrieval.slo import recheck  # noqa: E402
from llm_warden.proxy.exchange import Principal  # noqa: E402

GROUPS = [f"g{i}" for i in range(10)]
READER = Reader("acme", "alice", frozenset({"g0", "g3", "g7"}))
PRINCIPAL = Principal("acme", "alice", frozenset({"g0", "g3", "g7"}))


def _size(v: str) -> int:
    v = v.strip().lower()
    return int(float(v[:-1]) * 1000) if v.endswith("k") else int(v)


def corpus(n: int, rng: np.random.Generator) -> tuple[list[DocumentInput], list[str]]:
    words = [f"w{i}" for i in range(5000)]
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.07
    p /= p.sum()

    def text(k: int) -> str:
        return " ".join(words[i] for i in rng.choice(len(words), k, p=p))

    docs = [
        DocumentInput("acme", f"doc{i}", f"# Part one\n\n{text(90)}\n\n# Part two\n\n{text(90)}", Acl(allow_groups=frozenset({GROUPS[i % 10]})),
                      kind="markdown", updated_at="2026-12-01T00:00:00+00:00")
        for i in range(n)
    ]
    return docs, [text(12) for _ in range(200)]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def measure(svc: RetrievalService, docs: list[DocumentInput], queries: list[str], n: int) -> list[str]:
    for i in range(0, len(docs), 500):
        await svc.upsert_many(docs[i : i + 500], wait=False)
    await svc.sync()
    search_ms: list[float] = []
    recheck_ms: list[float] = []
    chunks: list[int] = []
    for i in range(n):
        t0 = time.perf_counter()
        result = await svc.search(READER, queries[i % len(queries)])
        t1 = time.perf_counter()
        checked = await recheck(svc.store, PRINCIPAL, result.hits)
        t2 = time.perf_counter()
        assert not checked.removed, checked.removed
        search_ms.append((t1 - t0) * 1000)
        recheck_ms.append((t2 - t1) * 1000)
        chunks.append(checked.checked)
    share = statistics.median(r / (s + r) for s, r in zip(search_ms, recheck_ms, strict=True))
    return [svc.store.kind, f"{len(docs):,}", f"{statistics.mean(chunks):.1f}", f"{pct(search_ms, 0.5):.3f}", f"{pct(search_ms, 0.99):.3f}",
            f"{pct(recheck_ms, 0.5):.3f}", f"{pct(recheck_ms, 0.99):.3f}", f"{share:.0%}"]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", default="5k", help="documents (two chunks each), e.g. 5k, 50k (default 5k)")
    ap.add_argument("--queries", type=int, default=500, help="searches per store (default 500)")
    ap.add_argument("--stores", default="sqlite,postgres", help="comma-separated: sqlite, postgres (default both)")
    a = ap.parse_args()
    docs, queries = corpus(_size(a.docs), np.random.default_rng(7))
    cfg = RetrievalConfig(embedder="none", mode="bm25")
    rows: list[list[str]] = []
    for store in [s.strip() for s in a.stores.split(",") if s.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            async with contextlib.AsyncExitStack() as stack:
                if store == "postgres":
                    from bench.retrieval_fleet import pg_schema
                    from llm_warden.plugins.retrieval.pgstore import PostgresStore

                    dsn = await stack.enter_async_context(pg_schema())
                    svc = RetrievalService(RetrievalConfig(embedder="none", mode="bm25", store="postgres"), None, Path(tmp) / "idx", None,
                                           store=PostgresStore(dsn, pool_max=4))
                else:
                    svc = RetrievalService(cfg, Path(tmp) / "r.db", Path(tmp) / "idx", None)
                await svc.start()
                stack.push_async_callback(svc.close)
                rows.append(await measure(svc, docs, queries, a.queries))
    head = ["store", "documents", "chunks checked", "search p50 ms", "search p99 ms", "re-check p50 ms", "re-check p99 ms", "re-check share p50"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    asyncio.run(main())
