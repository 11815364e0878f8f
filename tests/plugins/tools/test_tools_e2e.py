"""End to end: the real server, the fake provider and the official openai SDK."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from llm_warden.proxy.exchange import Exchange
from tests.conftest import ADMIN_TOKEN
from tests.fakeprovider import FakeProvider, Reply
from tests.plugins.tools.helpers import LOOKUP_SCHEMA, TOOLS, warden_overrides

BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "refund inv_1"}]}
GOOD = '{"invoice_id": "inv_1", "amount": 25, "reason": "duplicate"}'
BIG = '{"invoice_id": "inv_1", "amount": 500, "reason": "fraud"}'


def fn(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}


class MemoryAudit:
    """Keeps records in memory: enough to see what the tools plugin puts on the exchange."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.events: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        self.healthy = True

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def record_exchange(self, ex: Exchange) -> None:
        self.exchanges.append(ex)

    async def record_event(self, kind: str, actor: dict[str, Any], data: dict[str, Any]) -> None:
        self.events.append((kind, actor, data))


@pytest.fixture
def audit() -> MemoryAudit:
    return MemoryAudit()


@pytest.fixture
async def tw(warden_factory: Any, tmp_path: Path, audit: MemoryAudit) -> Any:
    return await warden_factory(warden_overrides(tmp_path, TOOLS), audit=audit)


@pytest.fixture
def billing(tw: Any, token: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=tw.base_url, api_key=token(groups=["billing"]), max_retries=0)


@pytest.fixture
def sales(tw: Any, token: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=tw.base_url, api_key=token(sub="bob", groups=["sales"]), max_retries=0)


