"""A local stdio MCP server that Warden starts, supervises and stops."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from tests.conftest import WardenFactory
from tests.proxy.mcp.conftest import TOOLS, TokenFactory, mcp_client, mcp_config

ROOT = str(Path(__file__).resolve().parents[3])
LOCAL_TOOLS = [{**t, "server": "local"} for t in TOOLS]


async def test_stdio_server_is_supervised(warden_factory: WardenFactory, token: TokenFactory, tmp_path: Path) -> None:
    log = tmp_path / "effects.jsonl"
    server = {"name": "local", "command": sys.executable, "args": ["-m", "tests.proxy.mcp.upstream_server", str(log)], "env": {"PYTHONPATH": "WARDEN_TEST_PYTHONPATH"}}
    os.environ["WARDEN_TEST_PYTHONPATH"] = ROOT
    cfg = mcp_config(tmp_path, [server])
    cfg["tools"] = LOCAL_TOOLS
    rw = await warden_factory(cfg)
    gw = rw.warden.mcp
    assert gw is not None
    sup = gw.stdio["local"]
    for _ in range(200):
        if sup.ready:
            break
        await asyncio.sleep(0.05)
    assert sup.ready and sup.generation == 1
    tok = token(groups=["support"])
    async with mcp_client(rw, tok, server="local") as c:
        assert sorted(t.name for t in (await c.list_tools()).tools) == ["lookup", "refund"]
        r = await c.call_tool("lookup", {"order_id": "o-1"})
        assert not r.is_error and "o-1" in r.content[0].text  # type: ignore[union-attr]
        bad = await c.call_tool("refund", {"order_id": "o-1", "amount": "all"})
        assert bad.is_error and "/amount" in bad.content[0].text  # type: ignore[union-attr]
        # Crash the server: Warden restarts it; this session belonged to the old process.
        assert sup.proc is not None
        old_pid = sup.proc.pid
        os.kill(old_pid, signal.SIGKILL)
        for _ in range(200):
            if sup.ready and sup.generation == 2:
                break
            await asyncio.sleep(0.05)
        assert sup.generation == 2 and sup.restarts == 1
        with pytest.raises(MCPError) as lost:
            await c.call_tool("lookup", {"order_id": "o-2"})
        # 404 rule mcp.session: the SDK tells the agent to start a new session.
        assert "mcp.session" in lost.value.error.message
    async with mcp_client(rw, tok, server="local") as c:
        r = await c.call_tool("lookup", {"order_id": "o-3"})
        assert not r.is_error
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [["lookup", {"order_id": "o-1"}], ["lookup", {"order_id": "o-3"}]]
    text = rw.warden.metrics.exposition().decode()
    assert 'warden_mcp_stdio_restarts{server="local"} 1.0' in text
    proc = sup.proc
    assert proc is not None and proc.pid != old_pid
    await rw.stop()
    assert proc.returncode is not None  # stopped with Warden
