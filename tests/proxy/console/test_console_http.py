"""The console's handlers over plain HTTP: sign-in, sessions, CSRF, tenant isolation, hostile input."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest
from yarl import URL

from llm_warden.proxy.console import CONSOLE_KEY
from llm_warden.proxy.console.render import CSP
from tests.conftest import ADMIN_TOKEN
from tests.proxy.console.conftest import hold_refund

PAGES = ["/console/approvals", "/console/approvals/state", "/console/mode", "/console/audit", "/console/audit/exchange/req_x"]


@pytest.mark.parametrize("path", PAGES)
async def test_every_page_needs_a_session(browser_factory: Any, path: str) -> None:
    b = await browser_factory()
    status, _, r = await b.get(path, allow_redirects=False)
    assert status == 303 and r.headers["Location"] == "/console/login"


async def test_sign_in_sets_a_strict_httponly_cookie_and_pages_carry_the_csp(browser_factory: Any) -> None:
    b = await browser_factory()
    _, text, r = await b.get("/console/login")
    assert r.headers["Content-Security-Policy"] == CSP and '<script src="/console/static/console.js"' in text
    token = re.search(r'name="login_csrf" value="([^"]+)"', text).group(1)  # type: ignore[union-attr]
    status, _, r = await b.post("/console/login", {"login_csrf": token, "token": ADMIN_TOKEN}, allow_redirects=False)
    assert status == 303 and r.headers["Location"] == "/console/approvals"
    cookie = r.headers["Set-Cookie"]
    assert "warden_console=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # plain HTTP here; Secure when the request came over TLS
    status, text, r = await b.get("/console/approvals")
    assert status == 200 and "bootstrap-admin" in text and "every tenant" in text
    assert "style=" not in text and "<script>" not in text and "onclick" not in text


async def test_static_files_come_from_the_package_and_nothing_else(browser_factory: Any) -> None:
    b = await browser_factory()
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        status, body, r = await b.get(f"/console/static/{name}")
        assert status == 200 and r.content_type == kind and body
        assert "http://" not in body and "https://" not in body  # nothing fetched from elsewhere
    for hostile in ("..%2fconsole.js", "%2e%2e/%2e%2e/admin.py", "x.js", "console.js%00"):
        status, _, _ = await b.get(f"/console/static/{hostile}")
        assert status == 404


@pytest.mark.parametrize(
    "credential,status,rule",
    [("not-the-token-but-long-enough-0123", 401, "auth.malformed"), ("", 400, ""), ("x" * 20000, 400, "")],
)
async def test_a_wrong_credential_is_refused_without_echo(browser_factory: Any, credential: str, status: int, rule: str) -> None:
    b = await browser_factory()
    text = await b.sign_in(credential)
    assert "Sign in" in text and (credential[:20] not in text or not credential)
    assert rule in text
    got, _, r = await b.get("/console/approvals", allow_redirects=False)
    assert got == 303


async def test_a_token_without_the_admin_scope_is_refused(browser_factory: Any, token: Any) -> None:
    b = await browser_factory()
    text = await b.sign_in(token())
    assert "admin.scope" in text
    got, _, _ = await b.get("/console/approvals", allow_redirects=False)
    assert got == 303


async def test_login_without_its_csrf_cookie_is_refused(cw: Any) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(cw.admin_url + "/console/login", data={"login_csrf": "forged", "token": ADMIN_TOKEN}, allow_redirects=False) as r:
            assert r.status == 403 and "console.csrf" in await r.text() and "warden_console=" not in r.headers.get("Set-Cookie", "")


async def test_a_forged_csrf_token_is_refused_and_nothing_changes(cw: Any, browser_factory: Any) -> None:
    b = await browser_factory()
    await b.sign_in()
    for form in ({"read_only": "on"}, {"read_only": "on", "csrf": "forged"}, {"read_only": "on", "csrf": ""}):
        status, text, _ = await b.post("/console/mode", form)
        assert status == 403 and "console.csrf" in text
    tools = next(p for p in cw.warden.chain.plugins if p.name == "tools")
    assert tools.mode.read_only_for(None)[0] is False  # type: ignore[attr-defined]


async def test_a_cross_site_post_is_refused_even_with_the_token(browser_factory: Any) -> None:
    b = await browser_factory()
    await b.sign_in()
    csrf = await b.csrf("/console/mode")
    status, text, _ = await b.post("/console/mode", {"read_only": "on", "csrf": csrf}, headers={"Origin": "https://evil.example"})
    assert status == 403 and "console.origin" in text
    status, text, _ = await b.post("/console/mode", {"read_only": "on", "csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and "console.origin" in text


async def test_a_post_that_is_not_a_form_is_refused(browser_factory: Any) -> None:
    b = await browser_factory()
    await b.sign_in()
    async with b.http.post(b.base + "/console/mode", json={"read_only": True}) as r:
        assert r.status == 400 and "console.form" in await r.text()


async def test_read_only_switch_records_who_changed_it(cw: Any, browser_factory: Any) -> None:
    b = await browser_factory()
    await b.sign_in()
    csrf = await b.csrf("/console/mode")
    status, text, _ = await b.post("/console/mode", {"read_only": "on", "csrf": csrf, "tenant": ""})
    assert status == 200 and "Read-only is <strong>ON</strong>" in text and "bootstrap-admin@*" in text
    status, text, _ = await b.post("/console/mode", {"read_only": "off", "csrf": csrf, "tenant": "acme"})
    assert "Tenant acme" in text
    status, text, _ = await b.post("/console/mode", {"read_only": "maybe", "csrf": csrf})
    assert status == 400
    (rec,) = await cw.warden.audit.search(kind="tools.mode", limit=1)
    assert rec["actor"]["subject"] == "bootstrap-admin" and rec["data"]["tenant"] == "acme"


async def test_approve_and_deny_through_the_inbox(cw: Any, fake: Any, token: Any, browser_factory: Any) -> None:
    rid = await hold_refund(cw, fake, token(groups=["billing"]))
    b = await browser_factory()
    await b.sign_in()
    status, text, _ = await b.get("/console/approvals")
    aid = re.search(r'data-approval="([^"]+)"', text).group(1)  # type: ignore[union-attr]
    assert rid in text and "please refund inv_1" in text and "Held by rule" in text
    csrf = await b.csrf()
    status, text, _ = await b.post(f"/console/approvals/{aid}/approve", {"csrf": csrf, "comment": "checked"})
    assert status == 200 and f"Approved {aid}" in text
    status, text, _ = await b.post(f"/console/approvals/{aid}/deny", {"csrf": csrf, "comment": "too late"})
    assert "Nothing changed" in text and "only a pending approval can be decided" in text
    (rec,) = await cw.warden.audit.search(kind="tools.approval.approve", limit=1)
    assert rec["actor"]["subject"] == "bootstrap-admin" and rec["data"]["approval_id"] == aid and rec["data"]["comment"] == "checked"
    status, text, _ = await b.post("/console/approvals/apr_unknown/approve", {"csrf": csrf})
    assert "not found" in text
    status, text, _ = await b.post("/console/approvals/..%2f..%2fadmin%2freload/approve", {"csrf": csrf})
    assert status == 404


async def test_arguments_in_the_inbox_are_redacted_like_the_audit_log(cw: Any, fake: Any, token: Any, browser_factory: Any) -> None:
    secret = "sk-live-" + "a1b2c3d4" * 4
    await hold_refund(cw, fake, token(groups=["billing"]), '{"invoice_id": "inv_9", "amount": 900, "card": "' + secret + '"}')
    b = await browser_factory()
    await b.sign_in()
    _, text, _ = await b.get("/console/approvals")
    assert "inv_9" in text and secret not in text


async def test_a_tenant_admin_sees_and_acts_on_its_tenant_only(cw: Any, fake: Any, token: Any, browser_factory: Any) -> None:
    acme_rid = await hold_refund(cw, fake, token(groups=["billing"]))
    globex_rid = await hold_refund(cw, fake, token(tenant="globex", sub="gina"), '{"invoice_id": "inv_g", "amount": 700}')
    b = await browser_factory()
    await b.sign_in(token(tenant="globex", sub="gadmin", scope="warden:admin"))
    _, text, _ = await b.get("/console/approvals")
    assert "inv_g" in text and "gina@globex" in text and "alice@acme" not in text and acme_rid not in text
    status, text, _ = await b.get(f"/console/audit/exchange/{acme_rid}")
    assert status == 404
    status, text, _ = await b.get(f"/console/audit/exchange/{globex_rid}")
    assert status == 200
    status, text, _ = await b.get("/console/audit?tenant=acme")
    assert status == 400 and "tenant &#x27;globex&#x27; only" in text
    _, text, _ = await b.get("/console/audit")
    assert globex_rid in text and acme_rid not in text
    admin = await browser_factory()
    await admin.sign_in()
    _, text, _ = await admin.get("/console/approvals")
    globex_ids = await _ids(b)
    (acme_id,) = [a for a in re.findall(r'data-approval="([^"]+)"', text) if a not in globex_ids]
    csrf = await b.csrf("/console/mode")
    _, text, _ = await b.post(f"/console/approvals/{acme_id}/approve", {"csrf": csrf})
    assert "not found" in text
    _, text, _ = await b.post("/console/mode", {"csrf": csrf, "read_only": "on", "tenant": ""})
    assert "Nothing changed" in text and "affects every tenant" in text
    _, text, _ = await b.post("/console/mode", {"csrf": csrf, "read_only": "on", "tenant": "acme"})
    assert "Nothing changed" in text
    _, text, _ = await b.post("/console/mode", {"csrf": csrf, "read_only": "on", "tenant": "globex"})
    assert "Tenant globex" in text and "Tenant acme" not in text


async def _ids(b: Any) -> list[str]:
    _, text, _ = await b.get("/console/approvals")
    return re.findall(r'data-approval="([^"]+)"', text)


async def test_the_session_expires(cw: Any, browser_factory: Any) -> None:
    clock = [1_000_000.0]
    sessions = _sessions(cw)
    sessions.clock = lambda: clock[0]
    b = await browser_factory()
    await b.sign_in()
    status, _, _ = await b.get("/console/approvals", allow_redirects=False)
    assert status == 200
    clock[0] += sessions.ttl_s + 1
    status, _, r = await b.get("/console/approvals", allow_redirects=False)
    assert status == 303 and r.headers["Location"] == "/console/login?expired=1"
    status, text, _ = await b.get("/console/login?expired=1")
    assert "session has expired" in text
    assert len(sessions) == 0


def _sessions(cw: Any) -> Any:
    return cw.admin.runner.app[CONSOLE_KEY].sessions


async def test_the_session_ends_with_the_admin_jwt(cw: Any, browser_factory: Any, token: Any) -> None:
    b = await browser_factory()
    await b.sign_in(token(tenant="*", sub="ops", scope="warden:admin", exp_in=120))
    (session,) = _sessions(cw)._by_hash.values()
    assert session.expires <= session.principal.claims["exp"]


async def test_sign_out_ends_the_session(browser_factory: Any) -> None:
    b = await browser_factory()
    await b.sign_in()
    csrf = await b.csrf()
    cookie = b.http.cookie_jar.filter_cookies(URL(b.base + "/console/approvals"))["warden_console"].value
    status, _, _ = await b.post("/console/logout", {"csrf": csrf})
    assert status == 200
    async with aiohttp.ClientSession(cookies={"warden_console": cookie}) as s:
        async with s.get(b.base + "/console/approvals", allow_redirects=False) as r:
            assert r.status == 303


@pytest.mark.parametrize(
    "query",
    [
        "status=abc",
        "status=99999",
        "since=yesterday",
        "until=2026-13-45T99:99",
        "before=1%20OR%201=1",
        "before=" + "9" * 80,
        "request_id=" + "x" * 300,
        "user=%00",
        "tenant=%0d%0aSet-Cookie:x",
        "before=1.2",
        "tool=%25%25%25",
    ],
)
async def test_hostile_audit_queries_get_a_clear_400_or_an_empty_page(browser_factory: Any, query: str) -> None:
    b = await browser_factory()
    await b.sign_in()
    status, text, _ = await b.get("/console/audit?" + query)
    assert status in (200, 400) and "Traceback" not in text
    if status == 400:
        assert 'role="alert"' in text


async def test_audit_search_pages_with_a_cursor_and_finds_a_request_id(cw: Any, fake: Any, token: Any, browser_factory: Any) -> None:
    rids = [await hold_refund(cw, fake, token(groups=["billing"]), f'{{"invoice_id": "inv_{i}", "amount": 500}}') for i in range(3)]
    b = await browser_factory()
    await b.sign_in()
    _, text, _ = await b.get(f"/console/audit?request_id={rids[1]}")
    assert rids[1] in text and rids[0] not in text and rids[2] not in text
    import llm_warden.proxy.console.audit_views as av
    old = av.PAGE
    av.PAGE = 2
    try:
        _, text, _ = await b.get("/console/audit?kind=exchange")
        assert rids[2] in text and rids[1] in text and rids[0] not in text
        nxt = re.search(r'href="(/console/audit\?[^"]+)" rel="next"', text).group(1).replace("&amp;", "&")  # type: ignore[union-attr]
        _, text, _ = await b.get(nxt)
        assert rids[0] in text and rids[2] not in text
    finally:
        av.PAGE = old
    _, text, _ = await b.get("/console/audit?model=m&kind=exchange")
    assert all(r in text for r in rids)
    _, text, _ = await b.get("/console/audit?model=other")
    assert "No records match" in text


async def test_the_exchange_page_tells_the_whole_story(cw: Any, fake: Any, token: Any, browser_factory: Any) -> None:
    rid = await hold_refund(cw, fake, token(groups=["billing"]))
    b = await browser_factory()
    await b.sign_in()
    status, text, _ = await b.get(f"/console/audit/exchange/{rid}")
    assert status == 200
    for part in (
        "Prompt",
        "Injected context",
        "Tool calls",
        "Upstream turns",
        "Answer",
        "Audit chain",
        "matches its hash",
        "links to the record before it",
        "please refund inv_1",
        "hold",
        "Your refund awaits approval.",
    ):
        assert part in text, part
    status, text, _ = await b.get("/console/audit/exchange/<script>")
    assert status == 404 and "<script>" not in text


async def test_approvals_state_lists_the_pending_ids(cw: Any, fake: Any, token: Any, browser_factory: Any) -> None:
    await hold_refund(cw, fake, token(groups=["billing"]))
    b = await browser_factory()
    await b.sign_in()
    status, body, r = await b.get("/console/approvals/state")
    import orjson

    state = orjson.loads(body)
    assert status == 200 and len(state["pending"]) == 1 and state["pending"][0].startswith("apr_")


async def test_the_console_can_be_turned_off(warden_factory: Any) -> None:
    rw = await warden_factory({"admin": {"console": False}})
    async with aiohttp.ClientSession() as s:
        async with s.get(rw.admin_url + "/console/login") as r:
            assert r.status == 404


async def test_bad_session_ttl_is_a_config_error(warden_factory: Any) -> None:
    from llm_warden.proxy.errors import ConfigError

    with pytest.raises(ConfigError, match="console_session_ttl_s"):
        await warden_factory({"admin": {"console_session_ttl_s": 0}})


async def test_feedback_and_an_override_are_recorded_with_the_reviewer(cw: Any, fake: Any, token: Any, browser_factory: Any) -> None:
    rid = await hold_refund(cw, fake, token(groups=["billing"]))
    b = await browser_factory()
    await b.sign_in()
    csrf = await b.csrf(f"/console/audit/exchange/{rid}")
    form = {"csrf": csrf, "rating": "-1", "accepted_answer": "no", "comment": "wrong tone", "correction": "Refund queued for approval."}
    status, text, _ = await b.post(f"/console/audit/exchange/{rid}/feedback", form)
    assert status == 200 and "Feedback fb_" in text and "recorded" in text
    assert "Refund queued for approval." in text  # the related records list it
    (rec,) = await cw.warden.audit.search(kind="feedback", limit=1)
    assert rec["actor"]["subject"] == "bootstrap-admin" and rec["data"]["request_id"] == rid
    assert (
        rec["data"]["rating"] == -1
        and rec["data"]["accepted_answer"] is False
        and rec["data"]["correction"] == "Refund queued for approval."
    )
    for bad in ({"rating": "7"}, {"accepted_answer": "maybe"}):
        status, _, _ = await b.post(f"/console/audit/exchange/{rid}/feedback", {"csrf": csrf, **bad})
        assert status == 400
    status, text, _ = await b.post(f"/console/audit/exchange/{rid}/feedback", {"csrf": csrf})
    assert "Feedback not recorded" in text and "feedback.schema" in text
    status, text, _ = await b.post(f"/console/audit/exchange/{rid}/feedback", {"rating": "1"})
    assert status == 403


async def test_a_tenant_admin_cannot_review_another_tenants_exchange(cw: Any, fake: Any, token: Any, browser_factory: Any) -> None:
    rid = await hold_refund(cw, fake, token(groups=["billing"]))
    b = await browser_factory()
    await b.sign_in(token(tenant="globex", sub="gadmin", scope="warden:admin"))
    csrf = await b.csrf("/console/mode")
    _, text, _ = await b.post(f"/console/audit/exchange/{rid}/feedback", {"csrf": csrf, "rating": "1"})
    assert "Feedback not recorded" in text and "feedback.request" in text
    assert await cw.warden.audit.search(kind="feedback") == []


async def test_replay_against_another_model_side_by_side(cw: Any, fake: Any, token: Any, browser_factory: Any) -> None:
    from tests.fakeprovider import Reply
    from tests.proxy.console.conftest import BODY, app_client

    fake.push(Reply(content="Refunds take 5 days."))
    async with app_client(cw, token()) as client:
        raw = await client.chat.completions.with_raw_response.create(**BODY)
    rid = raw.headers["x-request-id"]
    b = await browser_factory()
    await b.sign_in()
    csrf = await b.csrf(f"/console/audit/exchange/{rid}")
    fake.push(Reply(content="Refunds take 3 days.", model="other-model"))
    status, text, _ = await b.post(f"/console/audit/exchange/{rid}/replay", {"csrf": csrf, "model": "other-model"})
    assert status == 200 and "Refunds take 5 days." in text and "Refunds take 3 days." in text and "differs" in text
    sent = fake.chat_requests()[-1]
    assert sent.body["model"] == "other-model" and sent.body["messages"] == BODY["messages"]
    (rec,) = await cw.warden.audit.search(kind="console.replay", limit=1)
    assert rec["actor"]["subject"] == "bootstrap-admin" and rec["data"] == {"request_id": rid, "turn": 0, "model": "other-model", "status": 200}
    status, _, _ = await b.post(f"/console/audit/exchange/{rid}/replay", {"csrf": csrf, "model": "x" * 200})
    assert status == 400
    status, _, _ = await b.post(f"/console/audit/exchange/{rid}/replay", {"model": "m"})
    assert status == 403
    tenant_admin = await browser_factory()
    await tenant_admin.sign_in(token(tenant="globex", sub="gadmin", scope="warden:admin"))
    csrf = await tenant_admin.csrf("/console/mode")
    status, text, _ = await tenant_admin.post(f"/console/audit/exchange/{rid}/replay", {"csrf": csrf})
    assert status == 404 and "not in your tenant" in text


async def test_replay_of_a_later_turn_sends_that_turns_request(cw: Any, fake: Any, token: Any, browser_factory: Any) -> None:
    from tests.fakeprovider import Reply
    from tests.proxy.console.conftest import BODY, app_client, fn

    # Turn 0: the model calls refund with invalid arguments; turn 1: the corrective turn, answered in text.
    fake.push(Reply(content=None, tool_calls=[{"id": "c1", "name": "refund", "arguments": '{"invoice_id": 7}'}]), Reply(content="Which amount?"))
    async with app_client(cw, token(groups=["billing"])) as client:
        raw = await client.chat.completions.with_raw_response.create(**BODY, tools=[fn("refund")])  # type: ignore[list-item]
    rid = raw.headers["x-request-id"]
    b = await browser_factory()
    await b.sign_in()
    status, text, _ = await b.get(f"/console/audit/exchange/{rid}")
    assert '<option value="0" selected>Turn 0 (first)</option><option value="1">Turn 1 (last)</option>' in text
    csrf = await b.csrf(f"/console/audit/exchange/{rid}")
    fake.push(Reply(content="How much should I refund?"))
    status, text, _ = await b.post(f"/console/audit/exchange/{rid}/replay", {"csrf": csrf, "turn": "1"})
    assert status == 200 and "Recorded, turn 1" in text and "Which amount?" in text
    assert "How much should I refund?" in text and '<option value="1" selected>' in text
    sent = fake.chat_requests()[-1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"] and sent[1]["tool_calls"][0]["id"] == "c1"
    (rec,) = await cw.warden.audit.search(kind="console.replay", limit=1)
    assert rec["data"]["turn"] == 1
    for bad in ("2", "-1", "1e3", "x", "999"):
        status, text, _ = await b.post(f"/console/audit/exchange/{rid}/replay", {"csrf": csrf, "turn": bad})
        assert status == 400 and "turn" in text
