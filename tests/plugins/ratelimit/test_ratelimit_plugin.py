"""The limits plugin driven through its hooks: rules, refusals, headers, tokens, config."""

from __future__ import annotations

import asyncio

import pytest

from llm_warden.plugins.ratelimit.config import LimitsConfig
from llm_warden.plugins.ratelimit.plugin import format_duration
from llm_warden.proxy.confload import load_dataclass
from llm_warden.proxy.errors import ConfigError, RateLimited, ServiceUnavailable
from tests.plugins.ratelimit.limits_helpers import MakePlugin, Upstream, completion, drive, make_exchange, recorded


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, redis_prefix: str) -> dict[str, str]:
    if request.param == "memory":
        return {"backend": "memory"}
    return {"backend": "redis", "key_prefix": redis_prefix}


async def test_refusal_is_429_naming_the_rule_with_retry_after(make_plugin: MakePlugin, backend: dict[str, str]) -> None:
    p = await make_plugin(
        **backend,
        rules=[{"scope": "tenant", "requests": "600/minute"}, {"scope": "user", "match": {"groups": ["trial"]}, "requests": "20/minute"}],
    )
    for _ in range(20):
        ex = await drive(p, make_exchange(groups=("trial",)))
        assert ex.error is None
    ex = await drive(p, make_exchange(groups=("trial",)))
    assert isinstance(ex.error, RateLimited) and ex.status == 429
    assert ex.error.rule == "limits.rules[1] (user requests 20/minute)"
    body = ex.error.to_dict()["error"]
    assert body["type"] == "rate_limit_error" and body["code"] == "rate_limit_exceeded"
    assert "limits.rules[1] (user requests 20/minute)" in body["message"]
    assert ex.error.headers["Retry-After"] == "3"  # 60 s / 20
    assert ex.error.headers["x-ratelimit-remaining-requests"] == "0"
    assert p.decisions[("limits.rules[1] (user requests 20/minute)", "deny")] == 1
    assert p.decisions[("limits.rules[0] (tenant requests 600/minute)", "allow")] == 20
    # another user of the tenant, and a non-trial user, still pass
    assert (await drive(p, make_exchange(subject="bob", groups=("trial",)))).error is None
    assert (await drive(p, make_exchange(groups=("paid",)))).error is None


async def test_concurrent_requests_admit_exactly_n(make_plugin: MakePlugin, backend: dict[str, str]) -> None:
    p = await make_plugin(**backend, idempotency=False, rules=[{"scope": "tenant", "requests": "25/minute"}])
    exs = await asyncio.gather(*[drive(p, make_exchange(subject=f"u{i}")) for i in range(120)])
    assert sum(ex.error is None for ex in exs) == 25


async def test_headers_on_allowed_answers(make_plugin: MakePlugin, backend: dict[str, str]) -> None:
    p = await make_plugin(
        **backend,
        rules=[
            {"scope": "tenant", "requests": "100/minute", "tokens": "10000/minute"},
            {"scope": "user", "requests": "10/minute"},
        ],
    )
    ex = await drive(p, make_exchange())
    h = ex.response_headers
    assert h["x-ratelimit-limit-requests"] == "10"  # the tightest rule is reported
    assert h["x-ratelimit-remaining-requests"] == "9"
    assert h["x-ratelimit-reset-requests"] in ("6s", "5.999s")
    assert h["x-ratelimit-limit-tokens"] == "10000"
    assert 10000 - 40 < int(h["x-ratelimit-remaining-tokens"]) < 10000
    assert h["x-ratelimit-reset-tokens"].endswith("ms")


async def test_headers_can_be_turned_off(make_plugin: MakePlugin) -> None:
    p = await make_plugin(headers=False, rules=[{"scope": "tenant", "requests": "10/minute"}])
    ex = await drive(p, make_exchange())
    assert not any(k.startswith("x-ratelimit") for k in ex.response_headers)


