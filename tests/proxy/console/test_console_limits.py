"""The Limits page: usage per rule from ``GET /admin/limits``, who is exhausted and until when, pinned to a tenant admin's tenant."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llm_warden.proxy.console.render import CSP
from tests.proxy.console.conftest import Browser, exhaust


@pytest.fixture
async def browser(limits_warden: Any) -> AsyncIterator[Browser]:
    b = Browser(limits_warden)
    yield b
    await b.close()


async def test_a_user_who_hit_the_limit_shows_as_exhausted_with_the_reset_time(browser: Browser, limits_warden: Any, token: Any) -> None:
    await exhaust(limits_warden, token(sub="alice"))
    await browser.sign_in()
    status, text, resp = await browser.get("/console/limits")
    assert status == 200 and resp.headers["Content-Security-Policy"] == CSP
    assert "Rule per-user: per user" in text and "requests: 2/minute" in text
    row = re.search(r'<tr class="exhausted">(.*?)</tr>', text)
    assert row is not None
    cells = row.group(1)
    assert "<td>acme</td><td>alice</td>" in cells and "<td>2 / 2</td><td>0</td>" in cells and "exhausted" in cells
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ">', cells)
    assert "(in 59 s)" in cells or "(in 1 min 0 s)" in cells
    assert 'aria-current="page">Limits' in text


async def test_a_tenant_admin_sees_its_tenant_only(browser: Browser, limits_warden: Any, token: Any) -> None:
    await exhaust(limits_warden, token(tenant="globex", sub="gina"))
    await browser.sign_in(token(tenant="acme", sub="aadmin", scope="warden:admin"))
    status, text, _ = await browser.get("/console/limits?tenant=globex")
    assert status == 200 and "gina" not in text and "globex" not in text
    assert 'name="tenant" value="acme" readonly' in text and "shared by every tenant" in text


async def test_hostile_input_is_escaped_or_refused(browser: Browser, limits_warden: Any) -> None:
    await browser.sign_in()
    status, text, _ = await browser.get("/console/limits?tenant=%3Cscript%3Ealert(1)%3C/script%3E&user=x")
    assert status == 200 and "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    status, text, _ = await browser.get("/console/limits?user=alice")  # a user without a tenant
    assert status == 400 and "needs &#x27;tenant&#x27;" in text
    status, text, _ = await browser.get("/console/limits?tenant=" + "a" * 300)
    assert status == 400 and "a" * 300 not in text.split("</form>")[-1]


async def test_signed_out_the_page_sends_to_sign_in(browser: Browser) -> None:
    status, _, resp = await browser.get("/console/limits", allow_redirects=False)
    assert status == 303 and resp.headers["Location"] == "/console/login"


async def test_without_the_plugin_the_page_says_so(warden_factory: Any) -> None:
    b = Browser(await warden_factory())
    try:
        await b.sign_in()
        status, text, _ = await b.get("/console/limits")
        assert status == 200 and "limits plugin is not enabled" in text
    finally:
        await b.close()
