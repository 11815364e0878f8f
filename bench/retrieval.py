"""Retrieval engine benchmark: lexical (tantivy) and vector (faiss) search with ACLs inside the search.

Generated corpus: chunks of 60-180 words drawn from a Zipf-distributed vocabulary
(English stopwords at the top ranks, then pseudo-words), so term frequencies look like
real text; queries of 10-20 words drawn the same way. Every chunk carries an ACL such
that readers see 0.1%, 1%, 10% or 100% of the corpus. Vectors are 384-dim, clustered
(1,000 centroids plus noise), L2-normalised; queries come from the same distribution.

Prints, per corpus size: build rate and disk size, lexical p50/p99 per ACL selectivity
(and optionally SQLite FTS5 as the baseline), vector p50/p99 and recall@10 against an
exact scan per scope, and the whole engine step (lexical + vector + fusion) at 100%.

    .venv/bin/python bench/retrieval.py                      # smoke: 10k chunks
    .venv/bin/python bench/retrieval.py --sizes 10k,100k --fts5
    .venv/bin/python bench/retrieval.py --sizes 1M --queries 300
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_warden.plugins.retrieval.acl import Acl, IndexedChunk, Reader  # noqa: E402
from llm_warden.plugins.retrieval.fusion import rrf  # noqa: E402
from llm_warden.plugins.retrieval.lexical import LexicalIndex  # noqa: E402
from llm_warden.plugins.retrieval.tokenize import ENGLISH_STOPWORDS  # noqa: E402
from llm_warden.plugins.retrieval.vector import VectorIndex  # noqa: E402

DIM = 384
SCOPES = {"0.1%": 1000, "1%": 100, "10%": 10, "100%": 1}  # chunk i is in scope when i % n == 0
TOP_STOPWORDS = "the of and to a in is that for it as was with be by on not he i this are or his from at which but have an they".split()


def vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    stop = TOP_STOPWORDS + sorted(ENGLISH_STOPWORDS - set(TOP_STOPWORDS))
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    words: set[str] = set()
    while len(words) < size - len(stop):
        n = int(rng.integers(2, 5))
        words.add("".join(consonants[rng.integers(18)] + vowels[rng.integers(5)] for _ in range(n)))
    return stop + sorted(words)


def zipf_probs(n: int, s: float = 1.07) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** s
    return p / p.sum()


def scope_acl(i: int) -> Acl:
    groups = {"all"} | {f"s{name}" for name, every in SCOPES.items() if i % every == 0}
    return Acl(allow_groups=frozenset(groups), deny_users=frozenset({"mallory"}))


def reader_for(scope: str) -> Reader:
    return Reader("bench", "reader", frozenset({"all" if scope == "100%" else f"s{scope}"}))


def texts(n: int, vocab: list[str], probs: np.ndarray, rng: np.random.Generator, lo: int, hi: int) -> list[str]:
    lengths = rng.integers(lo, hi + 1, n)
    words = rng.choice(len(vocab), size=int(lengths.sum()), p=probs)
    out, pos = [], 0
    for length in lengths:
        out.append(" ".join(vocab[w] for w in words[pos : pos + length]))
        pos += length
    return out


def clustered(n: int, centroids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = centroids[rng.integers(len(centroids), size=n)] + rng.standard_normal((n, DIM)).astype(np.float32) * 0.6 / np.sqrt(DIM)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fts5_baseline(corpus: list[str], queries: list[str], workdir: Path) -> list[float]:
    db = sqlite3.connect(workdir / "fts.db")
    db.execute("CREATE VIRTUAL TABLE c USING fts5(body, tokenize='porter')")
    db.executemany("INSERT INTO c(body) VALUES (?)", ((t,) for t in corpus))
    db.commit()
    times = []
    for q in queries:
        terms = [t for t in dict.fromkeys(q.split()) if t not in ENGLISH_STOPWORDS]
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        t0 = time.perf_counter()
        db.execute("SELECT rowid FROM c WHERE c MATCH ? ORDER BY bm25(c) LIMIT 10", (match,)).fetchall()
        times.append(time.perf_counter() - t0)
    db.close()
    return times


def run(size: int, args: argparse.Namespace, rows: list[list[str]]) -> None:
    rng = np.random.default_rng(size)
    vocab = vocabulary(args.vocab, rng)
    probs = zipf_probs(len(vocab))
    workdir = Path(tempfile.mkdtemp(prefix="warden-bench-"))
    label = f"{size // 1000}k" if size < 1_000_000 else f"{size / 1e6:g}M"
    try:
        # ---- lexical ---------------------------------------------------------
        t0 = time.perf_counter()
        lex = LexicalIndex(workdir / "lex", writer_threads=args.writer_threads, writer_heap_bytes=256_000_000)
        corpus: list[str] = []
        gen_s = 0.0
        for start in range(0, size, 50_000):
            g0 = time.perf_counter()
            batch = texts(min(50_000, size - start), vocab, probs, rng, 60, 180)
            gen_s += time.perf_counter() - g0
            if args.fts5:
                corpus += batch
            lex.upsert([IndexedChunk(f"bench/d{start + j}#0", "bench", f"d{start + j}", t, scope_acl(start + j)) for j, t in enumerate(batch)])
        lex.commit()
        build_s = time.perf_counter() - t0 - gen_s
        rows.append([label, "lexical build", f"{size / build_s:,.0f} chunks/s", f"{build_s:.1f} s", f"disk {du(workdir / 'lex') / 1e6:,.0f} MB", ""])
        queries = texts(args.queries, vocab, probs, rng, 10, 20)
        for scope in ("1%", "10%", "100%"):
            reader = reader_for(scope)
            for q in queries[:20]:
                lex.search(reader, q, 10)  # warm up
            times = []
            for q in queries:
                t = time.perf_counter()
                lex.search(reader, q, 10)
                times.append(time.perf_counter() - t)
            rows.append([label, f"lexical acl {scope}", f"p50 {pct(times, 50):.2f} ms", f"p99 {pct(times, 99):.2f} ms", "", ""])
        if args.fts5:
            fq = queries[: max(20, args.queries // 10)]
            t = fts5_baseline(corpus, fq, workdir)
            rows.append([label, "FTS5 baseline (no acl)", f"p50 {pct(t, 50):.2f} ms", f"p99 {pct(t, 99):.2f} ms", f"{len(fq)} queries", ""])
            del corpus
        if size > args.vector_max:
            lex.close()
            return
        # ---- vector ----------------------------------------------------------
        centroids = rng.standard_normal((1000, DIM)).astype(np.float32)
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        vectors = clustered(size, centroids, rng)
        t0 = time.perf_counter()
        vec = VectorIndex(workdir / "vec", DIM, exact_max=args.exact_max, graph_min_fraction=args.graph_min_fraction)
        for start in range(0, size, 50_000):
            end = min(size, start + 50_000)
            vec.upsert([IndexedChunk(f"bench/d{i}#0", "bench", f"d{i}", "", scope_acl(i), vectors[i]) for i in range(start, end)])
        vec.commit()
        build_s = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        rows.append([label, "vector build", f"{size / build_s:,.0f} chunks/s", f"{build_s:.1f} s", f"disk {du(workdir / 'vec') / 1e6:,.0f} MB", f"peak RSS {rss:,.0f} MB"])
        qv = clustered(args.queries, centroids, rng)
        ids = np.arange(size)
        for ef in [vec.ef_search] + args.ef_sweep:
            vec.ef_search = ef
            for scope, every in SCOPES.items():
                allowed = ids[ids % every == 0]
                path = "exact" if len(allowed) <= vec.exact_max or len(allowed) < vec.graph_min_fraction * size else "hnsw"
                if ef in args.ef_sweep and path == "exact":
                    continue
                reader, sub = reader_for(scope), vectors[allowed]
                times, recall = [], []
                for j in range(args.queries):
                    t = time.perf_counter()
                    got = vec.search(reader, qv[j], 10)
                    times.append(time.perf_counter() - t)
                    truth = allowed[np.argsort(-(sub @ qv[j]))[:10]]
                    recall.append(len({f"bench/d{i}#0" for i in truth} & {c for c, _ in got}) / 10)
                name = f"vector scope {scope} ({path}{f', ef_search {ef}' if path == 'hnsw' else ''})"
                rows.append([label, name, f"p50 {pct(times, 50):.2f} ms", f"p99 {pct(times, 99):.2f} ms", f"recall@10 {np.mean(recall):.4f}", f"min {min(recall):.1f}"])
        vec.ef_search = VectorIndex(None, DIM).ef_search
        # ---- the whole engine step (query embedding excluded) ----------------
        reader = reader_for("100%")
        times = []
        for j, q in enumerate(queries):
            t = time.perf_counter()
            rrf([lex.search(reader, q, 20), vec.search(reader, qv[j], 20)], k=6)
            times.append(time.perf_counter() - t)
        rows.append([label, "lexical+vector+rrf, 100%", f"p50 {pct(times, 50):.2f} ms", f"p99 {pct(times, 99):.2f} ms", "k=20 each, top 6", ""])
        lex.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def parse_size(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1_000) if s.endswith("k") else int(float(s[:-1]) * 1_000_000) if s.endswith("m") else int(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10k", help="comma-separated corpus sizes, e.g. 10k,100k,1M (default 10k)")
    ap.add_argument("--queries", type=int, default=500, help="queries per measurement (default 500)")
    ap.add_argument("--vocab", type=int, default=50_000, help="vocabulary size (default 50000)")
    ap.add_argument("--vector-max", default="1M", help="skip the vector part above this size (default 1M)")
    ap.add_argument("--exact-max", type=int, default=20_000, help="VectorIndex exact_max (default 20000)")
    ap.add_argument("--graph-min-fraction", type=float, default=0.1, help="VectorIndex graph_min_fraction (default 0.1)")
    ap.add_argument("--ef-sweep", default="", help="extra VectorIndex ef_search values to measure graph-path scopes with, e.g. 64,128")
    ap.add_argument("--writer-threads", type=int, default=1, help="tantivy indexing threads (default 1)")
    ap.add_argument("--fts5", action="store_true", help="also time SQLite FTS5 (porter, stopwords dropped) as the baseline")
    args = ap.parse_args()
    args.vector_max = parse_size(args.vector_max)
    args.ef_sweep = [int(x) for x in args.ef_sweep.split(",") if x.strip()]
    rows: list[list[str]] = []
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        run(size, args, rows)
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    header = ["size", "measure", "", "", "", ""]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
