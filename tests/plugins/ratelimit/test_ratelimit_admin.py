"""``GET /admin/limits``: usage per rule, on both backends, with the admin API's authorisation and tenant rule."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from llm_warden.plugins.ratelimit.backends import glob_escape
from llm_warden.proxy.testing import RunningWarden
from tests.conftest import ADMIN_TOKEN, WardenFactory
from tests.redis_helpers import REDIS_URL

MSG = [{"role": "user", "content": "hello"}]
RULES = [
    {"scope": "user", "requests": "2/minute", "name": "per-user"},
    # Slow refills: what a test charged is still there (within one unit) when it reads the usage.
    {"scope": "tenant", "requests": "100/hour", "tokens": "20000/day"},
    {"scope": "model", "requests": "10/minute", "name": "per-model"},
    {"scope": "user", "requests": "5/minute", "name": "globex-only", "match": {"tenants": ["globex"]}},
]


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, redis_prefix: str) -> dict[str, str]:
    return {"backend": "memory"} if request.param == "memory" else {"backend": "redis", "key_prefix": redis_prefix}


async def start(warden_factory: WardenFactory, **limits: Any) -> RunningWarden:
    return await warden_factory({"plugins": {"enabled": ["headers", "limits"]}, "limits": {"rules": RULES, **limits}})


async def chat(rw: RunningWarden, tok: str, n: int) -> int:
    """Send ``n`` requests; how many were refused with 429."""
    refused = 0
    async with openai.AsyncOpenAI(base_url=rw.base_url, api_key=tok, max_retries=0, timeout=10) as client:
        for _ in range(n):
            try:
                await client.chat.completions.create(model="gpt-test", messages=MSG)  # type: ignore[arg-type]
            except openai.RateLimitError:
                refused += 1
    return refused


async def usage(rw: RunningWarden, credential: str = ADMIN_TOKEN, query: str = "") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{rw.admin_url}/admin/limits{query}", headers={"Authorization": f"Bearer {credential}"}) as r:
            return r.status, await r.json(content_type=None)


def budget(data: dict[str, Any], rule: str, kind: str = "requests") -> dict[str, Any]:
    (r,) = [r for r in data["rules"] if r["rule"] == rule]
    (b,) = [b for b in r["budgets"] if b["kind"] == kind]
    return b


async def test_a_user_who_hit_the_limit_is_exhausted_until_the_reset(
    warden_factory: WardenFactory, token: Callable[..., str], backend: dict[str, str]
) -> None:
    rw = await start(warden_factory, **backend)
    assert await chat(rw, token(sub="alice"), 3) == 1
    assert await chat(rw, token(sub="bob"), 1) == 0
    before = time.time()
    status, data = await usage(rw, query="?tenant=acme")
    assert status == 200 and data["backend"] == backend["backend"] and data["tenant"] == "acme"
    per_user = budget(data, "per-user")
    assert per_user["rate"] == "2/minute" and per_user["limit"] == 2 and per_user["complete"] is True
    alice, bob = per_user["keys"]  # busiest first
    assert (alice["tenant"], alice["user"], alice["used"], alice["remaining"], alice["exhausted"]) == ("acme", "alice", 2, 0, True)
    assert 59 <= alice["reset_s"] <= 60 and before + 59 <= alice["reset_at"] <= time.time() + 60
    assert 29 <= alice["retry_after_s"] <= 30
    assert (bob["user"], bob["used"], bob["remaining"], bob["exhausted"], bob["retry_after_s"]) == ("bob", 1, 1, False, 0)
    tenant = budget(data, "1")
    assert tenant["keys"][0]["tenant"] == "acme" and tenant["keys"][0]["used"] == 3  # the refused request charged nothing
    assert budget(data, "1", "tokens")["keys"][0]["used"] > 0
    assert "globex-only" not in {r["rule"] for r in data["rules"]}  # cannot apply to acme
    # One user, read directly; an idle user is a full bucket.
    _, one = await usage(rw, query="?tenant=acme&user=alice&rule=per-user")
    assert [r["rule"] for r in one["rules"]] == ["per-user"] and budget(one, "per-user")["keys"][0]["exhausted"] is True
    _, idle = await usage(rw, query="?tenant=acme&user=carol&rule=per-user")
    assert budget(idle, "per-user")["keys"] == [{**budget(idle, "per-user")["keys"][0], "used": 0, "remaining": 2, "exhausted": False}]


async def test_reading_usage_changes_no_bucket(warden_factory: WardenFactory, token: Callable[..., str], backend: dict[str, str]) -> None:
    rw = await start(warden_factory, **backend)
    await chat(rw, token(), 1)
    for _ in range(5):
        status, data = await usage(rw, query="?tenant=acme&user=alice")
        assert status == 200
    assert budget(data, "per-user")["keys"][0]["used"] == 1
    assert await chat(rw, token(), 2) == 1  # exactly one more was admitted


async def test_a_tenant_admin_sees_its_own_tenant_only(
    warden_factory: WardenFactory, token: Callable[..., str], backend: dict[str, str]
) -> None:
    rw = await start(warden_factory, **backend)
    await chat(rw, token(tenant="acme"), 1)
    await chat(rw, token(tenant="globex", sub="gina"), 1)
    acme_admin = token(tenant="acme", sub="aadmin", scope="warden:admin")
    status, data = await usage(rw, acme_admin)
    assert status == 200 and data["tenant"] == "acme"
    seen = {k.get("tenant") for r in data["rules"] for b in r["budgets"] for k in b["keys"]}
    assert seen == {"acme"}
    assert budget(data, "per-model")["keys"] == [] and "shared by every tenant" in budget(data, "per-model")["hidden"]
    assert "globex-only" not in {r["rule"] for r in data["rules"]}
    status, err = await usage(rw, acme_admin, "?tenant=globex")
    assert status == 403 and err["error"]["code"] and "acme" in err["error"]["message"] and "admin.tenant" in str(err)
    # An admin of every tenant sees both, and the shared model budget.
    _, everyone = await usage(rw)
    assert {k["tenant"] for k in budget(everyone, "per-user")["keys"]} == {"acme", "globex"}
    assert budget(everyone, "per-model")["keys"][0] == {**budget(everyone, "per-model")["keys"][0], "model": "gpt-test", "used": 2}


async def test_authentication_is_the_admin_apis(warden_factory: WardenFactory, token: Callable[..., str]) -> None:
    rw = await start(warden_factory)
    assert (await usage(rw, "not-the-token"))[0] == 401
    assert (await usage(rw, token()))[0] == 403  # a caller's token without the admin scope
    async with aiohttp.ClientSession() as s, s.get(f"{rw.admin_url}/admin/limits") as r:
        assert r.status == 401


@pytest.mark.parametrize(
    "query",
    [
        "?user=alice",
        "?top=0",
        "?top=201",
        "?top=-1",
        "?top=1e3",
        "?tenant=" + "a" * 300,
        "?tenant=%00acme",
        "?tenant=acme&user=%0a",
        "?evil=<script>",
        "?tenant=acme&tenant=globex&cursor=1",
    ],
)
async def test_hostile_parameters_get_a_400_that_does_not_echo_them(warden_factory: WardenFactory, query: str) -> None:
    rw = await start(warden_factory)
    status, data = await usage(rw, query=query)
    assert status == 400 and data["error"]["type"] and "<script>" not in str(data) and "aaaaaaaa" not in str(data)


async def test_glob_characters_in_a_tenant_never_widen_the_redis_scan(
    warden_factory: WardenFactory, token: Callable[..., str], redis_prefix: str
) -> None:
    rw = await start(warden_factory, backend="redis", key_prefix=redis_prefix)
    await chat(rw, token(tenant="acme"), 1)
    for hostile in ("*", "a*", "ac?e", "[a]cme", "\\*"):
        status, data = await usage(rw, query=f"?tenant={quote(hostile, safe='')}")
        keys = [k for r in data["rules"] if r["scope"] != "model" for b in r["budgets"] for k in b["keys"]]
        assert status == 200 and keys and all(k["tenant"] == hostile and k["used"] == 0 for k in keys)  # only the named, idle bucket
    assert glob_escape("{w}:a*b?[c]\\") == "{w}:a\\*b\\?\\[c\\]\\\\"


async def test_a_bounded_scan_says_it_stopped(warden_factory: WardenFactory, token: Callable[..., str], redis_prefix: str) -> None:
    rw = await start(warden_factory, backend="redis", key_prefix=redis_prefix, admin_scan_keys=1)
    r = aioredis.from_url(REDIS_URL)
    try:
        far = str((int(time.time()) + 60) * 1_000_000)  # a TAT a minute ahead of Redis' clock
        await r.mset({f"{redis_prefix}lim:per-user:q:acme:u{i}": far for i in range(3000)})
    finally:
        await r.aclose()
    status, data = await usage(rw, query="?tenant=acme&rule=per-user&top=5")
    b = budget(data, "per-user")
    assert status == 200 and b["complete"] is False and len(b["keys"]) <= 5 and b["keys_found"] < 3000


async def test_the_backend_down_is_a_503_naming_the_rule(warden_factory: WardenFactory) -> None:
    rw = await start(warden_factory, backend="redis", redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.2)
    status, data = await usage(rw)
    assert status == 503 and "limits.backend" in str(data)
