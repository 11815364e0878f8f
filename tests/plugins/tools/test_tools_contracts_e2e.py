"""End to end with the official openai SDK: a deprecated version warned then refused after its sunset,
and an argument rule refusing a call with its name in the error."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from llm_warden.plugins.tools import ToolsPlugin
from tests.fakeprovider import FakeProvider, Reply
from tests.plugins.tools.helpers import REFUND_V1, warden_overrides
from tests.plugins.tools.test_tools_e2e import MemoryAudit, audit, fn

__all__ = ["audit"]

SUNSET = dt.datetime(2027, 1, 31, tzinfo=dt.UTC).timestamp()
BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "refund inv_1"}]}
V1_ARGS = '{"invoice_id": "inv_1", "amount": 25, "reason": "duplicate"}'
V2_ARGS = '{"invoice_id": "inv_1", "amount_cents": 2500}'
HUGE_ARGS = '{"invoice_id": "inv_1", "amount_cents": 900000}'

TOOLS: list[dict[str, Any]] = [
    REFUND_V1,
    {
        "name": "refund",
        "version": 2,
        "effect": "write",
        "allow_groups": ["billing"],
        "schema": {
            "type": "object",
            "required": ["invoice_id", "amount_cents"],
            "additionalProperties": False,
            "properties": {"invoice_id": {"type": "string"}, "amount_cents": {"type": "integer", "minimum": 1}},
        },
        "rules": [
            {
                "name": "over_limit",
                "decision": "deny",
                "when": {"properties": {"amount_cents": {"exclusiveMinimum": 500000}}},
                "message": "refunds above 5,000.00 are made by the finance team",
            }
        ],
        "rules_default": "allow",
    },
]


@pytest.fixture
async def tw(warden_factory: Any, tmp_path: Path, audit: MemoryAudit) -> Any:
    return await warden_factory(warden_overrides(tmp_path, TOOLS), audit=audit)


@pytest.fixture
def tools(tw: Any) -> ToolsPlugin:
    plugin = tw.warden.chain.get("tools")
    assert isinstance(plugin, ToolsPlugin)
    return plugin


@pytest.fixture
def billing(tw: Any, token: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=tw.base_url, api_key=token(groups=["billing"]), max_retries=0)


async def deprecated_calls(tw: Any, status: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{tw.admin_url}/metrics") as r:
            text = await r.text()
    for line in text.splitlines():
        if line.startswith("warden_tool_deprecated_calls_total{") and f'status="{status}"' in line and 'tool="refund"' in line and 'version="1"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_deprecated_version_is_warned_then_refused_after_its_sunset(
    billing: openai.AsyncOpenAI, fake: FakeProvider, tw: Any, tools: ToolsPlugin, audit: MemoryAudit
) -> None:
    tools.judge.clock = lambda: SUNSET - 3600
    fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "refund", "arguments": V1_ARGS}]))
    raw = await billing.chat.completions.with_raw_response.create(**BODY, tools=[fn("refund"), fn("refund_v2")])  # type: ignore[list-item]
    r = raw.parse()
    assert [(tc.function.name, tc.function.arguments) for tc in r.choices[0].message.tool_calls or []] == [("refund", V1_ARGS)]  # type: ignore[union-attr]
    assert raw.headers["x-warden-deprecation"] == 'refund; contract="refund@1"; sunset="2027-01-31"; replacement="refund_v2"'
    assert raw.headers["x-warden-tool-decisions"] == "refund=allowed"
    offered = {t["function"]["name"]: t["function"] for t in fake.chat_requests()[0].body["tools"]}
    assert offered["refund"]["description"].startswith(
        "DEPRECATED: this tool (refund@1) stops working at 2027-01-31 UTC; use 'refund_v2' (refund@2) instead."
    ), "the model reads the deprecation before it picks a version"
    assert "description" not in offered["refund_v2"]
    ex = audit.exchanges[-1]
    details = ex.tool_decisions[0].decision.details
    assert details is not None and details["deprecation"]["retired"] is False and details["contract"] == "refund@1"
    assert ex.plugin_fields["tools"] == {"deprecated_offered": [raw.headers["x-warden-deprecation"]]}
    assert await deprecated_calls(tw, "warned") == 1.0

    tools.judge.clock = lambda: SUNSET
    fake.push(
        Reply(content=None, tool_calls=[{"id": "c2", "name": "refund", "arguments": V1_ARGS}]),
        Reply(content=None, tool_calls=[{"id": "c3", "name": "refund_v2", "arguments": V2_ARGS}]),
    )
    raw = await billing.chat.completions.with_raw_response.create(**BODY, tools=[fn("refund"), fn("refund_v2")])  # type: ignore[list-item]
    r = raw.parse()
    assert [tc.function.name for tc in r.choices[0].message.tool_calls or []] == ["refund_v2"]  # type: ignore[union-attr]
    assert raw.headers["x-warden-deprecation"].endswith("; retired")
    assert raw.headers["x-warden-tool-decisions"] == "refund=denied:tools[0].deprecated, refund_v2=allowed"
    first, corrective = fake.chat_requests()[-2:]
    assert [t["function"]["name"] for t in first.body["tools"]] == ["refund_v2"], "a retired version is no longer offered"
    told = corrective.body["messages"][-1]
    assert told["tool_call_id"] == "c2"
    assert told["content"].startswith("Warden refused this call (rule tools[0].deprecated): ")
    assert "retired at 2027-01-31 UTC" in told["content"] and "use 'refund_v2' (refund@2) instead" in told["content"]

    for i in range(3):
        fake.push(Reply(content=None, tool_calls=[{"id": f"d{i}", "name": "refund", "arguments": V1_ARGS}]))
    with pytest.raises(openai.PermissionDeniedError) as err:
        await billing.chat.completions.create(**BODY, tools=[fn("refund"), fn("refund_v2")])  # type: ignore[list-item]
    assert "rule: tools[0].deprecated" in str(err.value) and "'refund_v2' (refund@2)" in str(err.value)
    assert await deprecated_calls(tw, "retired") == 4.0
    assert await deprecated_calls(tw, "warned") == 1.0


@pytest.mark.parametrize("stream", [False, True])
async def test_an_argument_rule_refuses_with_its_name(billing: openai.AsyncOpenAI, fake: FakeProvider, audit: MemoryAudit, stream: bool) -> None:
    for i in range(3):
        fake.push(Reply(content=None, tool_calls=[{"id": f"c{i}", "name": "refund_v2", "arguments": HUGE_ARGS}]))
    if stream:
        s = await billing.chat.completions.create(**BODY, tools=[fn("refund_v2")], stream=True)  # type: ignore[list-item]
        with pytest.raises(openai.APIError) as err:
            async for _ in s:
                pass
    else:
        with pytest.raises(openai.PermissionDeniedError) as err:
            await billing.chat.completions.create(**BODY, tools=[fn("refund_v2")])  # type: ignore[list-item]
    assert "rule: tools[1].rules.over_limit" in str(err.value)
    assert "refunds above 5,000.00 are made by the finance team" in str(err.value)
    told = fake.chat_requests()[1].body["messages"][-1]
    assert told["content"].startswith("Warden refused this call (rule tools[1].rules.over_limit): refunds above 5,000.00")
    ex = audit.exchanges[-1]
    assert [r.decision.rule for r in ex.tool_decisions] == ["tools[1].rules.over_limit"] * 3
    assert ex.error is not None and ex.error.rule == "tools[1].rules.over_limit"


async def test_an_argument_rule_lets_the_model_correct_itself(billing: openai.AsyncOpenAI, fake: FakeProvider, audit: MemoryAudit) -> None:
    fake.push(
        Reply(content=None, tool_calls=[{"id": "c1", "name": "refund_v2", "arguments": HUGE_ARGS}]),
        Reply(content="A refund this large is made by the finance team; I have not refunded anything."),
    )
    raw = await billing.chat.completions.with_raw_response.create(**BODY, tools=[fn("refund_v2")])  # type: ignore[list-item]
    assert raw.parse().choices[0].message.tool_calls is None
    assert raw.headers["x-warden-tool-decisions"] == "refund_v2=denied:tools[1].rules.over_limit"
    assert "x-warden-deprecation" not in raw.headers
    (rec,) = audit.exchanges[-1].tool_decisions
    assert (rec.decision.kind, rec.decision.rule, rec.decision.details) == ("deny", "tools[1].rules.over_limit", {"contract": "refund@2"})


async def test_a_streamed_answer_carries_the_deprecation_header(billing: openai.AsyncOpenAI, fake: FakeProvider, tools: ToolsPlugin) -> None:
    tools.judge.clock = lambda: SUNSET - 1
    fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "refund", "arguments": V1_ARGS}]))
    raw = await billing.chat.completions.with_raw_response.create(**BODY, tools=[fn("refund")], stream=True)  # type: ignore[list-item]
    assert raw.headers["x-warden-deprecation"] == 'refund; contract="refund@1"; sunset="2027-01-31"; replacement="refund_v2"'
    got = []
    async for chunk in raw.parse():
        for ch in chunk.choices:
            got += [(tc.function.name, tc.function.arguments) for tc in ch.delta.tool_calls or [] if tc.function]
    assert got == [("refund", V1_ARGS)]
