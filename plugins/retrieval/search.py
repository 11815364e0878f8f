"""Searching a replica's local indexes, re-checked against the store of record.

Each engine returns the best ``candidate_k`` chunks the reader may read (ACL
and tenant enforced inside the engine); they are fused by reciprocal rank,
and every candidate is re-checked against the store of record (it must still
exist in the reader's tenant and its *current* ACL must allow the reader)
before the context budget is applied.  Chunk ids embed the content hash of
their document, so an engine that lags behind a replacement can only name
ids the store no longer has: a deleted, replaced or newly restricted
document is never served, however far the local indexes lag.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import numpy as np

from llm_warden.plugins.retrieval.acl import Acl, Reader
from llm_warden.plugins.retrieval.fusion import rrf
from llm_warden.plugins.retrieval.inject import Hit, SearchResult, build_result

if TYPE_CHECKING:
    from llm_warden.plugins.retrieval.service import RetrievalService


async def search(svc: RetrievalService, reader: Reader, query: str, top_k: int, max_tokens: int, debug: bool) -> SearchResult:
    """What would be injected for ``reader`` (see :meth:`RetrievalService.search`)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    lists, names, qvec = await _candidates(svc, reader, query, svc.cfg.candidate_k, timings)
    t = time.perf_counter()
    fused = rrf(lists, svc.cfg.candidate_k, svc.cfg.rrf_c) if len(lists) > 1 else [
        (cid, score, [rank]) for rank, (cid, score) in enumerate(lists[0] if lists else [], start=1)
    ]
    timings["fuse_ms"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    rows = await svc.store.fetch_chunks(reader.tenant, [cid for cid, _, _ in fused])
    timings["fetch_ms"] = (time.perf_counter() - t) * 1000
    scores = [dict(lst) for lst in lists]
    hits: list[Hit] = []
    for cid, fused_score, ranks in fused:
        per: dict[str, float] = {}
        per_rank: dict[str, int] = {}
        for i, name in enumerate(names):
            rank = ranks[i]
            if rank is not None:
                per[name] = scores[i][cid]
                per_rank[name] = rank
        if len(names) > 1:
            per["rrf"] = fused_score
        hits.append(Hit.make(cid, rows.get(cid), fused_score, per, per_rank, reader))
    result = build_result(query, svc.cfg.mode, hits, top_k, max_tokens, debug)
    if debug:
        t = time.perf_counter()
        result.excluded.extend(await _acl_excluded(svc, reader, query, qvec, names, result, top_k))
        timings["debug_acl_ms"] = (time.perf_counter() - t) * 1000
    timings["total_ms"] = (time.perf_counter() - t0) * 1000
    result.timings = timings
    return result


async def _candidates(
    svc: RetrievalService, reader: Reader, query: str, k: int, timings: dict[str, float]
) -> tuple[list[list[tuple[str, float]]], list[str], np.ndarray | None]:
    """Each engine's ACL-filtered candidates.  The lexical search runs while
    the query is being embedded and the vector search runs: the step costs
    the slower of the two branches, not their sum."""
    mode = svc.cfg.mode
    lexical, vector, embedder = svc.lexical, svc.vector, svc.embedder

    async def lexical_branch() -> list[tuple[str, float]]:
        t = time.perf_counter()
        assert lexical is not None
        if svc.chunks <= svc.cfg.inline_search_max_chunks:
            out = lexical.search(reader, query, k)
        else:
            out = await asyncio.to_thread(lexical.search, reader, query, k)
        timings["bm25_ms"] = (time.perf_counter() - t) * 1000
        return out

    async def vector_branch() -> tuple[np.ndarray, list[tuple[str, float]] | None]:
        assert embedder is not None
        t = time.perf_counter()
        qv = (await embedder.embed([query]))[0]
        timings["embed_ms"] = (time.perf_counter() - t) * 1000
        if vector is None:
            return qv, None
        t = time.perf_counter()
        out = await asyncio.to_thread(vector.search, reader, qv, k)
        timings["vector_ms"] = (time.perf_counter() - t) * 1000
        return qv, out

    use_lexical = mode in ("hybrid", "bm25") and lexical is not None
    use_vector = mode in ("hybrid", "vector") and embedder is not None
    if use_lexical and use_vector:
        lex, (qvec, vec) = await asyncio.gather(lexical_branch(), vector_branch())
    else:
        lex = await lexical_branch() if use_lexical else None
        qvec, vec = await vector_branch() if use_vector else (None, None)
    lists: list[list[tuple[str, float]]] = []
    names: list[str] = []
    if lex is not None:
        lists.append(lex)
        names.append("bm25")
    if vec is not None:
        lists.append(vec)
        names.append("vector")
    return lists, names, qvec


async def _acl_excluded(
    svc: RetrievalService, reader: Reader, query: str, qvec: np.ndarray | None, names: list[str], result: SearchResult, top_k: int
) -> list[Hit]:
    """Debug only: readable-by-someone chunks that would rank above the cut but this reader may not read.

    The engines only search as some reader, so the tenant-wide ranking is
    assembled from one witness reader per distinct ACL of the tenant
    (at most 64): each witness may read every chunk of its ACL, and
    BM25 and inner-product scores do not depend on the reader, so merging
    their lists by score gives the unfiltered ranking.
    """
    witnesses: set[Reader] = set()
    for raw in await svc.store.distinct_acls(reader.tenant, 64):
        w = witness(reader.tenant, Acl.from_json(raw))
        if w is not None:
            witnesses.add(w)
    k = svc.cfg.candidate_k
    merged: list[dict[str, float]] = [{} for _ in names]
    for w in witnesses:
        for i, name in enumerate(names):
            if name == "bm25" and svc.lexical is not None:
                res = await asyncio.to_thread(svc.lexical.search, w, query, k)
            elif name == "vector" and svc.vector is not None and qvec is not None:
                res = await asyncio.to_thread(svc.vector.search, w, qvec, k)
            else:
                continue
            merged[i].update(res)
    lists = [sorted(m.items(), key=lambda kv: (-kv[1], kv[0]))[:k] for m in merged]
    fused: list[tuple[str, float, list[int | None]]] = (
        rrf(lists, k, svc.cfg.rrf_c) if len(lists) > 1 else [(cid, s, [r]) for r, (cid, s) in enumerate(lists[0] if lists else [], 1)]
    )
    cut = max([top_k, *(h.rank for h in result.hits)])
    rows = await svc.store.fetch_chunks(reader.tenant, [cid for cid, _, _ in fused])
    out = []
    for rank, (cid, score, ranks) in enumerate(fused, start=1):
        row = rows.get(cid)
        if rank > cut or row is None:
            continue
        if not Acl.from_json(row[1].acl).allows(reader.subject, reader.groups):
            per = {names[i]: (dict(lists[i])[cid]) for i in range(len(names)) if ranks[i] is not None}
            out.append(Hit(chunk_id=cid, doc_id=row[1].doc_id, score=score, scores=per, ranks={}, rank=rank, excluded_reason="acl"))
    return out


def witness(tenant: str, acl: Acl) -> Reader | None:
    """A reader that ``acl`` allows (None when it allows no one)."""
    probe = "\x00warden-debug"
    if acl.public and probe not in acl.deny_users:
        return Reader(tenant, probe, frozenset())
    for user in sorted(acl.allow_users - acl.deny_users):
        return Reader(tenant, user, frozenset())
    for group in sorted(acl.allow_groups - acl.deny_groups):
        return Reader(tenant, probe, frozenset({group}))
    return None
