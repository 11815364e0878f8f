"""Upstream retries never send a POST twice once the provider may be working on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.fakeprovider import FakeProvider, Reply

BODY = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


class Dropper:
    """A provider that drops the connection of its first ``drops`` requests, then answers."""

    def __init__(self, drops: int) -> None:
        self.drops = drops
        self.seen: list[str] = []
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.seen.append(request.method)
        if len(self.seen) <= self.drops:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        return web.json_response({"object": "list", "data": []})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/v1/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"


@pytest.fixture
async def dropper() -> AsyncIterator[Dropper]:
    d = Dropper(drops=1)
    yield d
    if d.runner is not None:
        await d.runner.cleanup()


async def test_post_is_not_resent_after_a_read_timeout(warden_factory: Any, token: Any, fake: FakeProvider) -> None:
    w = await warden_factory({"upstream": {"timeout_s": 0.3, "max_retries": 2}})
    fake.push(Reply(hang=True), Reply(hang=True), Reply(hang=True))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{w.base_url}/chat/completions", json=BODY, headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 504
            assert (await r.json())["error"]["code"] == "upstream_timeout"
    assert len(fake.chat_requests()) == 1, "the provider may still be generating: a second POST would be billed twice"


async def test_post_is_not_resent_after_the_connection_dropped(warden_factory: Any, token: Any, dropper: Dropper) -> None:
    w = await warden_factory({"upstream": {"base_url": await dropper.start(), "max_retries": 2}})
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{w.base_url}/chat/completions", json=BODY, headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 502
    assert dropper.seen == ["POST"]


async def test_get_is_retried_after_the_connection_dropped(warden_factory: Any, token: Any, dropper: Dropper) -> None:
    w = await warden_factory({"upstream": {"base_url": await dropper.start(), "max_retries": 2}})
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{w.base_url}/models", headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 200
    assert dropper.seen == ["GET", "GET"]
