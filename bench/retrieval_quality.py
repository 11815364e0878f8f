"""Retrieval quality (nDCG@10, recall@100) of bm25, vector and hybrid on a BEIR-format collection,
and how far the character estimate is from the local embedder's wordpieces.

    python -m bench.retrieval_quality --beir DIR [--split test] [--modes bm25,vector,hybrid] [--limit-queries N]
    python -m bench.retrieval_quality --tokens PATH...     # estimate vs wordpieces over text files / BEIR corpora

DIR holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``) and
``qrels/<split>.tsv`` (``query-id``, ``corpus-id``, ``score``), the layout of the BEIR collections.
Every document is ingested through the real :class:`RetrievalService` (public ACL, one tenant,
``embedder = "local"``) and every query is searched as a reader would be, top 100, no context budget.
Graded nDCG uses the qrels scores as gains (``2**rel - 1``, log2 discount), as BEIR's evaluation does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from pathlib import Path

from llm_warden.plugins.retrieval.acl import Acl, Reader
from llm_warden.plugins.retrieval.chunking import approx_tokens
from llm_warden.plugins.retrieval.config import RetrievalConfig
from llm_warden.plugins.retrieval.embed_local import LocalEmbedder
from llm_warden.plugins.retrieval.records import DocumentInput
from llm_warden.plugins.retrieval.service import RetrievalService

TENANT = "bench"


def load_beir(root: Path, split: str) -> tuple[dict[str, tuple[str, str]], dict[str, str], dict[str, dict[str, int]]]:
    corpus = {}
    for line in (root / "corpus.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            corpus[str(d["_id"])] = (d.get("title") or "", d.get("text") or "")
    queries = {}
    for line in (root / "queries.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            q = json.loads(line)
            queries[str(q["_id"])] = q["text"]
    qrels: dict[str, dict[str, int]] = {}
    for n, line in enumerate((root / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()):
        parts = line.split("\t")
        if n == 0 and not parts[-1].strip().lstrip("-").isdigit():
            continue
        qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return corpus, queries, qrels


def ndcg_at(ranked: list[str], rels: dict[str, int], k: int) -> float:
    dcg = sum((2 ** rels.get(d, 0) - 1) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(rels.values(), reverse=True)[:k]
    idcg = sum((2**r - 1) / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at(ranked: list[str], rels: dict[str, int], k: int) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant & set(ranked[:k])) / len(relevant) if relevant else 0.0


async def evaluate(root: Path, split: str, modes: list[str], limit: int) -> list[tuple[str, float, float, float]]:
    corpus, queries, qrels = load_beir(root, split)
    qids = [q for q in qrels if q in queries][: limit or None]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RetrievalConfig(embedder="local", mode="hybrid", top_k=100, candidate_k=100, max_context_tokens=10_000_000,
                              max_document_bytes=50_000_000)
        svc = RetrievalService(cfg, Path(tmp) / "q.db", Path(tmp) / "q-index", LocalEmbedder())
        await svc.start()
        try:
            t0 = time.perf_counter()
            docs = [DocumentInput(TENANT, did, text, Acl(public=True), title=title) for did, (title, text) in corpus.items()]
            for i in range(0, len(docs), 200):
                await svc.upsert_many(docs[i : i + 200])
            print(f"ingested {len(docs)} documents in {time.perf_counter() - t0:.0f} s; {len(qids)} judged queries")
            reader = Reader(TENANT, "bench", frozenset())
            for mode in modes:
                svc.cfg.mode = mode  # type: ignore[assignment]
                ndcg = recall = 0.0
                t0 = time.perf_counter()
                for qid in qids:
                    res = await svc.search(reader, queries[qid])
                    ranked = list(dict.fromkeys(h.doc_id for h in res.hits))
                    ndcg += ndcg_at(ranked, qrels[qid], 10)
                    recall += recall_at(ranked, qrels[qid], 100)
                took = (time.perf_counter() - t0) / max(1, len(qids)) * 1000
                rows.append((mode, ndcg / max(1, len(qids)), recall / max(1, len(qids)), took))
        finally:
            await svc.close()
    return rows


def token_ratio(paths: list[Path]) -> None:
    e = LocalEmbedder()
    texts: list[str] = []
    for p in paths:
        files = [p / "corpus.jsonl"] if (p / "corpus.jsonl").is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.name == "corpus.jsonl":
                texts += [json.loads(line).get("text", "") for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
            elif f.suffix in (".md", ".txt", ".rst"):
                texts.append(f.read_text(encoding="utf-8", errors="replace"))
    est = sum(approx_tokens(t) for t in texts)
    wp = sum(e.count_tokens(t) for t in texts)
    print(f"{len(texts)} texts: estimate {est} tokens, wordpieces {wp}: the estimate is {100 * (wp - est) / wp:+.1f} % off (negative = over-counts)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beir", type=Path, help="a BEIR-format collection directory")
    ap.add_argument("--split", default="test")
    ap.add_argument("--modes", default="bm25,vector,hybrid")
    ap.add_argument("--limit-queries", type=int, default=0)
    ap.add_argument("--tokens", type=Path, nargs="+", help="files, folders or BEIR directories to count tokens in")
    args = ap.parse_args()
    if args.tokens:
        token_ratio(args.tokens)
    if args.beir:
        rows = asyncio.run(evaluate(args.beir, args.split, args.modes.split(","), args.limit_queries))
        print(f"{'mode':8} {'nDCG@10':>8} {'R@100':>8} {'ms/query':>9}")
        for mode, ndcg, recall, ms in rows:
            print(f"{mode:8} {ndcg:8.4f} {recall:8.4f} {ms:9.1f}")
    if not args.tokens and not args.beir:
        ap.error("give --beir DIR and/or --tokens PATH...")


if __name__ == "__main__":
    main()
