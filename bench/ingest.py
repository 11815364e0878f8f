"""Ingest throughput of the retrieval pipeline (documents/s, embedding excluded).

Generates N Markdown documents (headings, paragraphs, a table), ingests them
with ``embedder = "none"`` (so no network time is counted) into a fresh store
and on-disk tantivy index, in batches as ``warden ingest`` does, and prints a
table next to the goal.  Also measures re-ingesting the same files (all
skipped by content hash).

    python bench/ingest.py --docs 2000 --batch 64
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

from llm_warden.plugins.retrieval.acl import Acl
from llm_warden.plugins.retrieval.config import RetrievalConfig
from llm_warden.plugins.retrieval.service import DocumentInput, RetrievalService

WORDS = [f"w{i}" for i in range(5000)]


def make_doc(rng: random.Random, i: int) -> str:
    def para(n: int) -> str:
        return " ".join(rng.choices(WORDS, weights=[1 / (k + 1) for k in range(len(WORDS))], k=n)) + "."

    parts = [f"# Document {i}", "", para(60), "", "## Details", "", para(80), "", para(40), "",
             "| key | value |", "|---|---|", *[f"| k{j} | {para(3)} |" for j in range(5)], "", "### More", "", para(100)]
    return "\n".join(parts)


async def run(n: int, batch: int) -> None:
    rng = random.Random(7)
    texts = [make_doc(rng, i) for i in range(n)]
    with tempfile.TemporaryDirectory() as d:
        cfg = RetrievalConfig(embedder="none", mode="bm25")
        svc = RetrievalService(cfg, Path(d) / "b.db", Path(d) / "idx", None)
        await svc.start()
        acls = [Acl(allow_groups=frozenset({f"g{i % 20}"})) for i in range(n)]
        rows = []
        for label in ("first ingest", "re-ingest (unchanged)"):
            t0 = time.perf_counter()
            for s in range(0, n, batch):
                await svc.upsert_many([DocumentInput("acme", f"doc{i}", texts[i], acls[i], title=f"Doc {i}", kind="markdown")
                                       for i in range(s, min(n, s + batch))])
            dt = time.perf_counter() - t0
            rows.append((label, n, dt, n / dt))
        status = await svc.status()
        await svc.close()
    print("| phase | documents | chunks | seconds | documents/s | goal |\n|---|---|---|---|---|---|")
    for label, docs, dt, rate in rows:
        print(f"| {label} | {docs} | {status['chunks']} | {dt:.2f} | {rate:.0f} | >= 200 |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=500)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    asyncio.run(run(a.docs, a.batch))


if __name__ == "__main__":
    main()
