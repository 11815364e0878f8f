"""Fixtures for the tools plugin: a started plugin on a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from llm_warden.plugins.tools import ToolsPlugin
from llm_warden.proxy.plugin import PluginContext
from tests.plugins.tools.helpers import AuditRecorder, build_config

PluginFactory = Callable[..., Awaitable[tuple[ToolsPlugin, PluginContext]]]


@pytest.fixture
async def make_plugin(tmp_path: Path) -> AsyncIterator[PluginFactory]:
    started: list[ToolsPlugin] = []

    async def factory(policy: dict[str, Any] | None = None, tools: list[dict[str, Any]] | None = None) -> tuple[ToolsPlugin, PluginContext]:
        cfg = build_config(tmp_path, policy, tools)
        plugin = ToolsPlugin(cfg.plugin_sections["policy"])
        ctx = PluginContext(config=cfg, section=cfg.plugin_sections["policy"], services={}, audit_event=AuditRecorder())
        await plugin.start(ctx)
        started.append(plugin)
        return plugin, ctx

    yield factory
    for p in started:
        await p.stop()


@pytest.fixture
async def plugin(make_plugin: PluginFactory) -> ToolsPlugin:
    p, _ = await make_plugin()
    return p


