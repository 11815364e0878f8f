"""Pass-through routes relay the request as the client sent it: query, body, content type.

Pass-through is an allow-list (``[server] passthrough_routes``); the upstream
path is built from the matched route, and a path that is not canonical is
refused before anything reaches the provider.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from llm_warden.proxy.errors import ConfigError
from tests.fakeprovider import FakeProvider

ROUTES = ["POST /v1/files", "GET /v1/files/{file_id}", "DELETE /v1/files/{file_id}", "PUT /v1/blobs/{blob_id}", "POST /v1/completions"]
PASSTHROUGH: dict[str, Any] = {"server": {"passthrough_routes": ROUTES}}


def _auth(token: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token()}"}


@pytest.fixture
async def warden(warden_factory: Any) -> Any:
    return await warden_factory(PASSTHROUGH)


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


async def test_the_query_is_relayed_and_the_upstream_path_is_the_routes(warden: Any, token: Any, fake: FakeProvider) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(URL(warden.base_url + "/files/file-abc_1.json?limit=2&order=desc", encoded=True), headers=_auth(token)) as r:
            assert r.status == 200
    assert [r.raw_path for r in fake.requests] == ["/v1/files/file-abc_1.json?limit=2&order=desc"]


async def test_an_encoded_query_is_relayed_as_the_client_sent_it(warden: Any, token: Any, fake: FakeProvider) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(URL(warden.base_url + "/files/abc?after=%23x&limit=2&purpose=a%26b", encoded=True), headers=_auth(token)) as r:
            assert r.status == 200
    assert [r.raw_path for r in fake.requests] == ["/v1/files/abc?after=%23x&limit=2&purpose=a%26b"]


NOT_CANONICAL = [
    ("/files/a%3Fb?limit=2", "percent-encoded"),
    ("/files/a%23b", "percent-encoded"),
    ("/files/a%2Fb", "percent-encoded"),
    ("/files/%61bc", "percent-encoded"),
    ("/files/./abc", "dot segment"),
    ("/files/../models", "dot segment"),
    ("/files/abc/../../chat/completions", "dot segment"),
    ("/files//abc", "empty segment"),
    ("/files/abc/", "empty segment"),
    ("/files/a\\b", "outside the allowed set"),
]


@pytest.mark.parametrize("path,why", NOT_CANONICAL)
async def test_a_path_that_is_not_canonical_is_refused_and_never_reaches_the_provider(warden: Any, token: Any, fake: FakeProvider, path: str, why: str) -> None:
    """%3F, %23, %2F, dot segments and the like are read differently by clients, Warden and providers: refused, not forwarded."""
    async with aiohttp.ClientSession() as s:
        async with s.get(URL(warden.base_url + path, encoded=True), headers=_auth(token)) as r:
            assert r.status == 400
            err = (await r.json())["error"]
    assert "rule: request.path" in err["message"] and why in err["message"]
    assert err["type"] == "invalid_request_error" and err["code"] == "bad_request"
    assert path not in err["message"] and "%" not in err["message"] and "\\" not in err["message"], "the path is not echoed"
    assert fake.requests == []


async def test_a_path_outside_the_allow_list_is_404_and_never_reaches_the_provider(warden: Any, token: Any, fake: FakeProvider) -> None:
    async with aiohttp.ClientSession() as s:
        for method, path in (("GET", "/blobs/1"), ("POST", "/files/abc"), ("GET", "/files/abc/content"), ("GET", "/vector_stores")):
            async with s.request(method, warden.base_url + path, headers=_auth(token)) as r:
                assert r.status in (404, 405), (method, path)
                err = (await r.json())["error"]
                assert "rule: server.routes" in err["message"], (method, path)
    assert fake.requests == []


@pytest.mark.parametrize("path", ["/assistants", "/threads/t1/runs", "/realtime/sessions"])
async def test_ungoverned_provider_apis_are_refused_by_name(warden: Any, token: Any, fake: FakeProvider, path: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(warden.base_url + path, json={"model": "m", "input": "x"}, headers=_auth(token)) as r:
            assert r.status == 404
            err = (await r.json())["error"]
    assert "rule: server.routes.ungoverned" in err["message"] and "not governed" in err["message"]
    assert fake.requests == []


@pytest.mark.parametrize("spec", ["POST /v1/responses", "GET /v1/responses/{id}", "POST /v1/threads/{id}/runs", "POST /v1/chat/completions"])
async def test_a_governed_or_ungoverned_api_cannot_be_configured_as_pass_through(warden_factory: Any, spec: str) -> None:
    with pytest.raises(ConfigError) as ei:
        await warden_factory({"server": {"passthrough_routes": [spec]}})
    assert ei.value.key == "server.passthrough_routes[0]"


class StreamingProvider:
    """Streams SSE on a pass-through path (the legacy /v1/completions), then stalls or drops."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'event: completion.created\ndata: {"type": "completion.created"}\n\n')
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
        app.router.add_post("/v1/completions", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"


@pytest.mark.parametrize("mode,code", [("ok", None), ("stall", "upstream_timeout"), ("drop", "upstream_unavailable")])
async def test_passthrough_stream_failure_is_not_a_clean_end(warden_factory: Any, token: Any, mode: str, code: str | None) -> None:
    provider = StreamingProvider(mode)
    try:
        w = await warden_factory({**PASSTHROUGH, "upstream": {"base_url": await provider.start(), "timeout_s": 0.3}})
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{w.base_url}/completions", json={"model": "m", "prompt": "x", "stream": True}, headers=_auth(token)) as r:
                assert r.status == 200
                text = (await r.read()).decode()
        assert text.startswith("event: completion.created\n")
        if code is None:
            assert text.endswith("data: [DONE]\n\n")
        else:
            last = text.strip().split("\n")[-1]
            assert last.startswith("data: {") and orjson.loads(last[6:])["error"]["code"] == code
    finally:
        if provider.runner is not None:
            await provider.runner.cleanup()
