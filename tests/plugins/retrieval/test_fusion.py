"""Reciprocal rank fusion."""

from __future__ import annotations

import pytest

from llm_warden.plugins.retrieval.fusion import rrf


def test_rrf_scores_and_ranks() -> None:
    lexical = [("a", 9.0), ("b", 5.0), ("c", 1.0)]
    vector = [("c", 0.9), ("a", 0.8), ("d", 0.1)]
    out = rrf([lexical, vector], k=10)
    assert [cid for cid, _s, _r in out] == ["a", "c", "b", "d"]
    a = out[0]
    assert a[1] == pytest.approx(1 / 61 + 1 / 62)
    assert a[2] == [1, 2]
    assert dict((cid, ranks) for cid, _s, ranks in out)["b"] == [2, None]
    assert dict((cid, ranks) for cid, _s, ranks in out)["d"] == [None, 3]


def test_rrf_truncates_and_handles_empty() -> None:
    assert rrf([], k=5) == []
    assert rrf([[], []], k=5) == []
    assert rrf([[("a", 1.0)]], k=0) == []
    assert len(rrf([[(str(i), 1.0) for i in range(20)]], k=6)) == 6


def test_rrf_single_list_keeps_order_and_custom_c() -> None:
    ranked = [("x", 3.0), ("y", 2.0), ("z", 1.0)]
    out = rrf([ranked], k=3, c=0)
    assert [cid for cid, _s, _r in out] == ["x", "y", "z"]
    assert out[0][1] == pytest.approx(1.0)


def test_rrf_ties_are_deterministic() -> None:
    out = rrf([[("b", 1.0), ("a", 1.0)], [("a", 1.0), ("b", 1.0)]], k=2)
    assert [cid for cid, _s, _r in out] == ["a", "b"]
    assert out[0][1] == out[1][1]


def test_rrf_duplicate_in_one_list_counts_best_rank() -> None:
    out = rrf([[("a", 1.0), ("a", 0.5), ("b", 0.1)]], k=2)
    assert out[0] == ("a", pytest.approx(1 / 61), [1])


def test_rrf_rejects_negative_c() -> None:
    with pytest.raises(ValueError):
        rrf([[("a", 1.0)]], k=1, c=-1)
