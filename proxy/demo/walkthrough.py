"""``warden demo``: start Warden on a scripted provider and walk through what it does.

The demo runs offline and leaves nothing behind (unless ``--keep``):

1. a folder of its own (a temporary one) gets the config
   (:func:`proxy.demo.content.config_text`), dev secrets and the sample
   documents, ingested with ``warden ingest`` and their ACL flags;
2. the scripted provider (:mod:`proxy.demo.provider`) listens on a free
   loopback port of this process; Warden runs as a child process
   (``warden serve``) with its log in ``warden.log`` of the folder;
3. the walk-through sends real requests through Warden, printing each
   request and Warden's decision (from the response and the audit record),
   and checks each step's outcome (a line starting with ``✓``, or ``✗`` and
   exit code 1);
4. Warden keeps running for the user's own calls until Ctrl-C (or exits
   with ``--no-wait``), then stops cleanly: its audit log is sealed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import jwt
import orjson
from aiohttp import web

from llm_warden.proxy.audit.reader import AuditReader
from llm_warden.proxy.demo import content
from llm_warden.proxy.demo.content import ALICE, BOB, DAVE, Person
from llm_warden.proxy.demo.provider import LABEL, MODEL, DemoProvider
from llm_warden.proxy.demo.provider import log as demo_log
from llm_warden.proxy.logs import JSONFormatter

START_TIMEOUT_S = 60.0


class StepFailed(Exception):
    """A step's outcome was not the one the demo shows (a bug in Warden or in the demo)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    """One run of the demo in ``root`` (see the module docstring)."""

    def __init__(self, root: Path, out: TextIO, *, port: int, admin_port: int) -> None:
        self.root = root
        self.out = out
        self.port = port or free_port()
        self.admin_port = admin_port or free_port()
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.jwt_secret = secrets.token_hex(32)
        self.admin_token = secrets.token_urlsafe(32)
        self.provider = DemoProvider()
        self.proc: asyncio.subprocess.Process | None = None
        self.session: aiohttp.ClientSession | None = None
        self.failures = 0
        self.first_request_id = ""

    # -- output ---------------------------------------------------------------

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, n: int, title: str, why: str) -> None:
        self.say(f"\n── {n}. {title} " + "─" * max(3, 66 - len(title)))
        self.say(why)

    def ok(self, text: str) -> None:
        self.say(f"  ✓ {text}")

    def request(self, who: str, what: str) -> None:
        self.say(f"  → {who}: {what}")

    def answer(self, status: int, text: str) -> None:
        self.say(f"  ← {status}: {text}")

    # -- setup ----------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[content.JWT_SECRET_ENV] = self.jwt_secret
        env[content.ADMIN_TOKEN_ENV] = self.admin_token
        env.pop("WARDEN_CONFIG", None)
        return env

    def warden(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "llm_warden.proxy.cli", "--config", str(self.root / "warden.toml"), *args]

    async def cli(self, *args: str) -> tuple[int, str, str]:
        """Run ``warden --config <demo config> ARGS``; exit code, stdout, stderr."""
        proc = await asyncio.create_subprocess_exec(*self.warden(*args), env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    def token(self, who: Person) -> str:
        now = int(time.time())
        claims = {"iss": content.ISSUER, "aud": content.AUDIENCE, "iat": now, "exp": now + 8 * 3600, "sub": who.user,
                  "tenant": content.TENANT, "groups": list(who.groups), "scope": ""}
        return jwt.encode(claims, self.jwt_secret, algorithm="HS256")

    def check_ports(self) -> None:
        for port, flag in ((self.port, "--port"), (self.admin_port, "--admin-port")):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener will: a closed socket's TIME_WAIT is no conflict
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    raise StepFailed(f"127.0.0.1:{port} is in use (another Warden?): pass {flag} with another port, or 0 for any free one") from None

    async def start(self, provider_url: str) -> None:
        self.check_ports()
        cfg = self.root / "warden.toml"
        cfg.write_text(content.config_text(provider_url, f"127.0.0.1:{self.port}", f"127.0.0.1:{self.admin_port}"))
        self.say(f"demo folder   {self.root}")
        self.say(f"config        {cfg}")
        self.say(f"demo provider {provider_url}  (scripted: every answer starts with {LABEL!r})")
        self.say("\nSample documents, ingested with the ACL flags of `warden ingest`:")
        for folder, where in zip(content.FOLDERS, content.write_documents(self.root), strict=True):
            cmd = ["ingest", str(where), "--tenant", content.TENANT, *folder.acl_flags]
            self.say(f"  $ warden ingest docs/{folder.name} --tenant {content.TENANT} {' '.join(folder.acl_flags)}")
            rc, out, err = await self.cli(*cmd)
            if rc != 0:
                raise StepFailed(f"warden ingest failed: {err.strip()}")
            self.say("    " + out.strip().replace("\n", "\n    "))
        handler = logging.FileHandler(self.root / "warden.log", encoding="utf-8")  # appends, beside Warden's own lines
        handler.setFormatter(JSONFormatter())
        demo_log.addHandler(handler)
        demo_log.setLevel(logging.INFO)
        demo_log.propagate = False
        demo_log.info("warden demo: the upstream %s is the scripted demo provider, not a language model; every answer starts with %s", provider_url, LABEL)
        log = await asyncio.to_thread((self.root / "warden.log").open, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(*self.warden("serve"), env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        assert self.session is not None
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise StepFailed(f"warden serve exited with {self.proc.returncode}; see {self.root / 'warden.log'}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self.session.get(f"{self.admin}/readyz") as r:
                    if r.status == 200:
                        self.say(f"\nWarden is up: data plane {self.base}, admin plane {self.admin} (log: {self.root / 'warden.log'})")
                        return
            await asyncio.sleep(0.2)
        raise StepFailed(f"warden serve was not ready within {START_TIMEOUT_S:.0f} s; see {self.root / 'warden.log'}")

    async def stop(self) -> None:
        """SIGTERM Warden and wait for its clean stop (the audit log gets its shutdown checkpoint)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    # -- requests -------------------------------------------------------------

    async def chat(self, who: Person, text: str, *, tools: bool = False, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict[str, Any]]:
        body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
        if tools:
            body["tools"] = content.TOOLS
        h = {"Authorization": f"Bearer {self.token(who)}", **(headers or {})}
        assert self.session is not None
        async with self.session.post(f"{self.base}/chat/completions", json=body, headers=h) as r:
            data = await r.json(content_type=None)
            return r.status, {k.lower(): v for k, v in r.headers.items()}, data if isinstance(data, dict) else {}

    async def admin_call(self, method: str, path: str, body: object = None) -> Any:
        assert self.session is not None
        async with self.session.request(method, self.admin + path, json=body, headers={"Authorization": f"Bearer {self.admin_token}"}) as r:
            data = await r.json(content_type=None)
            if r.status >= 400:
                raise StepFailed(f"{method} {path}: {r.status} {data}")
            return data

    async def record(self, request_id: str) -> dict[str, Any]:
        reader = await AuditReader.open(self.root / "audit.db")
        try:
            rec = await reader.find(request_id)
        finally:
            await reader.close()
        if rec is None:
            raise StepFailed(f"no audit record for request {request_id}")
        return rec

    def decisions(self, rec: dict[str, Any]) -> list[tuple[str, str, str]]:
        """(tool, decision, rule) of every tool call Warden judged in a recorded exchange."""
        return [(str(c.get("name")), str(c.get("decision")), str(c.get("rule"))) for c in rec.get("tool_calls") or [] if isinstance(c, dict)]

    # -- the steps ------------------------------------------------------------

    async def grounded(self) -> dict[str, str]:
        self.step(1, "A grounded answer with citations",
                  "Warden searches the tenant's documents the caller may read, injects them as numbered,\n"
                  "untrusted context, and maps the model's [n] citations back to documents.")
        self.request(f"alice ({ALICE.about})", repr(content.QUESTION))
        status, headers, data = await self.chat(ALICE, content.QUESTION)
        text = _content(data)
        self.answer(status, text)
        cites = headers.get("x-warden-citations", "")
        self.say(f"    x-warden-citations: {cites or '(none)'}   x-request-id: {headers.get('x-request-id')}")
        if status != 200 or not text.startswith(LABEL) or "[1]" not in text or not cites:
            raise StepFailed("alice's answer is not a cited answer")
        self.first_request_id = headers.get("x-request-id", "")
        self.ok(f"alice got an answer grounded in the documents her ACL admits ({_count(cites)}), cited as {cites}")
        return headers

    async def two_users(self, alice_cites: str) -> None:
        self.step(2, "The same question, two users, different documents",
                  "ACLs are enforced inside the search: bob is in the group 'finance', alice is not.")
        self.request(f"bob ({BOB.about})", repr(content.QUESTION))
        status, headers, data = await self.chat(BOB, content.QUESTION)
        self.answer(status, _content(data))
        cites = headers.get("x-warden-citations", "")
        self.say(f"    x-warden-citations: {cites}")
        if status != 200 or _count(cites) <= _count(alice_cites):
            raise StepFailed("bob did not see more documents than alice")
        self.ok(f"bob was given {_count(cites)} documents ({cites}); alice {_count(alice_cites)} ({alice_cites})")

    async def read_only(self) -> None:
        self.step(3, "A write tool refused in read-only mode",
                  "Read-only mode is on (the default): Warden removes write tools from the request and refuses\n"
                  "any call of one. The scripted model calls `refund` anyway; Warden refuses it, tells the\n"
                  "model why in a corrective turn, and the application never sees the call.")
        self.request(f"bob ({BOB.about})", f"{content.REFUND!r} (the application offers the tools lookup_invoice and refund)")
        status, headers, data = await self.chat(BOB, content.REFUND, tools=True)
        self.answer(status, _content(data))
        rec = await self.record(headers.get("x-request-id", ""))
        verdicts = self.decisions(rec)
        for tool, verdict, rule in verdicts:
            self.say(f"    Warden's decision (audit record): {tool} → {verdict}, rule {rule}")
        calls = (data.get("choices") or [{}])[0].get("message", {}).get("tool_calls")
        if status != 200 or calls or not any(t == "refund" and v == "deny" for t, v, _ in verdicts):
            raise StepFailed("the refund was not refused")
        rule = next(r for t, v, r in verdicts if t == "refund")
        self.ok(f"refund refused by rule {rule}; upstream turns: {headers.get('x-warden-upstream-turns')}; no tool call reached the application")

    async def approval(self) -> None:
        self.step(4, "An approval held, then granted",
                  "The admin turns read-only mode off for tenant acme. A refund above 100 EUR needs a human\n"
                  "approval: Warden holds the call, bound to its exact arguments, until a reviewer decides.")
        self.request("admin", f"PUT {self.admin}/admin/mode {{\"read_only\": false, \"tenant\": \"{content.TENANT}\"}}   (= warden admin mode set --read-only off --tenant {content.TENANT})")
        mode = await self.admin_call("PUT", "/admin/mode", {"read_only": False, "tenant": content.TENANT})
        self.answer(200, f"tenants: {orjson.dumps(mode.get('tenants')).decode()}")
        self.request(f"bob ({BOB.about})", repr(content.REFUND))
        status, headers, data = await self.chat(BOB, content.REFUND, tools=True)
        self.answer(status, _content(data))
        for tool, verdict, rule in self.decisions(await self.record(headers.get("x-request-id", ""))):
            self.say(f"    Warden's decision (audit record): {tool} → {verdict}, rule {rule}")
        pending = await self.admin_call("GET", "/admin/approvals?status=pending")
        items = pending.get("data") or []
        if not items:
            raise StepFailed("no approval is pending")
        apr = items[0]
        self.request("admin", "GET /admin/approvals   (= warden admin approvals list)")
        self.answer(200, f"pending {apr['id']}: {apr['tool']} {orjson.dumps(apr['arguments']).decode()} for {apr['principal'].get('subject')}")
        self.request("admin", f"POST /admin/approvals/{apr['id']}/approve   (= warden admin approvals approve {apr['id']})")
        done = await self.admin_call("POST", f"/admin/approvals/{apr['id']}/approve", {"comment": "duplicate charge confirmed"})
        self.answer(200, f"{done['id']} {done['status']} by {done['reviewer'].get('subject')}")
        self.request(f"bob ({BOB.about})", f"{content.REFUND!r} (the same request again)")
        status, headers, data = await self.chat(BOB, content.REFUND, tools=True)
        calls = (data.get("choices") or [{}])[0].get("message", {}).get("tool_calls") or []
        shown = ", ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in calls)
        self.answer(status, f"tool call for the application to run: {shown or '(none)'}")
        if status != 200 or not calls or calls[0]["function"]["name"] != "refund":
            raise StepFailed("the approved call did not reach the application")
        self.ok(f"approval {apr['id']} held the call until it was granted; the identical call then passed (once)")

    async def idempotency(self) -> None:
        self.step(5, "A retried request answered from its Idempotency-Key",
                  "A client that retries (a timeout, a crash) sends the same Idempotency-Key: Warden replays\n"
                  "the recorded answer instead of calling the provider again.")
        key = {"Idempotency-Key": f"demo-{secrets.token_hex(4)}"}
        before = self.provider.calls
        self.request(f"alice ({ALICE.about})", f"{content.QUESTION!r} with Idempotency-Key: {key['Idempotency-Key']}")
        status1, _, data1 = await self.chat(ALICE, content.QUESTION, headers=key)
        self.answer(status1, _content(data1)[:90] + "...")
        self.request(f"alice ({ALICE.about})", "the same request again (a retry)")
        status2, headers2, data2 = await self.chat(ALICE, content.QUESTION, headers=key)
        replayed = headers2.get("x-warden-idempotent-replay")
        self.answer(status2, f"x-warden-idempotent-replay: {replayed}; same answer: {data1 == data2}")
        calls = self.provider.calls - before
        if status2 != 200 or replayed != "true" or data1 != data2 or calls != 1:
            raise StepFailed(f"the retry was not replayed (provider calls: {calls})")
        self.ok("the retry was answered from the recorded response; the provider was called once for both")

    async def rate_limit(self) -> None:
        self.step(6, "A rate limit",
                  f"dave is in the group 'trial': the rule 'trial-users' admits {content.TRIAL_LIMIT} requests a minute.")
        last: tuple[int, dict[str, str], dict[str, Any]] = (0, {}, {})
        for i in range(content.TRIAL_LIMIT + 1):
            last = await self.chat(DAVE, f"Hello ({i + 1})")
            status, headers, data = last
            note = f"x-ratelimit-remaining-requests: {headers.get('x-ratelimit-remaining-requests')}" if status == 200 else \
                f"Retry-After: {headers.get('retry-after')} s; {(data.get('error') or {}).get('message')}"
            self.request(f"dave ({DAVE.about})", f"request {i + 1}")
            self.answer(status, note)
        status, headers, data = last
        if status != 429 or not headers.get("retry-after") or "trial-users" not in str(data):
            raise StepFailed("dave's extra request was not refused by the rule trial-users")
        self.ok(f"request {content.TRIAL_LIMIT + 1} was refused: 429 with Retry-After, naming the rule")

    async def audit(self) -> None:
        self.step(7, "The audit log: verify it, and read the session",
                  "Every exchange above (refusals included) and every admin action is one hash-chained record.")
        for args in (["audit", "verify"], ["audit", "search", "--limit", "30"], ["audit", "show", self.first_request_id]):
            self.say(f"  $ warden --config {self.root / 'warden.toml'} {' '.join(args)}")
            rc, out, err = await self.cli(*args)
            self.say("    " + (out.strip() or err.strip()).replace("\n", "\n    "))
            if rc != 0:
                raise StepFailed(f"warden {' '.join(args)} exited with {rc}")
            if args[1] == "verify" and "OK:" not in out:
                raise StepFailed("audit verify did not report OK")
        self.ok("the audit log verifies (it is live: Warden is still writing it); the session is on record")

    async def walk(self) -> None:
        cites = (await self.grounded()).get("x-warden-citations", "")
        await self.two_users(cites)
        await self.read_only()
        await self.approval()
        await self.idempotency()
        await self.rate_limit()
        await self.audit()

    def invite(self) -> None:
        self.say("\n" + "═" * 72)
        self.say("Warden is running. Call it with any OpenAI SDK (the answers come from the scripted demo model):")
        self.say(f"  base URL  {self.base}")
        self.say(f"  token     {self.token(ALICE)}   (alice; valid 8 hours)")
        self.say(f"\n  from openai import OpenAI\n  client = OpenAI(base_url=\"{self.base}\", api_key=\"<token>\")")
        self.say(f"  client.chat.completions.create(model=\"{MODEL}\", messages=[{{\"role\": \"user\", \"content\": \"{content.QUESTION}\"}}])")
        beside = Path(sys.executable).with_name("warden")
        warden = str(beside) if beside.exists() else "warden"
        self.say("\nOperate it from another shell:")
        self.say(f"  export WARDEN_ADMIN_URL={self.admin} WARDEN_ADMIN_TOKEN={self.admin_token}")
        self.say(f"  {warden} admin approvals list --status all")
        self.say(f"  {warden} admin search 'meal allowance' --tenant {content.TENANT} --user bob --group finance")
        self.say(f"  {warden} --config {self.root / 'warden.toml'} audit search --limit 5")
        self.say("\nCtrl-C stops Warden cleanly (its audit log is sealed with a checkpoint).")


def _content(data: dict[str, Any]) -> str:
    if "error" in data:
        return f"error: {(data.get('error') or {}).get('message')}"
    choices = data.get("choices") or [{}]
    return str(choices[0].get("message", {}).get("content") or "")


def _count(cites: str) -> int:
    """Distinct documents in an ``x-warden-citations`` value (``1=doc-a,2=doc-b``)."""
    return len({c.partition("=")[2] for c in cites.split(",") if c.strip()})


async def _wait_for_interrupt() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def demo_folder(folder: str | None) -> Path:
    """The folder the demo works in: ``folder`` (created), or a new temporary one."""
    if folder is None:
        return Path(tempfile.mkdtemp(prefix="warden-demo-"))
    root = Path(folder).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


async def run_demo(root: Path, *, wait: bool, remove: bool, port: int, admin_port: int, out: TextIO = sys.stdout) -> int:
    """Run the demo in ``root`` (see the module docstring); 0 when every step showed what it should."""
    demo = Demo(root, out, port=port, admin_port=admin_port)
    runner = web.AppRunner(demo.provider.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, provider_port = runner.addresses[0][:2]
    provider_url = f"http://{host}:{provider_port}/v1"
    code = 0
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as demo.session:
            await demo.start(provider_url)
            try:
                await demo.walk()
            except StepFailed as e:
                demo.say(f"  ✗ {e}")
                code = 1
            if code == 0:
                demo.say("\nEvery step showed what it should.")
            if wait:
                demo.invite()
                await _wait_for_interrupt()
    except StepFailed as e:
        demo.say(f"✗ {e}")
        code = 1
    finally:
        await demo.stop()
        await runner.cleanup()
        for handler in list(demo_log.handlers):
            demo_log.removeHandler(handler)
            handler.close()
        if remove:
            await asyncio.to_thread(shutil.rmtree, root, True)
            demo.say("\nWarden stopped; the demo folder is removed (--keep or --folder keeps it).")
        else:
            demo.say(f"\nWarden stopped; the demo folder stays: {root}")
    return code
