"""The retrieval page: index status, a tenant's documents, and what a principal would get injected (and why not)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.proxy.console.conftest import Browser


@pytest.fixture
async def rw(retrieval_warden: Any) -> Any:
    return retrieval_warden


@pytest.fixture
async def browser(rw: Any) -> Any:
    b = Browser(rw)
    yield b
    await b.close()


async def test_index_status_and_documents_with_freshness_and_acl(browser: Browser) -> None:
    await browser.sign_in()
    status, text, _ = await browser.get("/console/retrieval?tenant=acme")
    assert status == 200 and "Index status" in text and "Ready: <strong>yes</strong>" in text
    assert "hr/vacation.md" in text and "Vacation policy" in text and "groups staff" in text and "Globex plans" not in text


async def test_what_a_principal_would_get_and_why_others_were_excluded(browser: Browser) -> None:
    await browser.sign_in()
    csrf = await browser.csrf("/console/retrieval")
    status, text, _ = await browser.post(
        "/console/retrieval/search", {"csrf": csrf, "tenant": "acme", "user": "ann", "groups": "staff", "query": "vacation days"}
    )
    assert status == 200 and "Injected for ann@acme (groups staff)" in text
    assert "hr/vacation.md" in text and "25 vacation days" in text
    assert "hr/salaries.md" in text and ">acl<" in text and "salary bands" not in text  # excluded by ACL: id only, never its text


async def test_search_needs_csrf_and_validates_input(browser: Browser) -> None:
    await browser.sign_in()
    status, text, _ = await browser.post("/console/retrieval/search", {"tenant": "acme", "user": "ann", "query": "x"})
    assert status == 403 and "console.csrf" in text
    csrf = await browser.csrf("/console/retrieval")
    status, text, _ = await browser.post("/console/retrieval/search", {"csrf": csrf, "tenant": "acme", "user": "", "query": "x"})
    assert status == 400 and "&#x27;tenant&#x27; and &#x27;user&#x27; are required" in text
    status, text, _ = await browser.post("/console/retrieval/search", {"csrf": csrf, "tenant": "acme", "user": "ann", "query": "x" * 3000})
    assert status == 400


async def test_a_tenant_admin_is_pinned_to_its_tenant(browser: Browser, token: Any) -> None:
    await browser.sign_in(token(tenant="acme", sub="aadmin", scope="warden:admin"))
    status, text, _ = await browser.get("/console/retrieval?tenant=globex")
    assert "Globex plans" not in text and "Documents of acme" in text and "an admin of every tenant sees them" in text
    csrf = await browser.csrf("/console/retrieval")
    _, text, _ = await browser.post("/console/retrieval/search", {"csrf": csrf, "tenant": "globex", "user": "g", "query": "vacation plans"})
    assert "Globex" not in text and "Injected for g@acme" in text


async def test_without_the_plugin_the_page_says_so(warden_factory: Any) -> None:
    rw = await warden_factory()
    b = Browser(rw)
    try:
        await b.sign_in()
        status, text, _ = await b.get("/console/retrieval")
        assert status == 200 and "retrieval plugin is not enabled" in text
        status, text, _ = await b.get("/console/approvals")
        assert status == 200 and "tools plugin is not enabled" in text
    finally:
        await b.close()