async def admin(tw: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, tw.admin_url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            return r.status, await r.json()


async def test_offered_tools_fenced_and_registry_schema_sent(sales: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(Reply(content="ok"))
    raw = await sales.chat.completions.with_raw_response.create(
        **BODY, tools=[fn("lookup", {"type": "object", "properties": {"invoice_id": {"type": "integer"}}}), fn("refund"), fn("shell")]  # type: ignore[list-item]
    )
    assert raw.headers["x-warden-tool-decisions"] == "none"
    (sent,) = fake.chat_requests()
    assert [t["function"]["name"] for t in sent.body["tools"]] == ["lookup"]
    assert sent.body["tools"][0]["function"]["parameters"] == LOOKUP_SCHEMA


async def test_tool_choice_forcing_a_removed_tool_is_403(sales: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    with pytest.raises(openai.PermissionDeniedError) as err:
        await sales.chat.completions.create(**BODY, tools=[fn("lookup"), fn("refund")], tool_choice={"type": "function", "function": {"name": "refund"}})  # type: ignore[list-item]
    assert "rule: tools[1].allow_groups" in str(err.value)
    assert fake.chat_requests() == []


@pytest.mark.parametrize("stream", [False, True])
async def test_corrective_turn_fixes_invalid_arguments(billing: openai.AsyncOpenAI, fake: FakeProvider, audit: MemoryAudit, stream: bool) -> None:
    fake.push(
        Reply(content=None, tool_calls=[{"id": "c1", "name": "refund", "arguments": '{"invoice_id": "inv_1", "amount": -5, "reason": "oops"}'}]),
        Reply(content=None, tool_calls=[{"id": "c2", "name": "refund", "arguments": GOOD}]),
    )
    if stream:
        s = await billing.chat.completions.create(**BODY, tools=[fn("refund")], stream=True)  # type: ignore[list-item]
        got = []
        async for chunk in s:
            for ch in chunk.choices:
                got += [(tc.id, tc.function.arguments) for tc in ch.delta.tool_calls or [] if tc.function]
        assert got == [("c2", GOOD)]
    else:
        raw = await billing.chat.completions.with_raw_response.create(**BODY, tools=[fn("refund")])  # type: ignore[list-item]
        r = raw.parse()
        assert [(tc.id, tc.function.arguments) for tc in r.choices[0].message.tool_calls or []] == [("c2", GOOD)]  # type: ignore[union-attr]
        assert raw.headers["x-warden-tool-decisions"] == "refund=repair:tools[1].schema, refund=allowed"
    told = fake.chat_requests()[1].body["messages"][-1]
    assert told["role"] == "tool" and told["tool_call_id"] == "c1"
    assert "/amount: -5 is less than or equal to the minimum of 0" in told["content"] and "/reason: " in told["content"]
    (ex,) = audit.exchanges
    assert [(r.turn, r.decision.kind) for r in ex.tool_decisions] == [(0, "repair"), (1, "allow")]


@pytest.mark.parametrize("stream", [False, True])
async def test_exhausted_corrections(billing: openai.AsyncOpenAI, fake: FakeProvider, tw: Any, stream: bool) -> None:
    for i in range(3):
        fake.push(Reply(content=None, tool_calls=[{"id": f"c{i}", "name": "refund", "arguments": '{"amount": "lots"}'}]))
    if stream:
        s = await billing.chat.completions.create(**BODY, tools=[fn("refund")], stream=True)  # type: ignore[list-item]
        with pytest.raises(openai.APIError) as err:
            async for _ in s:
                pass
        assert "still refused after 2 corrective turn(s)" in str(err.value)
    else:
        with pytest.raises(openai.UnprocessableEntityError) as err2:
            await billing.chat.completions.create(**BODY, tools=[fn("refund")])  # type: ignore[list-item]
        assert "tool call 'refund'" in str(err2.value) and "rule: tools[1].schema" in str(err2.value)
    assert len(fake.chat_requests()) == 3
    status, _ = await admin(tw, "PUT", "/admin/mode", {"read_only": True})
    assert status == 200
    for i in range(3):
        fake.push(Reply(content=None, tool_calls=[{"id": f"w{i}", "name": "note", "arguments": '{"text": "x"}'}]))
    with pytest.raises(openai.PermissionDeniedError) as err3:
        await billing.chat.completions.create(**BODY, tools=[fn("note")])  # type: ignore[list-item]
    assert "rule: policy.read_only" in str(err3.value) and "'note'" in str(err3.value), "withheld by the fence: the model learns why"


async def test_streamed_parallel_calls_with_one_refused(billing: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    fake.push(
        Reply(
            content="Checking.",
            tool_calls=[
                {"id": "a", "name": "lookup", "arguments": '{"invoice_id": "inv_1"}'},
                {"id": "b", "name": "shell", "arguments": '{"cmd": "rm -rf /"}'},
                {"id": "c", "name": "note", "arguments": '{"text": "hi"}'},
            ],
        ),
        Reply(
            content=None,
            tool_calls=[
                {"id": "a2", "name": "lookup", "arguments": '{"invoice_id": "inv_1"}'},
                {"id": "c2", "name": "note", "arguments": '{"text": "hi"}'},
            ],
        ),
    )
    s = await billing.chat.completions.create(**BODY, tools=[fn("lookup"), fn("note"), fn("shell")], stream=True)  # type: ignore[list-item]
    calls: dict[int, list[str]] = {}
    text = []
    async for chunk in s:
        for ch in chunk.choices:
            text.append(ch.delta.content or "")
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, ["", "", ""])
                entry[0] = tc.id or entry[0]
                entry[1] += (tc.function.name or "") if tc.function else ""
                entry[2] += (tc.function.arguments or "") if tc.function else ""
    assert "".join(text) == "Checking."
    assert [tuple(v) for _, v in sorted(calls.items())] == [("a2", "lookup", '{"invoice_id": "inv_1"}'), ("c2", "note", '{"text": "hi"}')]
    told = {m["tool_call_id"]: m["content"] for m in fake.chat_requests()[1].body["messages"] if m["role"] == "tool"}
    assert told["a"].startswith("Not executed") and told["c"].startswith("Not executed")
    assert "rule policy.unknown_tools" in told["b"]


async def test_duplicate_mutation_refused(billing: openai.AsyncOpenAI, fake: FakeProvider) -> None:
    history = [
        {"role": "user", "content": "refund inv_1"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "old", "type": "function", "function": {"name": "refund", "arguments": GOOD}}]},
        {"role": "tool", "tool_call_id": "old", "content": '{"refund_id": "rf_1"}'},
    ]
    fake.push(Reply(content=None, tool_calls=[{"id": "again", "name": "refund", "arguments": GOOD}]), Reply(content="Already refunded (rf_1)."))
    r = await billing.chat.completions.create(model="m", messages=history, tools=[fn("refund")])  # type: ignore[arg-type,list-item]
    assert r.choices[0].message.content == "Already refunded (rf_1)."
    told = fake.chat_requests()[1].body["messages"][-1]["content"]
    assert "rule tools.duplicate" in told and "rf_1" in told


async def test_approval_flow_through_admin_api(billing: openai.AsyncOpenAI, fake: FakeProvider, tw: Any, audit: MemoryAudit) -> None:
    fake.push(
        Reply(content=None, tool_calls=[{"id": "c1", "name": "refund", "arguments": BIG}]),
        Reply(content="Your refund awaits approval."),
    )
    raw = await billing.chat.completions.with_raw_response.create(**BODY, tools=[fn("refund")])  # type: ignore[list-item]
    assert raw.parse().choices[0].message.content == "Your refund awaits approval."
    header = raw.headers["x-warden-tool-decisions"]
    assert header.startswith("refund=held:apr_")
    told = fake.chat_requests()[1].body["messages"][-1]["content"]
    status, listing = await admin(tw, "GET", "/admin/approvals?status=pending")
    assert status == 200
    (apr,) = listing["data"]
    assert apr["id"] in header and apr["id"] in told
    assert apr["tool"] == "refund" and apr["arguments"] == orjson.loads(BIG) and apr["principal"]["subject"] == "alice"
    status, decided = await admin(tw, "POST", f"/admin/approvals/{apr['id']}/approve", {"comment": "verified with customer"})
    assert status == 200 and decided["status"] == "approved" and decided["reviewer"]["subject"] == "bootstrap-admin"
    status, again = await admin(tw, "POST", f"/admin/approvals/{apr['id']}/approve", {})
    assert status == 409 and again["error"]["code"] == "conflict"
    kind, actor, data = audit.events[-1]
    assert kind == "tools.approval.approve" and actor["subject"] == "bootstrap-admin" and data["approval_id"] == apr["id"]

    fake.push(Reply(content=None, tool_calls=[{"id": "c9", "name": "refund", "arguments": BIG}]))
    raw = await billing.chat.completions.with_raw_response.create(**BODY, tools=[fn("refund")])  # type: ignore[list-item]
    assert [tc.id for tc in raw.parse().choices[0].message.tool_calls or []] == ["c9"]
    assert raw.headers["x-warden-tool-decisions"] == f"refund=allowed:{apr['id']}"

    fake.push(Reply(content=None, tool_calls=[{"id": "c10", "name": "refund", "arguments": BIG}]), Reply(content="Needs approval again."))
    r = await billing.chat.completions.create(**BODY, tools=[fn("refund")])  # type: ignore[list-item]
    assert r.choices[0].message.content == "Needs approval again."
    status, listing = await admin(tw, "GET", "/admin/approvals?status=pending")
    (second,) = listing["data"]
    status, denied = await admin(tw, "POST", f"/admin/approvals/{second['id']}/deny", {"comment": "no"})
    assert status == 200 and denied["status"] == "denied"
    status, listing = await admin(tw, "GET", "/admin/approvals?status=consumed")
    assert [a["id"] for a in listing["data"]] == [apr["id"]]


async def test_admin_mode_and_errors(billing: openai.AsyncOpenAI, fake: FakeProvider, tw: Any, audit: MemoryAudit, token: Any) -> None:
    status, mode = await admin(tw, "GET", "/admin/mode")
    assert status == 200 and mode["read_only"] is False and mode["source"] == "config"
    status, mode = await admin(tw, "PUT", "/admin/mode", {"read_only": True, "tenant": "acme"})
    assert status == 200 and mode["tenants"]["acme"]["read_only"] is True
    kind, actor, data = audit.events[-1]
    assert kind == "tools.mode" and data == {"tenant": "acme", "read_only": True, "effective_before": False, "effective_after": True}
    fake.push(Reply(content="ok"))
    await billing.chat.completions.create(**BODY, tools=[fn("lookup"), fn("note")])  # type: ignore[list-item]
    assert [t["function"]["name"] for t in fake.chat_requests()[-1].body["tools"]] == ["lookup"]
    for bad in ({"read_only": "yes"}, {}, {"read_only": True, "tenant": 3}, {"read_only": True, "extra": 1}, [1]):
        status, err = await admin(tw, "PUT", "/admin/mode", bad)
        assert status == 400 and err["error"]["type"] == "invalid_request_error", bad
    status, err = await admin(tw, "GET", "/admin/approvals?status=weird")
    assert status == 400 and "rule: admin.approvals" in err["error"]["message"]
    status, err = await admin(tw, "POST", "/admin/approvals/apr_nope/approve", {"comment": "x"})
    assert status == 404
    status, err = await admin(tw, "POST", "/admin/approvals/apr_nope/deny", {"comment": 5})
    assert status == 400
    async with aiohttp.ClientSession() as s:
        async with s.get(tw.admin_url + "/admin/mode", headers={"Authorization": f"Bearer {token(groups=['billing'])}"}) as r:
            assert r.status == 403
        async with s.put(tw.admin_url + "/admin/mode", json={"read_only": False}) as r:
            assert r.status == 401


async def test_tool_results_reach_the_audit_record(billing: openai.AsyncOpenAI, fake: FakeProvider, audit: MemoryAudit) -> None:
    fake.push(Reply(content="Done."))
    messages = [
        {"role": "user", "content": "look up inv_1"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"invoice_id":"inv_1"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "x" * 20000},
    ]
    await billing.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    (ex,) = audit.exchanges
    (res,) = ex.tool_results
    assert res["tool_call_id"] == "c1" and res["name"] == "lookup" and res["bytes"] == 20000 and res["truncated"]
    assert len(res["content"]) == 16384


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return orjson.dumps(v).decode()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{orjson.dumps(k).decode()} = {_toml_value(x)}" for k, x in v.items()) + " }"


