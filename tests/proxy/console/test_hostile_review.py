"""A hostile review of the console: what an attacker controls (prompts, model output, tool arguments, JWT names,
query strings, cookies, forms) never becomes markup, a state change without the session's token, or another
tenant's data; a hostile query is a 400 page, never a 500."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest
from yarl import URL

from llm_warden.proxy.console import CONSOLE_KEY
from tests.conftest import ADMIN_TOKEN
from tests.fakeprovider import Reply
from tests.proxy.console.conftest import app_client, fn, hold_refund

XSS = '"><img src=x onerror=alert(1)><script>alert(1)</script>'
MARKUP = re.compile(r"<(?:img|script)\b[^>]*(?:onerror|alert)|<script>alert", re.I)


def _cookie(b: Any) -> str:
    return str(b.http.cookie_jar.filter_cookies(URL(b.base + "/console/approvals"))["warden_console"].value)


async def test_attacker_text_everywhere_is_rendered_as_text(cw: Any, fake: Any, token: Any, browser_factory: Any) -> None:
    """A prompt, model output, tool name and arguments, a model name and JWT names all carrying markup."""
    tok = token(tenant="acme", sub=XSS, groups=["billing"])
    fake.push(
        Reply(
            content=None,
            tool_calls=[{"id": "c1", "name": "refund", "arguments": '{"invoice_id": "' + XSS.replace('"', '\\"') + '", "amount": 5}'}],
            model=XSS,
        ),
        Reply(content=XSS, model=XSS),
    )
    async with app_client(cw, tok) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="m",
            messages=[{"role": "user", "content": XSS}],
            tools=[fn("refund")],  # type: ignore[list-item]
        )
    rid = raw.headers["x-request-id"]
    b = await browser_factory()
    await b.sign_in()
    for path in (
        "/console/approvals",
        f"/console/audit/exchange/{rid}",
        "/console/audit",
        "/console/audit?model=" + XSS,
        "/console/audit?user=" + XSS,
    ):
        status, text, r = await b.get(path)
        assert status in (200, 400), path
        assert not MARKUP.search(text), (path, MARKUP.search(text))
        assert r.headers["Cache-Control"] == "no-store" and "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    _, text, _ = await b.get(f"/console/audit/exchange/{rid}")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


@pytest.mark.parametrize("query", ["status=%C2%B2", "status=%D9%A1%D9%A0%D9%A0%D9%A0", "before=9999999999999999999", "before=%D9%A1"])
async def test_unicode_digits_and_overflowing_cursors_are_a_400(browser_factory: Any, query: str) -> None:
    """``str.isdigit`` accepts superscripts and other scripts' digits; a cursor past 2**63 overflows the database integer."""
    b = await browser_factory()
    await b.sign_in()
    status, text, r = await b.get("/console/audit?" + query)
    assert status in (200, 400), (status, text[:300])
    assert r.headers.get("Content-Security-Policy"), "the answer is a console page"
    if status == 400:
        assert 'role="alert"' in text


async def test_a_csrf_token_of_another_session_is_refused(cw: Any, browser_factory: Any) -> None:
    a = await browser_factory()
    await a.sign_in()
    b = await browser_factory()
    await b.sign_in()
    token_a = await a.csrf("/console/mode")
    status, text, _ = await b.post("/console/mode", {"csrf": token_a, "read_only": "on", "tenant": ""})
    assert status == 403 and "console.csrf" in text
    _, text, _ = await b.get("/console/mode")
    assert "Read-only is <strong>off</strong>" in text


@pytest.mark.parametrize(
    "path", ["/console/logout", "/console/mode?read_only=on&tenant=", "/console/approvals/apr_1/approve", "/console/retrieval/search"]
)
async def test_no_get_changes_state(browser_factory: Any, path: str) -> None:
    b = await browser_factory()
    await b.sign_in()
    status, _, _ = await b.get(path, allow_redirects=False)
    assert status in (200, 404, 405)
    status, _, _ = await b.get("/console/approvals", allow_redirects=False)
    assert status == 200, "still signed in"


