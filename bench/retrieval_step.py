"""The whole retrieval step of a request, as the plugin runs it (issue #10's budget).

Builds a hybrid index (tantivy + faiss, 384-dim vectors) of N generated
Markdown documents through the real pipeline (SQLite store of record, chunking,
both engines), then times ``RetrievalService.search`` for readers whose ACLs
admit about 5% and 100% of the corpus: lexical + vector search inside the
ACL, fusion, the store-of-record fetch and re-check, and context selection.
The query embedding is excluded (reported separately; the lexical search runs
while it is computed): the embedder here is a local deterministic bag-of-words
projection, so no network time is counted.

    python bench/retrieval_step.py --docs 34000 --queries 300     # ~100k chunks
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import WORDS, make_doc  # noqa: E402
from llm_warden.plugins.retrieval.acl import Acl, Reader  # noqa: E402
from llm_warden.plugins.retrieval.config import RetrievalConfig  # noqa: E402
from llm_warden.plugins.retrieval.embed import normalize  # noqa: E402
from llm_warden.plugins.retrieval.service import DocumentInput, RetrievalService  # noqa: E402

DIM = 384


class LocalEmbedder:
    """Deterministic embeddings without a network: each word is a fixed random
    unit vector; a text is the normalised sum of its words' vectors."""

    model = "bench-local-bow"

    def __init__(self) -> None:
        self.dim: int | None = DIM
        self._words: dict[str, np.ndarray] = {}

    def _word(self, w: str) -> np.ndarray:
        v = self._words.get(w)
        if v is None:
            rng = np.random.default_rng(zlib.crc32(w.encode()))
            v = rng.standard_normal(DIM).astype(np.float32)
            self._words[w] = v
        return v

    async def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i] += self._word(w.strip(".,|#").lower())
        return normalize(out)

    async def close(self) -> None:
        return None


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(n: int, queries: int, batch: int) -> None:
    rng = random.Random(11)
    with tempfile.TemporaryDirectory() as d:
        cfg = RetrievalConfig(embedder="upstream", mode="hybrid", embedding_model=LocalEmbedder.model)
        svc = RetrievalService(cfg, Path(d) / "r.db", Path(d) / "idx", LocalEmbedder())  # type: ignore[arg-type]
        await svc.start()
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            docs = [
                DocumentInput("acme", f"doc{i}", make_doc(rng, i), Acl(allow_groups=frozenset({f"g{i % 20}"})), title=f"Doc {i}", kind="markdown")
                for i in range(s, min(n, s + batch))
            ]
            await svc.upsert_many(docs)
        build_s = time.perf_counter() - t0
        status = await svc.status()
        readers = {
            "~5% (one group of 20)": Reader("acme", "u", frozenset({"g3"})),
            "100% (all groups)": Reader("acme", "u", frozenset(f"g{i}" for i in range(20))),
        }
        weights = [1 / (k + 1) for k in range(len(WORDS))]
        print(f"\nretrieval step: {status['documents']} documents, {status['chunks']} chunks, hybrid, built in {build_s:.0f} s\n")
        print("| reader scope | step p50 ms | step p99 ms | engines (slower branch + fusion) p50 ms | fetch+select p50 ms | query embedding p50 ms |")
        print("|---|---|---|---|---|---|")
        for label, reader in readers.items():
            steps, engines, rest, embeds = [], [], [], []
            for _ in range(queries):
                q = " ".join(rng.choices(WORDS, weights=weights, k=rng.randint(10, 20)))
                res = await svc.search(reader, q)
                t = res.timings
                emb = t.get("embed_ms", 0.0)
                # the lexical branch runs concurrently with embedding + vector search: the slower one counts
                eng = max(t.get("bm25_ms", 0.0), emb + t.get("vector_ms", 0.0)) - emb + t.get("fuse_ms", 0.0)
                steps.append(t["total_ms"] - emb)
                engines.append(eng)
                rest.append(t["total_ms"] - emb - eng)
                embeds.append(emb)
            print(f"| {label} | {pct(steps, .5):.2f} | {pct(steps, .99):.2f} | {pct(engines, .5):.2f} | {pct(rest, .5):.2f} | {pct(embeds, .5):.2f} |")
        await svc.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000, help="documents (about 3 chunks each)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    asyncio.run(run(args.docs, args.queries, args.batch))


if __name__ == "__main__":
    main()
