"""Passthrough routes relay the request as the client sent it: path, query, body, content type."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from tests.fakeprovider import FakeProvider


def _auth(token: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token()}"}


async def test_multipart_upload_is_relayed_byte_exact_with_its_content_type(warden: Any, token: Any, fake: FakeProvider) -> None:
    payload = bytes(range(256)) * 64
    form = aiohttp.FormData()
    form.add_field("purpose", "assistants")
    form.add_field("file", payload, filename="blob.bin", content_type="application/octet-stream")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{warden.base_url}/files", data=form, headers=_auth(token)) as r:
            assert r.status == 200
    (req,) = fake.requests
    assert req.headers.getall("Content-Type")[0].startswith("multipart/form-data; boundary=")
    assert len(req.headers.getall("Content-Type")) == 1
    assert isinstance(req.body, bytes) and payload in req.body


async def test_binary_body_keeps_its_type_and_bytes(warden: Any, token: Any, fake: FakeProvider) -> None:
    blob = b"\x00\xff\xfe binary \r\n\r\n"
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{warden.base_url}/blobs/1", data=blob, headers={**_auth(token), "Content-Type": "application/octet-stream"}) as r:
            assert r.status == 200
        async with s.delete(f"{warden.base_url}/files/abc", headers=_auth(token)) as r:
            assert r.status == 200 and (await r.json())["method"] == "DELETE"
    put, delete = fake.requests
    assert put.body == blob and put.headers["Content-Type"] == "application/octet-stream"
    assert "Content-Type" not in delete.headers


async def test_json_routes_still_send_json(warden: Any, token: Any, fake: FakeProvider) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{warden.base_url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}, headers=_auth(token)) as r:
            assert r.status == 200
    assert fake.requests[0].headers.getall("Content-Type") == ["application/json"]


async def test_encoded_path_characters_stay_encoded(warden: Any, token: Any, fake: FakeProvider) -> None:
    """%3F, %23 and %2F are part of a path segment, not a query, a fragment or a separator."""
    async with aiohttp.ClientSession() as s:
        for path in ("/files/a%3Fb?limit=2", "/files/a%23b", "/files/a%2Fb"):
            async with s.get(URL(warden.base_url + path, encoded=True), headers=_auth(token)) as r:
                assert r.status == 200
    assert [r.raw_path for r in fake.requests] == ["/v1/files/a%3Fb?limit=2", "/v1/files/a%23b", "/v1/files/a%2Fb"]


class StreamingProvider:
    """Streams SSE on a passthrough path (like /v1/responses), then stalls or drops."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'event: response.created\ndata: {"type": "response.created"}\n\n')
        if self.mode == "stall":
            await asyncio.sleep(5)
        elif self.mode == "drop":
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/responses", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"


@pytest.mark.parametrize("mode,code", [("ok", None), ("stall", "upstream_timeout"), ("drop", "upstream_unavailable")])
async def test_passthrough_stream_failure_is_not_a_clean_end(warden_factory: Any, token: Any, mode: str, code: str | None) -> None:
    provider = StreamingProvider(mode)
    try:
        w = await warden_factory({"upstream": {"base_url": await provider.start(), "timeout_s": 0.3}})
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{w.base_url}/responses", json={"model": "m", "input": "x", "stream": True}, headers=_auth(token)) as r:
                assert r.status == 200
                text = (await r.read()).decode()
        assert text.startswith("event: response.created\n")
        if code is None:
            assert text.endswith("data: [DONE]\n\n")
        else:
            last = text.strip().split("\n")[-1]
            assert last.startswith("data: {") and orjson.loads(last[6:])["error"]["code"] == code
    finally:
        if provider.runner is not None:
            await provider.runner.cleanup()