async def test_signing_in_again_ends_the_session_the_browser_had(cw: Any, browser_factory: Any) -> None:
    """Sign-in always issues a fresh session id, and the one the browser presented (perhaps planted) no longer works."""
    b = await browser_factory()
    await b.sign_in()
    old = _cookie(b)
    async with aiohttp.ClientSession() as s:
        async with s.get(b.base + "/console/login") as r:
            login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', await r.text())
            assert login_csrf
            login_cookie = r.cookies["warden_console_login"].value
    async with aiohttp.ClientSession(cookies={"warden_console": old, "warden_console_login": login_cookie}) as s:
        async with s.post(
            b.base + "/console/login", data={"login_csrf": login_csrf.group(1), "token": ADMIN_TOKEN}, allow_redirects=False
        ) as r:
            assert r.status == 303
            new = r.cookies["warden_console"].value
    assert new != old
    sessions = cw.admin.runner.app[CONSOLE_KEY].sessions
    assert sessions.get(new) is not None
    assert sessions.get(old) is None, "the session the browser presented at sign-in was left alive"


async def test_redirects_never_leave_the_console(browser_factory: Any) -> None:
    b = await browser_factory()
    for path in ("/console/login?next=https://evil.test/", "/console/approvals?next=//evil.test", "/console?next=https://evil.test"):
        status, _, r = await b.get(path, allow_redirects=False)
        assert status in (200, 303)
        if status == 303:
            assert r.headers["Location"].startswith("/console/") and "evil" not in r.headers["Location"]
    await b.sign_in()
    csrf = await b.csrf()
    status, _, r = await b.post(
        "/console/logout?next=https://evil.test/", {"csrf": csrf, "next": "https://evil.test/"}, allow_redirects=False
    )
    assert status == 303 and r.headers["Location"] == "/console/login"


async def test_pages_with_secrets_are_not_cached_or_framed(browser_factory: Any) -> None:
    b = await browser_factory()
    status, _, r = await b.get("/console/login")
    assert r.headers["Cache-Control"] == "no-store" and r.headers["X-Frame-Options"] == "DENY"
    set_cookie = r.headers.getall("Set-Cookie")
    assert any("HttpOnly" in c and "SameSite=Strict" in c for c in set_cookie)
    await b.sign_in()
    for path in (
        "/console/approvals",
        "/console/approvals/state",
        "/console/mode",
        "/console/audit",
        "/console/retrieval",
        "/console/limits",
    ):
        _, _, r = await b.get(path)
        assert r.headers["Cache-Control"] == "no-store", path
        assert r.headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in r.headers["Content-Security-Policy"], path


async def test_replay_of_a_responses_exchange_goes_to_chat_completions(cw: Any, fake: Any, token: Any, browser_factory: Any) -> None:
    """The recorded turn is the translated chat request: replaying it to the provider's ``/responses`` would compare nothing."""
    fake.push(Reply(content="First answer."))
    async with aiohttp.ClientSession() as s:
        async with s.post(
            cw.base_url + "/responses", json={"model": "m", "input": "hi"}, headers={"Authorization": f"Bearer {token()}"}
        ) as r:
            assert r.status == 200
            rid = r.headers["x-request-id"]
    b = await browser_factory()
    await b.sign_in()
    csrf = await b.csrf(f"/console/audit/exchange/{rid}")
    fake.push(Reply(content="Second answer."))
    status, text, _ = await b.post(f"/console/audit/exchange/{rid}/replay", {"csrf": csrf})
    assert status == 200 and "First answer." in text and "Second answer." in text
    assert [r.path for r in fake.requests] == ["/v1/chat/completions", "/v1/chat/completions"]


async def test_the_approval_flash_escapes_a_hostile_subject_once(cw: Any, fake: Any, token: Any, browser_factory: Any) -> None:
    await hold_refund(cw, fake, token(sub="a&b<i>", groups=["billing"]))
    b = await browser_factory()
    await b.sign_in()
    _, text, _ = await b.get("/console/approvals")
    (aid,) = re.findall(r'data-approval="([^"]+)"', text)
    csrf = await b.csrf()
    _, text, _ = await b.post(f"/console/approvals/{aid}/approve", {"csrf": csrf})
    assert "call by a&amp;b&lt;i&gt;@acme will pass" in text and "<i>" not in text
