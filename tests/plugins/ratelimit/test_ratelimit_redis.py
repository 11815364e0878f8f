"""The Redis backend: exact under concurrency, across processes, with expiring keys."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest
import redis.asyncio as aioredis

from llm_warden.plugins.ratelimit.backends import BackendDown, MemoryBackend, RedisBackend, RedisClient
from llm_warden.proxy.gcra import parse_rate
from tests.plugins.ratelimit.limits_helpers import REDIS_URL


def client(url: str = REDIS_URL, fail_open: bool = False) -> RedisClient:
    return RedisClient(url, timeout_s=0.5, max_connections=16, retry_s=0.2, fail_open=fail_open)


@pytest.mark.parametrize("backend_kind", ["memory", "redis"])
async def test_k_concurrent_decisions_admit_exactly_n(backend_kind: str, redis_prefix: str) -> None:
    c = client()
    backend = RedisBackend(c) if backend_kind == "redis" else MemoryBackend()
    rate = parse_rate("37/minute")
    try:
        results = await asyncio.gather(*[backend.check_many([(f"{redis_prefix}k", rate, 1)]) for _ in range(200)])
        assert sum(r[0].allowed for r in results) == 37
    finally:
        await c.close()


async def test_multi_rule_decision_is_all_or_nothing_in_redis(redis_prefix: str) -> None:
    c = client()
    b = RedisBackend(c)
    per_user, per_tenant = parse_rate("3/minute"), parse_rate("5/minute")
    try:
        items = lambda user: [(f"{redis_prefix}u:{user}", per_user, 1), (f"{redis_prefix}tenant", per_tenant, 1)]  # noqa: E731
        alice = [await b.check_many(items("alice")) for _ in range(4)]
        assert [all(r.allowed for r in res) for res in alice] == [True, True, True, False]
        # alice's refused 4th request did not charge the tenant bucket
        assert alice[3][1].allowed and alice[3][1].remaining == 2
        bob = [await b.check_many(items("bob")) for _ in range(3)]
        assert [all(r.allowed for r in res) for res in bob] == [True, True, False]
        assert not bob[2][1].allowed and bob[2][0].allowed
        assert bob[2][1].retry_after_s == pytest.approx(12.0, abs=0.1)
    finally:
        await c.close()


async def test_redis_keys_expire_when_full_again(redis_prefix: str) -> None:
    c = client()
    b = RedisBackend(c)
    r = aioredis.from_url(REDIS_URL)
    try:
        await b.check_many([(f"{redis_prefix}k", parse_rate("10/second"), 4)])
        ttl = await r.pttl(f"{redis_prefix}k")
        assert 0 < ttl <= 401
        await b.check_many([(f"{redis_prefix}t", parse_rate("1000/hour"), 1)])
        assert 0 < await r.pttl(f"{redis_prefix}t") <= 3_600_001
    finally:
        await r.aclose()
        await c.close()


async def test_redis_adjust_refunds_and_charges(redis_prefix: str) -> None:
    c = client()
    b = RedisBackend(c)
    rate = parse_rate("1000/minute")
    key = f"{redis_prefix}tok"
    try:
        assert (await b.check_many([(key, rate, 800)]))[0].remaining == 200
        await b.adjust([(key, rate, -700)])
        assert (await b.check_many([(key, rate, 0)]))[0].remaining == 900
        await b.adjust([(key, rate, 250)])
        res = (await b.check_many([(key, rate, 0)]))[0]
        assert res.remaining == 650
        await b.adjust([(key, rate, -10_000)])
        r = aioredis.from_url(REDIS_URL)
        assert await r.exists(key) == 0  # a full bucket needs no key
        await r.aclose()
    finally:
        await c.close()


async def test_never_admissible_cost_in_redis(redis_prefix: str) -> None:
    c = client()
    try:
        res = (await RedisBackend(c).check_many([(f"{redis_prefix}k", parse_rate("10/minute"), 11)]))[0]
        assert not res.allowed and res.retry_after_s == float("inf")
    finally:
        await c.close()


_WORKER = textwrap.dedent(
    """
    import asyncio, sys, time
    from llm_warden.plugins.ratelimit.backends import RedisBackend, RedisClient
    from llm_warden.proxy.gcra import parse_rate

    async def main(key, start_at, k):
        c = RedisClient(sys.argv[4], 1.0, 8, 1.0, False)
        b = RedisBackend(c)
        await c.redis.ping()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        allowed = 0
        for _ in range(k // 10):  # waves, so the two processes interleave even on a loaded machine
            res = await asyncio.gather(*[b.check_many([(key, parse_rate("50/hour"), 1)]) for _ in range(10)])
            allowed += sum(r[0].allowed for r in res)
            await asyncio.sleep(0.02)
        print(allowed)
        await c.close()

    asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
    """
)


async def test_two_processes_sharing_redis_admit_exactly_n(redis_prefix: str) -> None:
    start_at = f"{time.time() + 4.0:.3f}"  # both interpreters are up and connected by then, even on a loaded machine
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WORKER,
            f"{redis_prefix}shared",
            start_at,
            "120",
            REDIS_URL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outs = [await p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()
    counts = [int(out.decode().strip()) for out, _ in outs]
    assert sum(counts) == 50
    assert all(cnt > 0 for cnt in counts), counts  # both really competed


async def test_unreachable_redis_raises_backend_down_and_probes_sparingly() -> None:
    from tests.plugins.ratelimit.limits_helpers import free_port

    c = client(f"redis://127.0.0.1:{free_port()}/0")
    b = RedisBackend(c)
    try:
        with pytest.raises(BackendDown):
            await b.check_many([("k", parse_rate("1/second"), 1)])
        assert not c.health.up and c.health.errors == 1
        # until the next probe, requests do not touch the network at all
        with pytest.raises(BackendDown, match="next probe"):
            await b.check_many([("k", parse_rate("1/second"), 1)])
        assert c.health.errors == 1
    finally:
        await c.close()