async def test_scopes_and_matches(make_plugin: MakePlugin) -> None:
    p = await make_plugin(
        rules=[
            {"scope": "model", "match": {"models": ["gpt-4o*"]}, "requests": "3/minute"},
            {"scope": "tenant+model", "match": {"tenants": ["small"]}, "requests": "1/minute"},
        ]
    )
    # model scope is shared across tenants, only for matching models
    for tenant in ("a", "b", "c"):
        assert (await drive(p, make_exchange(tenant=tenant, model="gpt-4o"))).error is None
    assert (await drive(p, make_exchange(tenant="d", model="gpt-4o"))).error is not None
    assert (await drive(p, make_exchange(tenant="d", model="o3-mini"))).error is None
    # tenant+model applies to tenant "small" only, per model
    assert (await drive(p, make_exchange(tenant="small", model="o3-mini"))).error is None
    assert (await drive(p, make_exchange(tenant="small", model="o3-mini"))).error is not None
    assert (await drive(p, make_exchange(tenant="small", model="o1"))).error is None


async def test_user_scope_is_per_tenant(make_plugin: MakePlugin) -> None:
    p = await make_plugin(rules=[{"scope": "user+model", "requests": "1/minute"}])
    assert (await drive(p, make_exchange(tenant="a", subject="alice"))).error is None
    assert (await drive(p, make_exchange(tenant="b", subject="alice"))).error is None
    assert (await drive(p, make_exchange(tenant="a", subject="alice"))).error is not None


async def test_token_reservation_and_reconciliation(make_plugin: MakePlugin, backend: dict[str, str]) -> None:
    p = await make_plugin(**backend, rules=[{"scope": "tenant", "tokens": "1000/minute"}])
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 500}
    seen: list[str] = []

    async def peek() -> None:
        seen.append(ex.response_headers["x-ratelimit-remaining-tokens"])

    ex = make_exchange(body=body)
    await drive(p, ex, answer=completion(prompt_tokens=9, completion_tokens=21), before_complete=peek)
    reserved = recorded(ex)["decision"]["tokens_reserved"]
    assert 500 < reserved < 520  # prompt counted by the tokenizer + max_tokens
    assert int(seen[0]) == 1000 - reserved
    # after reconciliation only the 30 used tokens count
    probe = await drive(p, make_exchange(body={**body, "max_tokens": 0}))
    assert int(probe.response_headers["x-ratelimit-remaining-tokens"]) == 1000 - 30 - recorded(probe)["decision"]["tokens_reserved"]


