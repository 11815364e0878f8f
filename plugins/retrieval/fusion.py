"""Reciprocal rank fusion of several ranked result lists."""

from __future__ import annotations


def rrf(ranked_lists: list[list[tuple[str, float]]], k: int, c: int = 60) -> list[tuple[str, float, list[int | None]]]:
    """Fuse ranked lists by reciprocal rank: ``score(d) = sum over lists of 1 / (c + rank)``.

    ``ranked_lists`` hold ``(chunk_id, score)`` best first (the scores are ignored:
    only ranks matter, so BM25 and cosine need no calibration). Ranks are 1-based;
    an id repeated within one list counts at its best rank. Returns the best ``k`` as
    ``(chunk_id, fused_score, ranks)`` where ``ranks[i]`` is the id's 1-based rank in
    list ``i`` or ``None``. Ties break by best single rank, then by chunk id, so the
    output is deterministic.
    """
    if k <= 0:
        return []
    if c < 0:
        raise ValueError("rrf constant c must be >= 0")
    ranks: dict[str, list[int | None]] = {}
    for i, ranked in enumerate(ranked_lists):
        for rank, (chunk_id, _score) in enumerate(ranked, start=1):
            slots = ranks.setdefault(chunk_id, [None] * len(ranked_lists))
            if slots[i] is None:
                slots[i] = rank
    fused = [(cid, sum(1.0 / (c + r) for r in slots if r is not None), slots) for cid, slots in ranks.items()]
    fused.sort(key=lambda item: (-item[1], min(r for r in item[2] if r is not None), item[0]))
    return fused[:k]