def _toml(data: dict[str, Any]) -> str:
    out = []
    for name, section in data.items():
        if isinstance(section, list):
            for item in section:
                out.append(f"[[{name}]]")
                out += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
        else:
            out.append(f"[{name}]")
            out += [f"{k} = {_toml_value(v)}" for k, v in section.items()]
    return "\n".join(out) + "\n"


async def test_server_reload_applies_new_tools_and_refuses_bad(
    tw: Any, billing: openai.AsyncOpenAI, fake: FakeProvider, base_config: dict[str, Any], tmp_path: Path
) -> None:
    from tests.conftest import deep_merge

    policy = {"state_db": str(tmp_path / "state.db"), "read_only": False, "mode_refresh_s": 0}
    stricter = [dict(t) for t in TOOLS]
    stricter[0] = {**stricter[0], "schema": {"type": "object", "required": ["customer"], "properties": {"customer": {"type": "string"}}}}
    path = tmp_path / "warden.toml"
    path.write_text(_toml(deep_merge(base_config, {"plugins": {"enabled": ["tools", "headers"]}, "policy": policy, "tools": stricter})))
    result = await tw.warden.reload(str(path))
    assert result["result"] == "applied", result
    fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "lookup", "arguments": '{"invoice_id": "x"}'}]), Reply(content="ok"))
    await billing.chat.completions.create(**BODY, tools=[fn("lookup")])  # type: ignore[list-item]
    assert "customer" in fake.chat_requests()[1].body["messages"][-1]["content"]
    stricter[0] = {**stricter[0], "schema": {"type": "object", "properties": {"customer": {"type": "strng"}}}}
    path.write_text(_toml(deep_merge(base_config, {"plugins": {"enabled": ["tools", "headers"]}, "policy": policy, "tools": stricter})))
    result = await tw.warden.reload(str(path))
    assert result["result"] == "refused" and "tools[0].schema" in result["error"]
    plugin = tw.warden.chain.get("tools")
    assert plugin.registry.get("lookup").spec.schema["required"] == ["customer"]
