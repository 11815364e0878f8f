"""The plugins work on ``/v1/messages`` unchanged, because they see the internal chat shape.

Retrieval injects permission-scoped context after the translated system prompt and maps the answer's
citations; the limits plugin reserves tokens from the translated body and replays an ``Idempotency-Key``'s
recorded answer (stored in the internal shape) as an Anthropic message or stream.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import ADMIN_TOKEN, WardenFactory
from tests.fakeprovider import FakeProvider, Reply
from tests.proxy.protocols.conftest import anthropic_client
from tests.proxy.protocols.test_anthropic_sdk import sse_events

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def _put(rw: RunningWarden, tenant: str, doc_id: str, body: dict[str, Any]) -> int:
    async with aiohttp.ClientSession() as s, s.put(f"{rw.admin_url}/admin/documents/{tenant}/{doc_id}?wait=true", json=body, headers=ADMIN) as r:
        return r.status


@pytest.mark.parametrize("stream", [False, True])
async def test_retrieval_is_injected_and_cited(warden_factory: WardenFactory, tmp_path: Path, token: Callable[..., str], fake: FakeProvider, stream: bool) -> None:
    rw = await warden_factory({
        "plugins": {"enabled": ["headers", "retrieval"]},
        "retrieval": {"db": str(tmp_path / "r.db"), "index_dir": str(tmp_path / "r-index"), "embedding_model": "fake-embed", "sync_interval_s": 0.2,
                      "routes": ["chat", "messages"]},
    })
    assert await _put(rw, "acme", "handbook/vacation.md", {"title": "Vacation policy", "text": "# Vacation\n\nEmployees get 25 vacation days per year.",
                                                           "acl": {"allow_groups": ["staff"]}, "kind": "markdown"}) == 201
    assert await _put(rw, "acme", "salaries", {"text": "Salary bands and vacation payouts.", "acl": {"allow_groups": ["hr"]}}) == 201
    fake.push(Reply(content="You get 25 days [1]."))
    client = anthropic_client(rw, token(groups=["staff"]))
    body: dict[str, Any] = {"model": "m", "max_tokens": 50, "system": "You are helpful.", "messages": [{"role": "user", "content": "How many vacation days do I get?"}]}
    if stream:
        async with client.messages.stream(**body) as s:
            text = "".join([t async for t in s.text_stream])
    else:
        raw = await client.messages.with_raw_response.create(**body)
        msg = await raw.parse()
        text = msg.content[0].text
        assert raw.headers["x-warden-citations"] == "1=handbook/vacation.md"
    assert text == "You get 25 days [1]."
    msgs = fake.chat_requests()[-1].body["messages"]
    assert [m["role"] for m in msgs] == ["system", "system", "user"] and msgs[0]["content"] == "You are helpful."
    assert "25 vacation days" in msgs[1]["content"] and "Salary" not in msgs[1]["content"]


@pytest.mark.parametrize("stream", [False, True])
async def test_an_idempotent_replay_is_rendered_as_an_anthropic_answer(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, stream: bool
) -> None:
    rw = await warden_factory({"plugins": {"enabled": ["headers", "limits"]}, "limits": {"backend": "memory", "rules": [{"scope": "user", "tokens": "100000/minute"}]}})
    fake.push(Reply(content="exactly once please", usage={"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}))
    body = {"model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": "pay"}], "stream": stream}
    headers = {"x-api-key": token(), "Idempotency-Key": "pay-7781", "Content-Type": "application/json"}

    async def once() -> tuple[bytes, Any]:
        async with aiohttp.ClientSession() as s, s.post(rw.base_url + "/messages", json=body, headers=headers) as r:
            assert r.status == 200
            return await r.read(), r.headers

    first, _ = await once()
    again, h = await once()
    assert h["x-warden-idempotent-replay"] == "true" and len(fake.chat_requests()) == 1
    if stream:
        a, b = sse_events(first), sse_events(again)
        assert [n for n, _ in b] == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
        assert "".join(d["delta"].get("text", "") for n, d in a if n == "content_block_delta") == "exactly once please"
        assert "".join(d["delta"].get("text", "") for n, d in b if n == "content_block_delta") == "exactly once please"
        assert a[-2][1]["usage"] == b[-2][1]["usage"] == {"input_tokens": 6, "output_tokens": 3}
    else:
        one, two = orjson.loads(first), orjson.loads(again)
        assert one["content"] == two["content"] == [{"type": "text", "text": "exactly once please"}]
        assert one["usage"] == two["usage"] == {"input_tokens": 6, "output_tokens": 3} and two["type"] == "message"


async def test_the_token_reservation_reads_the_translated_body(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await warden_factory({"plugins": {"enabled": ["headers", "limits"]}, "limits": {"backend": "memory", "rules": [{"scope": "user", "tokens": "1000/minute"}]}})
    client = anthropic_client(rw, token())
    with pytest.raises(anthropic.RateLimitError) as err:
        await client.messages.create(model="m", max_tokens=5000, messages=[{"role": "user", "content": "x"}])
    assert "tokens" in str(err.value) and fake.chat_requests() == [], "max_tokens is reserved before the provider is asked"
