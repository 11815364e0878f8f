"""A real Warden (tools plugin, SQLite audit, bootstrap admin token) for the console tests, and a signed-in HTTP client."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from llm_warden.proxy.testing import RunningWarden
from tests.conftest import ADMIN_TOKEN
from tests.fakeprovider import FakeProvider, Reply
from tests.proxy.audit.postgres import conftest as pg_audit

# The PostgreSQL audit store fixtures (a migrated schema of each test's own, started stores), for the search tests.
pg_admin = pg_audit.pg_admin
pg_schema = pg_audit.pg_schema
pg_dsn = pg_audit.pg_dsn
key_file = pg_audit.key_file
make_pg_log = pg_audit.make_pg_log

REFUND_SCHEMA = {
    "type": "object",
    "required": ["invoice_id", "amount"],
    "properties": {"invoice_id": {"type": "string"}, "amount": {"type": "number"}, "card": {"type": "string"}},
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {"name": "lookup", "effect": "read", "schema": {"type": "object"}},
    {"name": "refund", "effect": "write", "approval": "required", "schema": REFUND_SCHEMA},
    {"name": "note", "effect": "write", "schema": {"type": "object"}},
]
BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "please refund inv_1"}]}
REFUND = '{"invoice_id": "inv_1", "amount": 500}'


def fn(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


@pytest.fixture
async def cw(warden_factory: Any, tmp_path: Path) -> RunningWarden:
    """Warden with the tools plugin (read-only off), a real SQLite audit log and the console."""
    rw: RunningWarden = await warden_factory(
        {
            "plugins": {"enabled": ["tools", "headers"]},
            "policy": {"state_db": str(tmp_path / "state.db"), "read_only": False, "mode_refresh_s": 0},
            "tools": TOOLS,
            "audit": {"enabled": True, "durability": "sync"},
        }
    )
    return rw


def app_client(rw: RunningWarden, tok: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=rw.base_url, api_key=tok, max_retries=0, timeout=10)


async def hold_refund(rw: RunningWarden, fake: FakeProvider, tok: str, arguments: str = REFUND) -> str:
    """Have the model ask for a refund, which is held for approval; returns the request id."""
    fake.push(
        Reply(content=None, tool_calls=[{"id": "c1", "name": "refund", "arguments": arguments}]),
        Reply(content="Your refund awaits approval."),
    )
    async with app_client(rw, tok) as client:
        raw = await client.chat.completions.with_raw_response.create(**BODY, tools=[fn("refund")])  # type: ignore[list-item]
    assert raw.headers["x-warden-tool-decisions"].startswith("refund=held:apr_")
    return raw.headers["x-request-id"]


class Browser:
    """An HTTP client with a cookie jar, the way a browser without JavaScript uses the console."""

    def __init__(self, rw: RunningWarden) -> None:
        self.base = rw.admin_url
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.http.close()

    async def get(self, path: str, **kw: Any) -> tuple[int, str, Any]:
        async with self.http.get(self.base + path, allow_redirects=kw.pop("allow_redirects", True), **kw) as r:
            return r.status, await r.text(), r

    async def post(self, path: str, data: dict[str, str], **kw: Any) -> tuple[int, str, Any]:
        async with self.http.post(self.base + path, data=data, allow_redirects=kw.pop("allow_redirects", True), **kw) as r:
            return r.status, await r.text(), r

    async def sign_in(self, credential: str = ADMIN_TOKEN) -> str:
        status, text, _ = await self.get("/console/login")
        assert status == 200
        login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', text)
        assert login_csrf
        status, text, _ = await self.post("/console/login", {"login_csrf": login_csrf.group(1), "token": credential})
        return text

    async def csrf(self, path: str = "/console/approvals") -> str:
        _, text, _ = await self.get(path)
        m = re.search(r'name="csrf" value="([^"]+)"', text)
        assert m, text
        return m.group(1)


@pytest.fixture
async def browser_factory(cw: RunningWarden) -> AsyncIterator[Callable[[], Awaitable[Browser]]]:
    made: list[Browser] = []

    async def make() -> Browser:
        b = Browser(cw)
        made.append(b)
        return b

    yield make
    for b in made:
        await b.close()


@pytest.fixture
async def retrieval_warden(warden_factory: Any, tmp_path: Path) -> RunningWarden:
    """Warden with the retrieval plugin and three documents: two of acme (readable by staff / by hr), one of globex."""
    rw: RunningWarden = await warden_factory(
        {
            "plugins": {"enabled": ["headers", "retrieval"]},
            "retrieval": {
                "db": str(tmp_path / "r.db"),
                "index_dir": str(tmp_path / "r-index"),
                "embedding_model": "fake-embed",
                "sync_interval_s": 0.2,
            },
        }
    )
    docs = {
        ("acme", "hr/vacation.md"): {
            "title": "Vacation policy",
            "text": "# Vacation\n\nEmployees get 25 vacation days per year.",
            "acl": {"allow_groups": ["staff"]},
        },
        ("acme", "hr/salaries.md"): {
            "title": "Salaries",
            "text": "# Salaries\n\nVacation pay and salary bands for every level.",
            "acl": {"allow_groups": ["hr"]},
        },
        ("globex", "secret.md"): {"title": "Globex plans", "text": "Globex vacation plans are secret.", "acl": {"public": True}},
    }
    async with aiohttp.ClientSession() as s:
        for (tenant, doc_id), body in docs.items():
            async with s.put(
                f"{rw.admin_url}/admin/documents/{tenant}/{doc_id}?wait=true", json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
            ) as r:
                assert r.status == 201
    return rw


@pytest.fixture
async def limits_warden(warden_factory: Any) -> RunningWarden:
    """Warden with the limits plugin: 2 requests a minute per user, 100 per tenant, 10 per model."""
    rw: RunningWarden = await warden_factory(
        {
            "plugins": {"enabled": ["headers", "limits"]},
            "limits": {
                "rules": [
                    {"scope": "user", "requests": "2/minute", "name": "per-user"},
                    {"scope": "tenant", "requests": "100/minute", "tokens": "100000/minute"},
                    {"scope": "model", "requests": "10/minute", "name": "per-model"},
                ]
            },
        }
    )
    return rw


async def exhaust(rw: RunningWarden, tok: str) -> None:
    """Three requests of one user: the third is refused (2 a minute)."""
    async with app_client(rw, tok) as client:
        await client.chat.completions.create(**BODY)
        await client.chat.completions.create(**BODY)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(**BODY)
