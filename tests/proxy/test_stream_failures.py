"""A stream that already started is ended with an error event, never with a second response.

And a client that leaves before the first byte is a disconnect (not an internal
error), with the upstream connection released and the exchange recorded once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from llm_warden.proxy.errors import Forbidden
from llm_warden.proxy.exchange import Exchange
from llm_warden.proxy.plugin import Plugin, StreamEvent
from tests.fakeprovider import FakeProvider, Reply

BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


class Recorder:
    """An audit sink that keeps every exchange it is asked to record."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def record_exchange(self, ex: Exchange) -> None:
        self.exchanges.append(ex)

    async def record_event(self, kind: str, actor: dict[str, Any], data: dict[str, Any]) -> None:
        pass

    def healthy(self) -> bool:
        return True


class Breaks(Plugin):
    """Fails on the second content delta: a bug, or a refusal, depending on ``kind``."""

    name = "breaks"
    kind = "bug"

    async def on_stream_event(self, ex: Exchange, event: StreamEvent) -> None:
        choices = (event.data or {}).get("choices") or [{}]
        if choices[0].get("delta", {}).get("content") == " two":
            if Breaks.kind == "bug":
                raise RuntimeError("plugin bug")
            raise Forbidden("not that word", rule="test.word")


def _auth(token: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token()}"}


@pytest.mark.parametrize("kind,status", [("bug", 500), ("refusal", 403)])
async def test_error_after_the_stream_started_ends_it_with_an_error_event(warden_factory: Any, token: Any, fake: FakeProvider, kind: str, status: int) -> None:
    Breaks.kind = kind
    audit = Recorder()
    w = await warden_factory({"plugins": {"enabled": ["breaks"]}}, plugin_classes={"breaks": Breaks}, audit=audit)
    fake.push(Reply(content="one two three"))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{w.base_url}/chat/completions", json={**BODY, "stream": True}, headers=_auth(token)) as r:
            assert r.status == 200
            text = (await r.read()).decode()
        assert "HTTP/1.1" not in text, "no second status line inside the stream"
        events = [line for line in text.split("\n") if line.startswith("data: ")]
        assert '"one"' in events[1] and '"error"' in events[-1] and "[DONE]" not in text
        async with s.post(f"{w.base_url}/chat/completions", json=BODY, headers=_auth(token)) as r:
            assert r.status == 200, "the connection and the server are fine afterwards"
    first = audit.exchanges[0]
    assert first.status == status and first.error is not None
    assert first.error.rule == ("test.word" if kind == "refusal" else None)
    assert first.cut == "refused" and first.phase == "observe"
    assert len(audit.exchanges) == 2, "each exchange recorded exactly once"
    assert w.warden.inflight == 0


@pytest.mark.parametrize("stream", [True, False])
async def test_client_gone_before_the_first_byte(warden_factory: Any, token: Any, fake: FakeProvider, caplog: pytest.LogCaptureFixture, stream: bool) -> None:
    audit = Recorder()
    w = await warden_factory(audit=audit)
    fake.push(Reply(content="a b c", delay_s=0.3, chunk_delay_s=0.05))
    async with aiohttp.ClientSession() as s:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(s.post(f"{w.base_url}/chat/completions", json={**BODY, "stream": stream}, headers=_auth(token)), 0.1)
    for _ in range(100):
        if audit.exchanges and w.warden.inflight == 0:
            break
        await asyncio.sleep(0.02)
    (ex,) = audit.exchanges
    assert ex.client_disconnected and ex.error is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a client leaving is not a server error"
    connector = w.warden.upstream.session.connector
    assert connector is not None and not connector._acquired, "the upstream connection is released"
