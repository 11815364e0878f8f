"""Fixtures of the MCP gateway tests: a real upstream MCP server (official SDK) and the SDK's client through Warden."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import ADMIN_TOKEN, WardenFactory
from tests.proxy.mcp.upstream_server import HttpServer, SideEffects, build_server

UPSTREAM_TOKEN = "Bearer upstream-secret-for-crm-0123456789"
os.environ["MCP_CRM_TOKEN"] = UPSTREAM_TOKEN

ORDER = {"type": "string", "pattern": "^o-[0-9]{1,8}$"}
TOOLS: list[dict[str, Any]] = [
    {
        "server": "crm",
        "name": "lookup",
        "effect": "read",
        "schema": {"type": "object", "properties": {"order_id": ORDER}, "required": ["order_id"], "additionalProperties": False},
    },
    {
        "server": "crm",
        "name": "refund",
        "effect": "write",
        "allow_groups": ["support"],
        "approval": "required",
        "approval_if": {"type": "object", "properties": {"amount": {"minimum": 100}}, "required": ["amount"]},
        "schema": {
            "type": "object",
            "properties": {"order_id": ORDER, "amount": {"type": "integer", "minimum": 1, "maximum": 1000}},
            "required": ["order_id", "amount"],
            "additionalProperties": False,
        },
    },
    {
        "server": "crm",
        "name": "confirm",
        "effect": "read",
        "allow_groups": ["ops"],
        "schema": {"type": "object", "properties": {"order_id": ORDER}, "required": ["order_id"], "additionalProperties": False},
    },
]


class HeaderLog:
    """An ASGI wrapper that records the Authorization header every upstream request carried."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.authorization: list[str | None] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            value = dict(scope["headers"]).get(b"authorization")
            self.authorization.append(value.decode() if value is not None else None)
        await self.app(scope, receive, send)


class Upstream:
    def __init__(self) -> None:
        self.effects = SideEffects()
        self.server = build_server(self.effects)
        self.http = HttpServer(self.server)
        self.headers: HeaderLog | None = None

    async def start(self) -> None:
        app = self.server.streamable_http_app()
        self.headers = HeaderLog(app)
        await self.http.start(self.headers)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.http.stop()


def mcp_config(tmp_path: Path, servers: list[dict[str, Any]], *, read_only: bool = False, unpinned: str = "accept_first", audit: bool = True, **mcp: Any) -> dict[str, Any]:
    return {
        "plugins": {"enabled": ["tools"]},
        "policy": {"read_only": read_only, "state_db": str(tmp_path / "state.db"), "mode_refresh_s": 0},
        "tools": TOOLS,
        "mcp": {"servers": servers, "unpinned": unpinned, "pin_db": str(tmp_path / "pins.db"), **mcp},
        "audit": {"enabled": audit, "durability": "sync"},
    }


@pytest.fixture
async def gateway(warden_factory: WardenFactory, upstream: Upstream, tmp_path: Path) -> RunningWarden:
    return await warden_factory(mcp_config(tmp_path, [{"name": "crm", "url": upstream.http.url, "headers_env": {"Authorization": "MCP_CRM_TOKEN"}}]))


def mcp_url(rw: RunningWarden, server: str = "crm") -> str:
    return rw.base_url.removesuffix("/v1") + f"/mcp/{server}"


@asynccontextmanager
async def mcp_client(rw: RunningWarden, token: str, server: str = "crm", mode: str = "legacy") -> AsyncIterator[Client]:
    """The official SDK's client, connected to ``/mcp/{server}`` with the caller's Warden JWT."""
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as hc:
        async with Client(streamable_http_client(mcp_url(rw, server), http_client=hc), mode=mode) as c:  # type: ignore[arg-type]
            yield c


async def admin(rw: RunningWarden, method: str, path: str, body: Any = None) -> httpx2.Response:
    async with httpx2.AsyncClient() as hc:
        return await hc.request(method, rw.admin_url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


TokenFactory = Callable[..., str]