async def test_streamed_usage_is_reconciled(make_plugin: MakePlugin, backend: dict[str, str]) -> None:
    p = await make_plugin(**backend, rules=[{"scope": "user", "tokens": "2000/minute"}])
    ex = make_exchange(stream=True, body={"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1500})
    await drive(p, ex, answer=completion(prompt_tokens=10, completion_tokens=1200))
    assert recorded(ex)["tokens_reconciled"] == {"reserved": recorded(ex)["decision"]["tokens_reserved"], "actual": 1210}
    # 790 left: a request reserving 800 is refused, one reserving 780 passes
    big = await drive(p, make_exchange(body={"model": "m", "messages": [], "max_tokens": 800 - 3}))
    assert isinstance(big.error, RateLimited)
    small = await drive(p, make_exchange(body={"model": "m", "messages": [], "max_tokens": 780 - 3}))
    assert small.error is None


async def test_reservation_refunded_when_provider_never_called(make_plugin: MakePlugin) -> None:
    p = await make_plugin(rules=[{"scope": "tenant", "tokens": "1000/minute"}])
    ex = make_exchange(body={"model": "m", "messages": [], "max_tokens": 900})
    await p.on_request(ex)
    ex.status = 403  # refused by a later plugin: no upstream turn
    await p.on_complete(ex)
    assert (await drive(p, make_exchange(body={"model": "m", "messages": [], "max_tokens": 990}))).error is None


async def test_reservation_kept_when_usage_missing(make_plugin: MakePlugin) -> None:
    p = await make_plugin(rules=[{"scope": "tenant", "tokens": "1000/minute"}])
    ex = make_exchange(body={"model": "m", "messages": [], "max_tokens": 900})
    answer = completion()
    del answer["usage"]
    await drive(p, ex, answer=answer)
    assert isinstance((await drive(p, make_exchange(body={"model": "m", "messages": [], "max_tokens": 200}))).error, RateLimited)


async def test_request_larger_than_the_token_limit(make_plugin: MakePlugin) -> None:
    p = await make_plugin(rules=[{"scope": "tenant", "tokens": "1000/minute"}])
    ex = await drive(p, make_exchange(body={"model": "m", "messages": [], "max_tokens": 5000}))
    assert isinstance(ex.error, RateLimited)
    assert "more than limits.rules[0] (tenant tokens 1000/minute) allows at once" in ex.error.message
    assert ex.error.headers["Retry-After"] == "60"


async def test_default_max_tokens_used_when_absent(make_plugin: MakePlugin) -> None:
    p = await make_plugin(default_max_tokens=300, tokenizer="approx", rules=[{"scope": "tenant", "tokens": "10000/minute"}])
    ex = await drive(p, make_exchange(body={"model": "m", "messages": [{"role": "user", "content": "abcdefgh"}], "n": 2}))
    assert recorded(ex)["decision"]["tokens_reserved"] == 600 + 2 + 3 + 3


async def test_fail_closed_and_fail_open_when_redis_unreachable(make_plugin: MakePlugin) -> None:
    from tests.plugins.ratelimit.limits_helpers import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    closed = await make_plugin(backend="redis", redis_url=url, rules=[{"scope": "tenant", "requests": "1/minute"}])
    ex = await drive(closed, make_exchange())
    assert isinstance(ex.error, ServiceUnavailable) and ex.status == 503
    assert ex.error.rule == "limits.backend" and ex.error.headers["Retry-After"] == "1"
    assert not closed.backend_up
    opened = await make_plugin(backend="redis", redis_url=url, fail_open=True, rules=[{"scope": "tenant", "requests": "1/minute"}])
    for _ in range(3):
        assert (await drive(opened, make_exchange())).error is None
    assert opened.decisions[("limits.backend", "fail_open")] == 3


async def test_upstream_concurrency_cap_is_always_released(make_plugin: MakePlugin) -> None:
    p = await make_plugin(upstream_concurrency=2, upstream_queue_s=0.05)
    a, b, c = make_exchange(), make_exchange(), make_exchange()
    await p.on_request(a)
    await p.on_request(b)
    with pytest.raises(RateLimited) as err:
        await p.on_request(c)
    assert err.value.rule == "limits.upstream_concurrency"
    await p.on_complete(c)
    # a waiter gets the slot as soon as one is released
    d = make_exchange()
    waiter = asyncio.create_task(p.on_request(d))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await Upstream()(a)
    await p.on_complete(a)
    await waiter
    for ex in (b, d):
        ex.status = 502  # failed exchanges release too
        await p.on_complete(ex)
    sem = p._slots["openai"]
    assert sem._value == 2


async def test_slot_released_when_a_later_check_refuses(make_plugin: MakePlugin) -> None:
    p = await make_plugin(upstream_concurrency=1, rules=[{"scope": "tenant", "requests": "1/minute"}])
    assert (await drive(p, make_exchange())).error is None
    assert isinstance((await drive(p, make_exchange())).error, RateLimited)
    assert p._slots["openai"]._value == 1


def test_format_duration() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(0.0201) == "21ms"
    assert format_duration(1.5) == "1.5s"
    assert format_duration(360) == "6m0s"
    assert format_duration(3723) == "1h2m3s"


@pytest.mark.parametrize(
    ("section", "key", "needle"),
    [
        ({"rules": [{"scope": "tenant", "requests": "5/fortnight"}]}, "limits.rules[0].requests", "unknown unit"),
        ({"rules": [{"scope": "team", "requests": "5/minute"}]}, "limits.rules[0].scope", "must be one of"),
        ({"rules": [{"scope": "tenant"}]}, "limits.rules[0]", "needs 'requests' or 'tokens'"),
        ({"rules": [{"scope": "tenant", "requests": "1/s", "match": {"group": ["x"]}}]}, "limits.rules[0].match.group", "unknown key"),
        (
            {"rules": [{"scope": "tenant", "requests": "1/s", "name": "x"}, {"scope": "user", "requests": "1/s", "name": "x"}]},
            "limits.rules[1].name",
            "duplicate",
        ),
        ({"backend": "postgres"}, "limits.backend", "must be one of"),
        ({"backend": "redis", "redis_url": "http://x"}, "limits.redis_url", "redis://"),
        ({"redis_timeout_s": 0}, "limits.redis_timeout_s", "positive"),
        ({"upstream_concurrency": -1}, "limits.upstream_concurrency", ">= 0"),
        ({"fail_open": "yes"}, "limits.fail_open", "true or false"),
    ],
)
def test_config_errors_name_the_key(section: dict[str, object], key: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_dataclass(LimitsConfig, section, "limits")
    assert err.value.key == key and needle in str(err.value)


def test_config_defaults() -> None:
    cfg = load_dataclass(LimitsConfig, {}, "limits")
    assert (cfg.backend, cfg.fail_open, cfg.rules, cfg.upstream_concurrency) == ("memory", False, [], 0)


def test_documented_config_section_loads() -> None:
    import tomllib
    from pathlib import Path

    text = (Path(__file__).parents[3] / "docs" / "limits.config.toml").read_text()
    cfg = load_dataclass(LimitsConfig, tomllib.loads(text)["limits"], "limits")
    assert cfg == LimitsConfig()
    head, _, example = text.partition("# [[limits.rules]]")
    uncommented = head + "[[limits.rules]]" + "\n".join(line[2:] if line.startswith("# ") else "" for line in example.splitlines())
    rules = load_dataclass(LimitsConfig, tomllib.loads(uncommented)["limits"], "limits").rules
    assert [r.scope for r in rules] == ["tenant", "user"] and rules[1].match.groups == ["trial"]


async def test_reload_applies_rules_live_and_refuses_backend_changes(make_plugin: MakePlugin) -> None:
    def section(rate: str, name: str, **kw: str) -> LimitsConfig:
        data = {"idempotency_db": p.section.idempotency_db, "rules": [{"scope": "tenant", "requests": rate, "name": name}], **kw}
        return load_dataclass(LimitsConfig, data, "limits")

    p = await make_plugin(rules=[{"scope": "tenant", "requests": "2/minute", "name": "t"}])
    assert (await drive(p, make_exchange())).error is None
    await p.reload(section("1/minute", "t"))
    # the bucket is kept: the request already taken counts against the tighter rate
    ex = await drive(p, make_exchange())
    assert ex.error is not None and ex.error.rule == "limits.rules[0:t] (tenant requests 1/minute)"
    await p.reload(section("1/minute", "fresh"))
    assert (await drive(p, make_exchange())).error is None  # a new rule id is a new bucket
    with pytest.raises(ConfigError) as err:
        await p.reload(section("1/minute", "fresh", backend="redis"))
    assert err.value.key == "limits.backend"
    assert p.rules[0].rule_id == "fresh"


async def test_check_keys_for_other_plugins(make_plugin: MakePlugin, backend: dict[str, str]) -> None:
    from llm_warden.proxy.gcra import parse_rate

    p = await make_plugin(**backend)
    rate = parse_rate("2/minute")
    results = [await p.check_keys([("tool:acme:search", rate, 1)], rule="tools.search.rate_limit") for _ in range(3)]
    assert [r[0].allowed for r in results if r is not None] == [True, True, False]


async def test_repeated_client_request_ids_do_not_mix_state(make_plugin: MakePlugin) -> None:
    p = await make_plugin(upstream_concurrency=2, rules=[{"scope": "tenant", "tokens": "10000/minute"}])
    a, b = make_exchange(), make_exchange()
    b.request_id = a.request_id  # x-request-id is client-controlled
    await p.on_request(a)
    await p.on_request(b)
    for ex in (a, b):
        await Upstream()(ex)
        await p.on_complete(ex)
    assert p._slots["openai"]._value == 2
