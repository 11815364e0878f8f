"""The Redis tool state store: approvals and read-only mode shared by replicas (real Redis)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from llm_warden.plugins.tools import ToolsPlugin
from llm_warden.plugins.tools.redis_store import HISTORY_S, RedisToolStateStore
from llm_warden.plugins.tools.store import StateBackendDown
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.plugin import PluginContext
from tests.conftest import ADMIN_TOKEN
from tests.fakeprovider import FakeProvider, Reply
from tests.plugins.ratelimit.limits_helpers import RedisServer, free_port
from tests.plugins.tools.helpers import TOOLS, AuditRecorder, build_config, call, exchange
from tests.plugins.tools.test_tools_e2e import BIG, BODY, MemoryAudit, fn

REDIS_URL = "redis://127.0.0.1:6379/0"
BIG_REFUND = '{"invoice_id": "inv_7", "amount": 500, "reason": "fraud"}'
REVIEWER = {"tenant": "ops", "subject": "rita", "groups": [], "scopes": ["warden:admin"]}
PRINCIPAL = {"tenant": "acme", "subject": "alice"}
# A read tool that needs approval: with the mode failing closed (read-only) it still reaches the approval store.
EXPORT = {"name": "export", "effect": "read", "approval": "required", "schema": {"type": "object"}}

RedisPluginFactory = Callable[..., Awaitable[ToolsPlugin]]


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return redis_prefix


@pytest.fixture
async def store(prefix: str) -> AsyncIterator[RedisToolStateStore]:
    s = RedisToolStateStore(REDIS_URL, prefix)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def make_plugin(tmp_path: Path, prefix: str) -> AsyncIterator[RedisPluginFactory]:
    started: list[ToolsPlugin] = []

    async def factory(policy: dict[str, Any] | None = None, tools: list[dict[str, Any]] | None = None) -> ToolsPlugin:
        pol = {"state_backend": "redis", "redis_url": REDIS_URL, "redis_key_prefix": prefix, **(policy or {})}
        cfg = build_config(tmp_path, pol, tools)
        plugin = ToolsPlugin(cfg.plugin_sections["policy"])
        ctx = PluginContext(config=cfg, section=cfg.plugin_sections["policy"], services={}, audit_event=AuditRecorder())
        await plugin.start(ctx)
        started.append(plugin)
        return plugin

    yield factory
    for p in started:
        await p.stop()


async def _create(store: RedisToolStateStore, fp: str = "fp1", ttl: float = 3600, principal: dict[str, Any] | None = None) -> str:
    apr = await store.create(fingerprint=fp, principal=principal or PRINCIPAL, tool="refund", arguments='{"a":1}', request_id="req_1", ttl_s=ttl)
    return apr.id


# -- the store ------------------------------------------------------------


async def test_create_get_list_and_count(store: RedisToolStateStore, prefix: str) -> None:
    a = await _create(store, "fp1")
    b = await _create(store, "fp2", principal={"tenant": "beta", "subject": "bob"})
    got = await store.get(a)
    assert got is not None and got.status == "pending" and got.tenant == "acme" and got.principal == PRINCIPAL
    assert got.expires == pytest.approx(got.created + 3600)
    assert (await store.latest_for("fp1")) == got
    assert await store.latest_for("nope") is None and await store.get("apr_nope") is None
    assert [x.id for x in await store.list("pending")] == [b, a]
    assert [x.id for x in await store.list("pending", tenant="beta")] == [b]
    assert [x.id for x in await store.list("all", limit=1)] == [b]
    assert await store.pending_count() == 2
    r = aioredis.from_url(REDIS_URL)
    try:
        ttl_ms = await r.pttl(f"{prefix}apr:{a}")
        assert (3600 + HISTORY_S - 5) * 1000 < ttl_ms <= (3600 + HISTORY_S) * 1000
        await r.delete(f"{prefix}apr:{b}")  # expired by Redis: gone from listings and trimmed from the index
    finally:
        await r.aclose()
    assert [x.id for x in await store.list("all")] == [a]


async def test_decide_only_when_pending_and_consume_once(store: RedisToolStateStore) -> None:
    a = await _create(store)
    assert await store.decide(a, "approved", REVIEWER, "ok", 60)
    assert not await store.decide(a, "denied", REVIEWER, "late", 60)
    apr = await store.get(a)
    assert apr is not None and apr.status == "approved" and apr.reviewer == REVIEWER and apr.comment == "ok"
    assert await store.pending_count() == 0
    assert [x.id for x in await store.list("approved")] == [a]
    assert await store.consume(a, "req_2")
    assert not await store.consume(a, "req_3")
    apr = await store.get(a)
    assert apr is not None and apr.status == "consumed" and apr.consumed_request_id == "req_2"
    assert [x.id for x in await store.list("consumed")] == [a]
    d = await _create(store, "fp9")
    assert not await store.consume(d, "req_4")  # pending, not approved
    assert await store.decide(d, "denied", REVIEWER, "", 60)
    assert not await store.consume(d, "req_4")
    assert not await store.decide("apr_missing", "approved", REVIEWER, "", 60)


async def test_expiry(store: RedisToolStateStore) -> None:
    a = await _create(store, ttl=0.2)
    await asyncio.sleep(0.25)
    assert not await store.decide(a, "approved", REVIEWER, "", 60)
    assert [x.id for x in await store.list("expired")] == [a]
    assert await store.list("pending") == [] and await store.pending_count() == 0
    b = await _create(store, "fp2")
    assert await store.decide(b, "approved", REVIEWER, "", 0.2)
    await asyncio.sleep(0.25)
    assert not await store.consume(b, "req_2")
    assert {x.id for x in await store.list("expired")} == {a, b}


async def test_consume_exactly_once_across_two_stores(store: RedisToolStateStore, prefix: str) -> None:
    other = RedisToolStateStore(REDIS_URL, prefix)
    await other.open()
    try:
        for i in range(40):
            a = await _create(store, f"fp{i}")
            assert await other.decide(a, "approved", REVIEWER, "", 60)
            wins = await asyncio.gather(*(s.consume(a, f"req_{i}_{j}") for j, s in enumerate([store, other] * 4)))
            assert sum(wins) == 1, i
    finally:
        await other.close()


async def test_modes_and_version(store: RedisToolStateStore, prefix: str) -> None:
    other = RedisToolStateStore(REDIS_URL, prefix)
    await other.open()
    try:
        assert await other.changed_elsewhere()  # first read
        assert not await other.changed_elsewhere()
        await store.set_mode(None, True, {"subject": "ops"})
        await store.set_mode("acme", False, {"subject": "ops"})
        assert await other.changed_elsewhere()
        glob, tenants = await other.load_modes()
        assert glob is not None and glob.read_only and glob.actor == {"subject": "ops"}
        assert set(tenants) == {"acme"} and not tenants["acme"].read_only
        await store.set_mode("acme", None, {})
        assert (await other.load_modes())[1] == {}
    finally:
        await other.close()


# -- two plugin instances (replicas) on one Redis --------------------------


async def test_approval_lifecycle_across_replicas(make_plugin: RedisPluginFactory) -> None:
    a = await make_plugin()
    b = await make_plugin()
    held = await a.on_tool_call(exchange(), call("refund", BIG_REFUND))
    assert held.kind == "hold" and held.approval_id
    again = await b.on_tool_call(exchange(), call("refund", BIG_REFUND))
    assert again.kind == "hold" and again.approval_id == held.approval_id and "still pending" in again.reason
    assert await b.store_required().decide(held.approval_id, "approved", REVIEWER, "ok", 3600)
    d = await a.on_tool_call(exchange(), call("refund", BIG_REFUND))
    assert d.kind == "allow" and d.approval_id == held.approval_id
    assert (await b.on_tool_call(exchange(), call("refund", BIG_REFUND))).kind == "hold"


async def test_two_replicas_race_to_consume(make_plugin: RedisPluginFactory) -> None:
    a = await make_plugin()
    b = await make_plugin()
    for i in range(15):
        args = f'{{"to": "acct_{i}"}}'  # "wire": approval required, no rate limit
        held = await a.on_tool_call(exchange(), call("wire", args))
        assert held.kind == "hold" and held.approval_id
        assert await b.store_required().decide(held.approval_id, "approved", REVIEWER, "", 3600)
        results = await asyncio.gather(*(p.on_tool_call(exchange(), call("wire", args)) for p in (a, b, a, b)))
        allowed = [d for d in results if d.kind == "allow"]
        assert len(allowed) == 1 and allowed[0].approval_id == held.approval_id, i
        assert sorted(d.kind for d in results) == ["allow", "hold", "hold", "hold"]


async def test_mode_change_reaches_the_other_replica(make_plugin: RedisPluginFactory) -> None:
    a = await make_plugin(policy={"mode_refresh_s": 0.05})
    b = await make_plugin(policy={"mode_refresh_s": 0.05})
    assert b.mode.read_only_for("acme")[0] is False
    await a.set_mode("acme", True, {"subject": "ops"})
    await a.set_mode(None, True, {"subject": "ops"})
    for _ in range(40):
        await asyncio.sleep(0.05)
        if b.mode.read_only_for("acme")[0] and b.mode.global_read_only:
            break
    assert b.mode.read_only_for("acme") == (True, "for tenant 'acme'")
    assert b.mode.read_only_for("beta") == (True, "globally")
    assert (await b.on_tool_call(exchange(), call("note", '{"text": "x"}'))).rule == "policy.read_only"
    await a.set_mode(None, None, {"subject": "ops"})
    for _ in range(40):
        await asyncio.sleep(0.05)
        if b.mode.global_setting is None:
            break
    assert b.mode.read_only_for("beta") == (False, "globally (configured default)")


# -- Redis unreachable ------------------------------------------------------


async def test_unreachable_at_start_fails_closed(make_plugin: RedisPluginFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "warden.tools")
    p = await make_plugin(policy={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}, tools=[*TOOLS, EXPORT])
    assert p.mode.read_only_for("acme")[0] is True and p.mode.to_json()["source"] == "unavailable"
    assert (await p.on_tool_call(exchange(), call("note", '{"text": "x"}'))).rule == "policy.read_only"
    for _ in range(3):
        d = await p.on_tool_call(exchange(), call("export", "{}"))
        assert (d.kind, d.rule) == ("deny", "policy.state_backend") and "NOT executed" in d.reason
    with pytest.raises(StateBackendDown) as err:
        await p.store_required().list("pending")
    assert err.value.status == 503 and err.value.rule == "policy.state_backend"
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1


async def test_outage_keeps_last_mode_and_recovers(
    make_plugin: RedisPluginFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "warden.tools")
    p = await make_plugin(policy={"redis_url": redis_server.url, "mode_refresh_s": 0.05}, tools=[*TOOLS, EXPORT])
    await p.set_mode("acme", False, {"subject": "ops"})
    redis_server.kill()
    await asyncio.sleep(0.2)  # several refreshes fail
    assert p.mode.read_only_for("acme") == (False, "for tenant 'acme'")
    d = await p.on_tool_call(exchange(), call("export", "{}"))
    assert (d.kind, d.rule) == ("deny", "policy.state_backend")
    with pytest.raises(StateBackendDown):
        await p.set_mode(None, True, {"subject": "ops"})
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1
    redis_server.start()  # same port, empty (no persistence)
    for _ in range(60):
        await asyncio.sleep(0.05)
        if "acme" not in p.mode.tenants:
            break
    assert p.mode.tenants == {}
    assert (await p.on_tool_call(exchange(), call("export", "{}"))).kind == "hold"
    assert any("reachable again" in r.getMessage() for r in caplog.records)


# -- configuration ------------------------------------------------------------


def test_config_validation_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policy\.redis_url"):
        build_config(tmp_path, {"state_backend": "redis", "redis_url": "http://x"})
    with pytest.raises(ConfigError, match=r"policy\.redis_key_prefix"):
        build_config(tmp_path, {"state_backend": "redis", "redis_key_prefix": ""})
    with pytest.raises(ConfigError, match=r"policy\.state_backend"):
        build_config(tmp_path, {"state_backend": "memcached"})
    cfg = build_config(tmp_path)
    assert (cfg.plugin_sections["policy"].state_backend, cfg.plugin_sections["policy"].redis_key_prefix) == ("sqlite", "warden:tools:")


async def test_backend_cannot_change_on_reload(make_plugin: RedisPluginFactory, tmp_path: Path, prefix: str) -> None:
    p = await make_plugin()
    with pytest.raises(ConfigError, match=r"policy\.state_backend"):
        await p.reload(build_config(tmp_path).plugin_sections["policy"])
    moved = build_config(tmp_path, {"state_backend": "redis", "redis_key_prefix": prefix + "x:"})
    with pytest.raises(ConfigError, match=r"policy\.redis_key_prefix"):
        await p.reload(moved.plugin_sections["policy"])
    same = build_config(tmp_path, {"state_backend": "redis", "redis_key_prefix": prefix, "approval_ttl_s": 60})
    await p.reload(same.plugin_sections["policy"])
    assert p.policy.approval_ttl_s == 60


# -- end to end: two servers on one Redis --------------------------------------


async def _admin(w: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, w.admin_url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            return r.status, await r.json()


async def test_held_on_a_approved_on_b_passes_on_a(warden_factory: Any, token: Any, fake: FakeProvider, prefix: str) -> None:
    config = {
        "plugins": {"enabled": ["tools", "headers"]},
        "policy": {"state_backend": "redis", "redis_url": REDIS_URL, "redis_key_prefix": prefix, "read_only": False, "mode_refresh_s": 0.05},
        "tools": TOOLS,
    }
    a = await warden_factory(config, audit=MemoryAudit())
    b = await warden_factory(config, audit=MemoryAudit())
    client_a = openai.AsyncOpenAI(base_url=a.base_url, api_key=token(groups=["billing"]), max_retries=0)

    fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "refund", "arguments": BIG}]), Reply(content="Awaiting approval."))
    raw = await client_a.chat.completions.with_raw_response.create(**BODY, tools=[fn("refund")])  # type: ignore[list-item]
    assert raw.parse().choices[0].message.content == "Awaiting approval."
    assert raw.headers["x-warden-tool-decisions"].startswith("refund=held:apr_")

    status, listing = await _admin(b, "GET", "/admin/approvals")
    assert status == 200
    (apr,) = listing["data"]
    status, decided = await _admin(b, "POST", f"/admin/approvals/{apr['id']}/approve", {"comment": "ok"})
    assert status == 200 and decided["status"] == "approved"
    status, again = await _admin(a, "POST", f"/admin/approvals/{apr['id']}/approve", {})
    assert status == 409

    fake.push(Reply(content=None, tool_calls=[{"id": "c2", "name": "refund", "arguments": BIG}]))
    raw = await client_a.chat.completions.with_raw_response.create(**BODY, tools=[fn("refund")])  # type: ignore[list-item]
    assert [tc.id for tc in raw.parse().choices[0].message.tool_calls or []] == ["c2"]
    assert raw.headers["x-warden-tool-decisions"] == f"refund=allowed:{apr['id']}"
    status, got = await _admin(b, "GET", f"/admin/approvals/{apr['id']}")
    assert got["status"] == "consumed"

    status, _ = await _admin(b, "PUT", "/admin/mode", {"read_only": True})
    assert status == 200
    for _ in range(40):
        status, mode = await _admin(a, "GET", "/admin/mode")
        if mode["read_only"]:
            break
        await asyncio.sleep(0.05)
    assert mode["read_only"] is True and mode["source"] == "admin"


async def test_admin_routes_answer_503_when_redis_is_down(warden_factory: Any, redis_server: RedisServer, prefix: str) -> None:
    config = {
        "plugins": {"enabled": ["tools", "headers"]},
        "policy": {"state_backend": "redis", "redis_url": redis_server.url, "redis_key_prefix": prefix, "read_only": False},
        "tools": TOOLS,
    }
    w = await warden_factory(config, audit=MemoryAudit())
    assert (await _admin(w, "GET", "/admin/approvals"))[0] == 200
    redis_server.kill()
    for method, path, body in [("GET", "/admin/approvals", None), ("POST", "/admin/approvals/apr_x/approve", {}), ("PUT", "/admin/mode", {"read_only": True})]:
        status, err = await _admin(w, method, path, body)
        assert status == 503 and "policy.state_backend" in err["error"]["message"], (method, path)
    status, mode = await _admin(w, "GET", "/admin/mode")
    assert status == 200 and mode["read_only"] is False
