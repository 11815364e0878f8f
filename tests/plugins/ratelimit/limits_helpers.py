"""Helpers for the limits plugin tests: Exchanges driven through the hooks like the core does."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from llm_warden.plugins.ratelimit.plugin import LimitsPlugin
from llm_warden.proxy.errors import WardenError
from llm_warden.proxy.exchange import Exchange, Principal, UpstreamTurn
from tests.redis_helpers import REDIS_URL, RedisServer, free_port

__all__ = ["REDIS_URL", "RedisServer", "free_port"]


MakePlugin = Callable[..., Awaitable[LimitsPlugin]]


def make_exchange(
    tenant: str = "acme",
    subject: str = "alice",
    groups: tuple[str, ...] = (),
    model: str = "gpt-4o-mini",
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    stream: bool = False,
) -> Exchange:
    if body is None:
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    if stream:
        body = {**body, "stream": True}
    raw = orjson.dumps(body)
    return Exchange(
        request_id=uuid.uuid4().hex,
        route="chat",
        method="POST",
        path="/v1/chat/completions",
        principal=Principal(tenant=tenant, subject=subject, groups=frozenset(groups)),
        request_headers=dict(headers or {}),
        raw_body=raw,
        body=body,
        stream=stream,
        model=model,
    )


def completion(content: str = "hi there", prompt_tokens: int = 5, completion_tokens: int = 3) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class Upstream:
    """Counts provider calls; ``answer`` is what the fake provider returns."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, ex: Exchange, answer: dict[str, Any] | None = None, status: int = 200) -> None:
        self.calls += 1
        ex.turns.append(UpstreamTurn(index=0, body=ex.raw_body, status=status))
        ex.status = status
        ans = answer if answer is not None else completion()
        ex.response_body = ans
        ex.add_usage(ans.get("usage"))


async def drive(
    plugin: LimitsPlugin,
    ex: Exchange,
    upstream: Upstream | None = None,
    answer: dict[str, Any] | None = None,
    status: int = 200,
    before_complete: Callable[[], Awaitable[None]] | None = None,
) -> Exchange:
    """Run one exchange through the hooks the way the core does."""
    try:
        await plugin.on_request(ex)
    except WardenError as e:
        ex.error, ex.status = e, e.status
        await plugin.on_complete(ex)
        return ex
    if ex.local_reply is not None:
        ex.status = ex.local_reply.status
    else:
        await (upstream or Upstream())(ex, answer, status)
        if before_complete is not None:
            await before_complete()
    await plugin.on_complete(ex)
    return ex


def recorded(ex: Exchange) -> dict[str, Any]:
    """What the limits plugin records for ``ex`` (its ``audit_fields``, as the audit record gets them)."""
    from llm_warden.plugins.ratelimit.plugin import STATE

    st = ex.slots.get(STATE)
    assert st is not None and st.record, "the limits plugin recorded nothing for this exchange"
    return st.record
