"""Provider answers that break the chat-completions wire format: refused before anything of them is relayed, recorded.

Non-streamed: a 502 naming ``upstream.protocol`` and nothing of the answer.  Streamed: the good events before
the bad one are relayed, then the stream ends with an OpenAI ``error`` event (never a clean ``[DONE]``), and
the record says what was relayed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import WardenFactory
from tests.fakeprovider import MALFORMED, FakeProvider, Reply

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
# Defects that are legal in one of the two shapes (the fake provider's docstring says why).
VALID_NON_STREAMED = {"tool_call_index_negative"}
VALID_STREAMED = {"choices_empty"}


async def _chat(rw: Any, token: Callable[..., str], stream: bool) -> tuple[int, bytes, str]:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "stream": stream}
    async with aiohttp.ClientSession() as s, s.post(rw.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {token()}"}) as r:
        return r.status, await r.read(), r.headers["x-request-id"]


@pytest.mark.parametrize("name", sorted(set(MALFORMED) - VALID_NON_STREAMED))
async def test_a_malformed_answer_is_a_502_naming_the_rule(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, name: str) -> None:
    rw = await warden_factory({"audit": {"enabled": True}})
    fake.push(Reply(content="secret-looking-content", malformed=name, tool_calls=[{"name": "lookup", "arguments": "{}"}]))
    status, body, rid = await _chat(rw, token, stream=False)
    assert status == 502, body
    err = orjson.loads(body)["error"]
    assert "upstream.protocol" in err["message"]
    assert b"secret-looking-content" not in body and b"call_" not in body
    rec = await rw.warden.audit.find(rid)
    assert rec is not None and rec["status"] == 502 and rec["error"]["rule"] == "upstream.protocol"
    assert rec["turns"][0]["error_kind"] == "malformed"


@pytest.mark.parametrize("name", sorted(set(MALFORMED) - VALID_STREAMED))
async def test_a_stream_that_goes_bad_ends_with_an_error_event_and_a_truthful_record(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, name: str
) -> None:
    rw = await warden_factory({"audit": {"enabled": True}})
    fake.push(Reply(content="one two three", malformed=name, malformed_after=2))
    status, body, rid = await _chat(rw, token, stream=True)
    assert status == 200
    events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert events and events[-1] != b"[DONE]", "a stream that went bad is never ended as if it were whole"
    last = orjson.loads(events[-1])
    assert last["error"]["code"] and "upstream." in last["error"]["message"]
    rec = await rw.warden.audit.find(rid)
    assert rec is not None and rec["error"]["rule"].startswith("upstream.")
    assert rec["stream_end"]["cut"] == "refused" and rec["stream_end"]["events"] == len(events) - 1


async def test_a_201_with_an_error_beside_tool_calls_is_not_relayed(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await warden_factory()
    fake.push(Reply(malformed="error_beside_tool_calls", tool_calls=[{"name": "lookup", "arguments": "{}"}]))
    status, body, _ = await _chat(rw, token, stream=False)
    assert status == 502 and b"tool_calls" not in body


async def test_a_provider_event_over_the_size_bound_ends_the_stream_with_an_error(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider
) -> None:
    rw = await warden_factory({"upstream": {"max_sse_event_bytes": 2048}})
    fake.push(Reply(content="small " + "x" * 10_000))
    status, body, _ = await _chat(rw, token, stream=True)
    assert status == 200
    events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert b"x" * 10_000 not in body and b"upstream.protocol" in events[-1]
