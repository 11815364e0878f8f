"""The console in a real headless browser (Debian's chromium, driven by Selenium) against a real Warden.

Selenium is synchronous: every browser step runs in a worker thread
(``asyncio.to_thread``) so the Warden serving it keeps its event loop.  No
driver or browser is downloaded: the driver path is given, so Selenium
Manager never runs.  With ``WARDEN_CONSOLE_SCREENSHOTS=<folder>`` the run
saves a PNG of each page there (docs/console/ holds the committed ones).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import ADMIN_TOKEN
from tests.fakeprovider import Reply
from tests.proxy.console.conftest import BODY, app_client, exhaust, fn, hold_refund

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = os.environ.get("WARDEN_CONSOLE_SCREENSHOTS")
T = TypeVar("T")

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()) and not os.environ.get("CI"):
    pytest.skip(
        "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)", allow_module_level=True
    )

os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver or a browser

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    profile = tempfile.mkdtemp(prefix="warden-console-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900",
    ):  # fmt: skip
        opts.add_argument(flag)
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    d.implicitly_wait(0)
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


async def run(fn_: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn_, *args)


class Page:
    """Browser steps (synchronous; call them through :func:`run`)."""

    def __init__(self, d: WebDriver, base: str) -> None:
        self.d = d
        self.base = base

    def open(self, path: str) -> str:
        self.d.get(self.base + path)
        return self.d.page_source

    def wait_text(self, text: str, timeout: float = 10) -> None:
        WebDriverWait(self.d, timeout, ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)).until(
            lambda d: text in d.find_element(By.TAG_NAME, "body").text
        )

    def sign_in(self, credential: str) -> str:
        self.d.delete_all_cookies()
        self.open("/console/login")
        field = self.d.find_element(By.ID, "token")
        field.send_keys(credential)
        self.d.find_element(By.CSS_SELECTOR, "form.signin button[type=submit]").click()
        WebDriverWait(self.d, 10).until(lambda d: "/console/login" not in d.current_url or 'role="alert"' in d.page_source)
        return self.d.current_url

    def decide(self, verb: str, reason: str) -> None:
        card = self.d.find_element(By.CSS_SELECTOR, "[data-approval]")
        form = card.find_element(By.CSS_SELECTOR, f"form[action$='/{verb}']")
        form.find_element(By.NAME, "comment").send_keys(reason)
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    def shot(self, name: str, width: int = 1280) -> None:
        if not SHOTS:
            return
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        self.d.set_window_size(width, 900)
        height = self.d.execute_script("return document.documentElement.scrollHeight")
        self.d.set_window_size(width, min(int(height) + 40, 2400))
        time.sleep(0.2)
        self.d.save_screenshot(str(Path(SHOTS) / f"{name}.png"))
        self.d.set_window_size(1280, 900)


@pytest.fixture
def page(driver: WebDriver, cw: Any) -> Page:
    return Page(driver, cw.admin_url)


async def test_sign_in_approve_and_the_waiting_request_completes(page: Page, cw: Any, fake: Any, token: Any) -> None:
    tok = token(groups=["billing"])
    rid = await hold_refund(cw, fake, tok)
    await run(page.open, "/console/login")
    await run(page.shot, "sign-in")
    url = await run(page.sign_in, ADMIN_TOKEN)
    assert url.endswith("/console/approvals")
    await run(page.wait_text, "please refund inv_1")
    await run(page.shot, "approvals")
    await run(page.shot, "approvals-phone", 390)
    await run(page.decide, "approve", "customer verified by phone")
    await run(page.wait_text, "Approved apr_")
    # The application sends the conversation again: the identical call now passes.
    fake.push(Reply(content=None, tool_calls=[{"id": "c2", "name": "refund", "arguments": '{"invoice_id": "inv_1", "amount": 500}'}]))
    async with app_client(cw, tok) as client:
        raw = await client.chat.completions.with_raw_response.create(**BODY, tools=[fn("refund")])  # type: ignore[list-item]
    assert raw.headers["x-warden-tool-decisions"].startswith("refund=allowed:apr_")
    assert [c.id for c in raw.parse().choices[0].message.tool_calls or []] == ["c2"]
    done = raw.headers["x-request-id"]
    await run(page.open, "/console/approvals")
    await run(page.wait_text, done)  # the inbox shows which request used the approval
    body = await run(lambda: page.d.find_element(By.TAG_NAME, "body").text)
    assert "consumed" in body and "customer verified by phone" in body and rid
    (rec,) = await cw.warden.audit.search(kind="tools.approval.approve", limit=1)
    assert rec["actor"]["subject"] == "bootstrap-admin" and rec["data"]["comment"] == "customer verified by phone"


async def test_deny_and_a_decision_made_elsewhere_shows_live(page: Page, cw: Any, fake: Any, token: Any) -> None:
    import aiohttp

    tok = token(groups=["billing"])
    await hold_refund(cw, fake, tok)
    await run(page.sign_in, ADMIN_TOKEN)
    await run(page.wait_text, "please refund inv_1")
    aid = await run(lambda: page.d.find_element(By.CSS_SELECTOR, "[data-approval]").get_attribute("data-approval"))
    # Another approver decides it through the admin API while this page is open.
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{cw.admin_url}/admin/approvals/{aid}/approve",
            json={"comment": "me first"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as r:
            assert r.status == 200
    await run(page.wait_text, "Decided elsewhere")
    disabled = await run(lambda: [b.get_attribute("disabled") for b in page.d.find_elements(By.CSS_SELECTOR, "[data-approval] button")])
    assert disabled and all(d is not None for d in disabled)
    # A second held call, denied from the browser with a reason.
    await hold_refund(cw, fake, tok, '{"invoice_id": "inv_2", "amount": 900}')
    await run(page.open, "/console/approvals")
    await run(page.wait_text, "inv_2")
    await run(page.decide, "deny", "amount too high")
    await run(page.wait_text, "Denied apr_")
    fake.push(
        Reply(content=None, tool_calls=[{"id": "c3", "name": "refund", "arguments": '{"invoice_id": "inv_2", "amount": 900}'}]),
        Reply(content="It was denied."),
    )
    async with app_client(cw, tok) as client:
        raw = await client.chat.completions.with_raw_response.create(**BODY, tools=[fn("refund")])  # type: ignore[list-item]
    assert "refund=denied" in raw.headers["x-warden-tool-decisions"]
    assert "amount too high" in fake.chat_requests()[-1].body["messages"][-1]["content"]


async def test_flip_read_only_and_a_write_tool_is_refused(page: Page, cw: Any, fake: Any, token: Any) -> None:
    await run(page.sign_in, ADMIN_TOKEN)
    await run(page.open, "/console/mode")
    await run(lambda: page.d.find_element(By.CSS_SELECTOR, "form[aria-label='Global read-only mode'] button[value=on]").click())
    await run(page.wait_text, "Read-only mode for every tenant: on")
    await run(page.shot, "read-only")
    fake.push(Reply(content=None, tool_calls=[{"id": "c4", "name": "note", "arguments": "{}"}]), Reply(content="I cannot write now."))
    async with app_client(cw, token()) as client:
        raw = await client.chat.completions.with_raw_response.create(**BODY, tools=[fn("note")])  # type: ignore[list-item]
    assert raw.parse().choices[0].message.content == "I cannot write now."
    assert "tools" not in fake.chat_requests()[0].body  # the write tool was withheld from the model
    assert "note=denied" in raw.headers["x-warden-tool-decisions"]
    body = await run(lambda: page.d.find_element(By.TAG_NAME, "body").text)
    assert "bootstrap-admin@*" in body


async def test_find_an_exchange_by_request_id_and_open_it(page: Page, cw: Any, fake: Any, token: Any) -> None:
    rid = await hold_refund(cw, fake, token(groups=["billing"]))
    await hold_refund(cw, fake, token(groups=["billing"]), '{"invoice_id": "inv_3", "amount": 300}')
    await run(page.sign_in, ADMIN_TOKEN)
    await run(page.open, "/console/audit")
    await run(page.shot, "audit")
    await run(lambda: page.d.find_element(By.ID, "f-request_id").send_keys(rid))
    await run(lambda: page.d.find_element(By.CSS_SELECTOR, "form.search button[type=submit]").click())
    await run(page.wait_text, "records read in")
    links = await run(lambda: [a.text for a in page.d.find_elements(By.CSS_SELECTOR, "tbody a")])
    assert links == [rid]
    await run(lambda: page.d.find_element(By.LINK_TEXT, rid).click())
    await run(page.wait_text, f"Exchange {rid}")
    body = await run(lambda: page.d.find_element(By.TAG_NAME, "body").text)
    assert "Tool calls" in body and "hold" in body and "please refund inv_1" in body
    await run(page.shot, "exchange")


async def test_a_tenant_admin_cannot_see_another_tenant(page: Page, cw: Any, fake: Any, token: Any) -> None:
    acme = await hold_refund(cw, fake, token(groups=["billing"]))
    await hold_refund(cw, fake, token(tenant="globex", sub="gina"), '{"invoice_id": "inv_g", "amount": 700}')
    await run(page.sign_in, token(tenant="globex", sub="gadmin", scope="warden:admin"))
    await run(page.wait_text, "gina@globex")
    body = await run(lambda: page.d.find_element(By.TAG_NAME, "body").text)
    assert "alice@acme" not in body and "tenant globex" in body
    await run(page.open, "/console/audit")
    body = await run(lambda: page.d.find_element(By.TAG_NAME, "body").text)
    assert acme not in body
    await run(page.open, f"/console/audit/exchange/{acme}")
    body = await run(lambda: page.d.find_element(By.TAG_NAME, "body").text)
    assert "not in your tenant" in body


async def test_a_session_that_expires_sends_the_operator_to_sign_in(page: Page, cw: Any) -> None:
    from llm_warden.proxy.console import CONSOLE_KEY

    sessions = cw.admin.runner.app[CONSOLE_KEY].sessions
    clock = [time.time()]
    sessions.clock = lambda: clock[0]
    await run(page.sign_in, ADMIN_TOKEN)
    await run(page.open, "/console/mode")
    clock[0] += sessions.ttl_s + 1
    await run(page.open, "/console/approvals")
    await run(page.wait_text, "Your session has expired")
    assert (await run(lambda: page.d.current_url)).endswith("/console/login?expired=1")


async def test_keyboard_only_sign_in_and_approve(page: Page, cw: Any, fake: Any, token: Any) -> None:
    from selenium.webdriver.common.keys import Keys

    await hold_refund(cw, fake, token(groups=["billing"]))

    def by_keyboard() -> str:
        page.d.delete_all_cookies()
        page.open("/console/login")
        active = page.d.switch_to.active_element
        for _ in range(10):  # skip link, then the token field
            active.send_keys(Keys.TAB)
            active = page.d.switch_to.active_element
            if active.get_attribute("id") == "token":
                break
        active.send_keys(ADMIN_TOKEN + Keys.ENTER)
        page.wait_text("please refund inv_1")
        for _ in range(30):  # through the navigation and links to the first reason field (the approve form)
            page.d.switch_to.active_element.send_keys(Keys.TAB)
            if page.d.switch_to.active_element.get_attribute("name") == "comment":
                break
        page.d.switch_to.active_element.send_keys("ok by keyboard" + Keys.ENTER)
        page.wait_text("Approved apr_")
        return str(page.d.find_element(By.TAG_NAME, "body").text)

    assert "Approved apr_" in await run(by_keyboard)
    (rec,) = await cw.warden.audit.search(kind="tools.approval.approve", limit=1)
    assert rec["data"]["comment"] == "ok by keyboard"


async def test_retrieval_what_would_this_principal_get(driver: WebDriver, retrieval_warden: Any) -> None:
    rw = retrieval_warden
    p = Page(driver, rw.admin_url)
    await run(p.sign_in, ADMIN_TOKEN)
    await run(p.open, "/console/retrieval?tenant=acme")

    def ask() -> str:
        for name, value in (("s-user", "ann"), ("s-groups", "staff"), ("s-query", "how many vacation days")):
            p.d.find_element(By.ID, name).send_keys(value)
        p.d.find_element(By.CSS_SELECTOR, "form[action='/console/retrieval/search'] button[type=submit]").click()
        p.wait_text("Injected for ann@acme")
        return str(p.d.find_element(By.TAG_NAME, "body").text)

    body = await run(ask)
    assert "hr/vacation.md" in body and "hr/salaries.md" in body and "salary bands" not in body
    await run(p.shot, "retrieval")


async def test_limits_a_user_who_hit_the_limit_shows_as_exhausted_with_the_reset_time(
    driver: WebDriver, limits_warden: Any, token: Any
) -> None:
    rw = limits_warden
    await exhaust(rw, token(sub="alice"))
    await exhaust(rw, token(sub="bob"))
    async with app_client(rw, token(sub="carol")) as client:
        await client.chat.completions.create(**BODY)
    p = Page(driver, rw.admin_url)
    await run(p.sign_in, ADMIN_TOKEN)
    await run(p.open, "/console/approvals")

    def open_limits_and_filter() -> tuple[list[str], str]:
        p.d.find_element(By.LINK_TEXT, "Limits").click()
        p.wait_text("Rule per-user: per user")
        p.d.find_element(By.ID, "l-tenant").send_keys("acme")
        p.d.find_element(By.CSS_SELECTOR, "form[action='/console/limits'] button[type=submit]").click()
        p.wait_text("Backend memory")
        card = p.d.find_element(By.CSS_SELECTOR, "[data-rule='per-user']")
        rows = [r.text for r in card.find_elements(By.CSS_SELECTOR, "tr.exhausted")]
        return rows, str(card.text)

    rows, card = await run(open_limits_and_filter)
    assert len(rows) == 2 and all("exhausted" in r and "2 / 2" in r and "UTC (in" in r for r in rows)
    assert {r.split()[1] for r in rows} == {"alice", "bob"}
    assert "carol 1 / 2 1 ok" in card
    await run(p.shot, "limits")
