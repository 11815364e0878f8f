"""Redis killed mid-test and restarted: fail-closed and fail-open, one log line per outage, recovery."""

from __future__ import annotations

import asyncio
import logging

import pytest

from llm_warden.plugins.ratelimit.plugin import LimitsPlugin
from llm_warden.proxy.errors import RateLimited, ServiceUnavailable
from tests.plugins.ratelimit.limits_helpers import MakePlugin, RedisServer, Upstream, drive, make_exchange, recorded

RULES = [{"scope": "user", "requests": "3/minute"}]


async def _until_up(p: LimitsPlugin, user: str, within_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while asyncio.get_running_loop().time() < deadline:
        ex = await drive(p, make_exchange(subject=user))
        if not isinstance(ex.error, ServiceUnavailable):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("limits did not recover after Redis came back")


async def test_fail_closed_outage_and_recovery(
    make_plugin: MakePlugin, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="warden.limits")
    p = await make_plugin(backend="redis", redis_url=redis_server.url, redis_retry_s=0.1, rules=RULES)
    assert (await drive(p, make_exchange())).error is None
    assert p.backend_up

    redis_server.kill()
    refused = [await drive(p, make_exchange()) for _ in range(20)]
    assert all(isinstance(ex.error, ServiceUnavailable) and ex.status == 503 for ex in refused)
    assert refused[0].error is not None and refused[0].error.rule == "limits.backend"
    assert not p.backend_up
    assert p.decisions[("limits.backend", "fail_closed")] == 20
    down_logs = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(down_logs) == 1 and "fail_open = false" in down_logs[0].getMessage()

    redis_server.start()  # same port, empty data set
    await _until_up(p, "probe")
    assert p.backend_up
    assert len([r for r in caplog.records if "reachable again" in r.getMessage()]) == 1
    # limits are enforced again, exactly
    results = [await drive(p, make_exchange(subject="after")) for _ in range(4)]
    assert [ex.error is None for ex in results] == [True, True, True, False]
    assert isinstance(results[3].error, RateLimited)


async def test_fail_open_outage_admits_and_counts(
    make_plugin: MakePlugin, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="warden.limits")
    p = await make_plugin(backend="redis", redis_url=redis_server.url, redis_retry_s=0.1, fail_open=True, rules=RULES)
    for _ in range(3):
        assert (await drive(p, make_exchange())).error is None
    assert isinstance((await drive(p, make_exchange())).error, RateLimited)

    redis_server.kill()
    admitted = [await drive(p, make_exchange()) for _ in range(10)]
    assert all(ex.error is None for ex in admitted)
    assert all(recorded(ex)["decision"]["decision"] == "fail_open" for ex in admitted)
    assert p.decisions[("limits.backend", "fail_open")] == 10
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1

    redis_server.start()
    deadline = asyncio.get_running_loop().time() + 5
    while not p.backend_up and asyncio.get_running_loop().time() < deadline:
        await drive(p, make_exchange(subject="probe"))
        await asyncio.sleep(0.05)
    assert p.backend_up
    results = [await drive(p, make_exchange(subject="fresh")) for _ in range(4)]
    assert [ex.error is None for ex in results] == [True, True, True, False]


async def test_idempotency_follows_fail_mode(make_plugin: MakePlugin, redis_server: RedisServer) -> None:
    closed = await make_plugin(backend="redis", redis_url=redis_server.url, redis_retry_s=0.1)
    opened = await make_plugin(backend="redis", redis_url=redis_server.url, redis_retry_s=0.1, fail_open=True)
    redis_server.kill()
    up = Upstream()
    ex = await drive(closed, make_exchange(headers={"Idempotency-Key": "k1"}), up)
    assert isinstance(ex.error, ServiceUnavailable) and ex.error.rule == "limits.idempotency" and up.calls == 0
    ex = await drive(opened, make_exchange(headers={"Idempotency-Key": "k1"}), up)
    assert ex.error is None and up.calls == 1
    assert recorded(ex)["idempotency"] == "skipped: backend down"


async def test_outage_mid_exchange_does_not_break_completion(make_plugin: MakePlugin, redis_server: RedisServer) -> None:
    p = await make_plugin(backend="redis", redis_url=redis_server.url, rules=[{"scope": "tenant", "tokens": "10000/minute"}])
    ex = make_exchange(headers={"Idempotency-Key": "k2"})
    await p.on_request(ex)
    redis_server.kill()
    await Upstream()(ex)
    await p.on_complete(ex)  # reconciliation and recording fail quietly; the claim expires by itself
    assert len(p.waiters) == 0
