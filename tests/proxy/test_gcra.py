"""The GCRA core: parsing, burst then steady rate, all-or-nothing, reconciliation, eviction."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_warden.proxy.gcra import MemoryGCRA, Rate, parse_rate


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("5/minute", 5, 60.0),
        ("600/min", 600, 60.0),
        ("10/second", 10, 1.0),
        ("1000/hour", 1000, 3600.0),
        ("1/day", 1, 86400.0),
        ("20/30s", 20, 30.0),
        ("200_000/minute", 200000, 60.0),
        (" 3 / 2h ", 3, 7200.0),
        ("7/1.5m", 7, 90.0),
    ],
)
def test_parse_rate_accepts(text: str, count: int, period: float) -> None:
    assert parse_rate(text) == Rate(count, period)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("5", "expected N/UNIT"),
        ("five/minute", "expected N/UNIT"),
        ("5/fortnight", "unknown unit 'fortnight'"),
        ("0/minute", "count must be positive"),
        ("5/0s", "period must be positive"),
        ("-1/minute", "expected N/UNIT"),
        ("10000000/second", "faster than"),
        ("", "expected N/UNIT"),
    ],
)
def test_parse_rate_rejects_with_clear_message(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_rate(text)


def test_rate_str_round_trips() -> None:
    for text in ("5/minute", "10/second", "1000/hour", "1/day", "20/30s"):
        assert parse_rate(str(parse_rate(text))) == parse_rate(text)


def test_burst_of_n_then_steady_rate() -> None:
    g, rate = MemoryGCRA(), parse_rate("5/minute")
    results = [g.check("k", rate, now=1000.0) for _ in range(6)]
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert [r.remaining for r in results[:5]] == [4, 3, 2, 1, 0]
    assert results[5].retry_after_s == pytest.approx(12.0)
    assert results[4].reset_s == pytest.approx(60.0)
    # one emission interval later exactly one more is admitted
    assert not g.check("k", rate, now=1011.999).allowed
    assert g.check("k", rate, now=1012.0).allowed
    assert not g.check("k", rate, now=1012.0).allowed


def test_refusal_does_not_charge() -> None:
    g, rate = MemoryGCRA(), parse_rate("2/second")
    for _ in range(50):
        g.check("k", rate, now=10.0)
    assert g.check("k", rate, now=11.0).allowed
    assert g.check("k", rate, now=11.0).allowed


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=40),
    period=st.sampled_from([1.0, 7.0, 60.0, 90.0]),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_never_more_than_burst_plus_steady_rate(count: int, period: float, seed: int) -> None:
    """Random bursty arrivals: any interval of length L admits at most N + L / T (T = period / N).

    That is the GCRA guarantee: a burst of N, then the steady rate, never more.
    """
    rng = random.Random(seed)
    g, rate = MemoryGCRA(), Rate(count, period)
    t, admitted_us = 0.0, []
    for _ in range(600):
        t += rng.choice([0.0, 0.0, rng.random() * period / count, rng.random() * period])
        if g.check("k", rate, now=t).allowed:
            admitted_us.append(int(t * 1_000_000))
    # (j - i + 1) <= N + (t_j - t_i) / T for all i <= j, checked in O(n) on exact fractions
    interval = rate.interval_us
    lowest = None
    for k, tk in enumerate(admitted_us):
        v = k * interval - tk
        lowest = v if lowest is None or v < lowest else lowest
        assert v - lowest + interval <= count * interval
    assert len(admitted_us) >= min(count, 1)


def test_steady_rate_over_a_long_run() -> None:
    g, rate = MemoryGCRA(), parse_rate("7/minute")
    admitted = sum(g.check("k", rate, now=i * 0.25).allowed for i in range(4 * 600))  # 10 minutes, 4 tries/s
    # burst of 7 plus 7 per minute thereafter, never more
    assert admitted <= 7 + 70
    assert admitted >= 7 + 69


def test_check_many_is_all_or_nothing() -> None:
    g = MemoryGCRA()
    small, big = parse_rate("1/minute"), parse_rate("100/minute")
    assert all(r.allowed for r in g.check_many([("a", big, 1), ("b", small, 1)], now=0.0))
    res = g.check_many([("a", big, 1), ("b", small, 1)], now=0.0)
    assert [r.allowed for r in res] == [True, False]
    # "a" reports its state without this refused request's charge, and was not charged
    assert res[0].remaining == 99
    assert g.peek("a", big, now=0.0).remaining == 99


def test_check_many_same_key_sees_earlier_items() -> None:
    g, rate = MemoryGCRA(), parse_rate("3/minute")
    res = g.check_many([("k", rate, 2), ("k", rate, 2)], now=0.0)
    assert [r.allowed for r in res] == [True, False]
    assert g.peek("k", rate, now=0.0).remaining == 3  # nothing charged
    assert all(r.allowed for r in g.check_many([("k", rate, 2), ("k", rate, 1)], now=0.0))
    assert g.peek("k", rate, now=0.0).remaining == 0


def test_cost_above_limit_is_never_admissible() -> None:
    g, rate = MemoryGCRA(), parse_rate("100/minute")
    r = g.check("k", rate, cost=101, now=0.0)
    assert not r.allowed and math.isinf(r.retry_after_s)
    assert g.check("k", rate, cost=100, now=0.0).allowed


def test_token_costs_and_retry_after() -> None:
    g, rate = MemoryGCRA(), parse_rate("1000/minute")
    assert g.check("k", rate, cost=900, now=0.0).allowed
    r = g.check("k", rate, cost=200, now=0.0)
    assert not r.allowed and r.remaining == 100
    assert r.retry_after_s == pytest.approx(6.0)  # 100 more tokens at 1000/60 per second
    assert g.check("k", rate, cost=200, now=6.0).allowed


def test_adjust_refund_and_extra_charge() -> None:
    g, rate = MemoryGCRA(), parse_rate("1000/minute")
    g.check("k", rate, cost=800, now=0.0)
    g.adjust("k", rate, -700, now=0.0)  # actual usage was 100
    assert g.peek("k", rate, now=0.0).remaining == 900
    g.adjust("k", rate, 2000, now=0.0)  # usage far above the estimate: the debt delays later requests
    r = g.check("k", rate, cost=1, now=0.0)
    assert not r.allowed and r.retry_after_s == pytest.approx(66.06, abs=0.01)
    g.adjust("k", rate, -(10**6), now=0.0)  # a refund never goes below a full bucket
    assert g.peek("k", rate, now=0.0).remaining == 1000
    assert len(g) == 0


def test_expired_keys_are_evicted() -> None:
    g, rate = MemoryGCRA(min_sweep=64), parse_rate("10/second")
    for i in range(10_000):
        g.check(f"user{i}", rate, now=i * 0.01)
    # only keys touched within the last second can still hold state
    assert len(g) <= 2 * 100 + 64
    assert g.sweep(int(1e9 * 1e6)) > 0
    assert len(g) == 0


def test_negative_cost_rejected() -> None:
    with pytest.raises(ValueError, match="cost"):
        MemoryGCRA().check("k", parse_rate("1/second"), cost=-1, now=0.0)
