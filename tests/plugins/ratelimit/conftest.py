"""Fixtures for the limits plugin tests: real Redis (shared and private servers), real SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from llm_warden.plugins.ratelimit.config import LimitsConfig
from llm_warden.plugins.ratelimit.plugin import LimitsPlugin
from llm_warden.proxy.config import Config
from llm_warden.proxy.confload import load_dataclass
from llm_warden.proxy.plugin import PluginContext
from tests.plugins.ratelimit.limits_helpers import MakePlugin


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
