"""Fixtures for the limits plugin tests: real Redis (shared and private servers), real SQLite."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from plugins.ratelimit.config import LimitsConfig
from plugins.ratelimit.plugin import LimitsPlugin
from proxy.config import Config
from proxy.confload import load_dataclass
from proxy.plugin import PluginContext
from tests.plugins.ratelimit.limits_helpers import REDIS_URL, MakePlugin, RedisServer


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A unique key prefix on the shared Redis; every key under it is deleted afterwards."""
    prefix = f"wtest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    r = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    srv = RedisServer()
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
async def make_plugin(tmp_path: Path) -> AsyncIterator[MakePlugin]:
    """``await make_plugin(rules=[...], backend=..., **keys)``: a started plugin, stopped at teardown."""
    started: list[LimitsPlugin] = []

    async def make(**section: Any) -> LimitsPlugin:
        section.setdefault("idempotency_db", str(tmp_path / f"idem-{len(started)}.db"))
        cfg = load_dataclass(LimitsConfig, section, "limits")
        plugin = LimitsPlugin(cfg)
        config = Config(base_dir=tmp_path)
        await plugin.start(PluginContext(config=config, section=cfg, services={}))
        started.append(plugin)
        return plugin

    yield make
    for p in started:
        await p.stop()
