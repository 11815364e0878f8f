"""Run cases through Warden itself: its whole pipeline, retrieval, tool fence and audit.

Two targets, one runner:

- :class:`InProcessTarget` (``warden eval run --config FILE``): starts a Warden
  from the config on loopback ports, as ``warden serve`` would, with two
  changes so the run can speak for each case's principal and read what Warden
  decided: the ``[auth]`` key is replaced by an ephemeral RS256 key pair the
  runner mints tokens with (issuer, audience and claim names stay), and when
  ``[audit]`` is disabled the run records to a temporary SQLite log.  Plugins,
  policy, retrieval store, provider and model are the config's.
- :class:`RemoteTarget` (``--url``): a Warden already running.  Tokens are
  minted with the config's dev HS256 secret (``[auth] hs256_secret_env``) or a
  private key (``--signing-key``); decisions are read from the config's audit
  store (or ``--audit-db``).

Each case is one ``POST /v1/chat/completions`` with the case's messages and
tools; the answer (text and relayed tool calls, streamed or not) comes from
the response, and Warden's decisions (citations, injected documents, tool
verdicts and their rules, the refusal's rule, usage) from the exchange's audit
record, found by the ``x-request-id`` Warden answered with.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import aiohttp
import jwt
import orjson

from llm_warden.proxy.config import Config, load_config
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.eval.cases import Case, CasePrincipal
from llm_warden.proxy.eval.checks import CheckResult, Outcome, score

RECORD_WAIT_S = 5.0
"""How long the runner waits for an exchange's record to be readable (``durability = "batch"`` commits in groups)."""


class Target(Protocol):
    """Where the cases go, and where their records are read."""

    base_url: str
    model_default: str | None

    def token_for(self, p: CasePrincipal) -> str: ...

    async def record(self, request_id: str, tenant: str) -> dict[str, Any] | None: ...

    async def close(self) -> None: ...


def claims_for(cfg: Config, p: CasePrincipal, ttl_s: int = 3600) -> dict[str, Any]:
    """The JWT claims Warden's ``[auth]`` maps back to ``p``."""
    a = cfg.auth
    now = int(time.time())
    return {
        "iss": a.issuer,
        "aud": a.audience,
        "iat": now,
        "exp": now + ttl_s,
        "jti": uuid.uuid4().hex,
        a.subject_claim: p.user,
        a.tenant_claim: p.tenant,
        a.groups_claim: list(p.groups),
        a.scopes_claim: " ".join(p.scopes),
    }


def _prepare(source: str | Path | dict[str, Any], base_dir: Path | None, classes: dict[str, Any]) -> tuple[Config, bytes, tempfile.TemporaryDirectory[str]]:
    """The config an in-process run serves (see the module docstring), the private key of its tokens, its temp dir."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if isinstance(source, dict):
        data = dict(source)
        root = base_dir or Path.cwd()
    else:
        path = Path(source)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("<file>", f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("<file>", f"{path} is not valid TOML: {e}") from None
        root = path.resolve().parent
    tmp = tempfile.TemporaryDirectory(prefix="warden-eval-")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub_path = Path(tmp.name) / "eval-jwt.pem"
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    auth = {k: v for k, v in dict(data.get("auth") or {}).items() if k not in ("jwks_url", "hs256_secret_env", "public_key_file", "mode", "algorithms")}
    auth.update({"mode": "jwt", "algorithms": ["RS256"], "public_key_file": str(pub_path)})
    auth.setdefault("issuer", "warden-eval")
    auth.setdefault("audience", "warden-eval")
    data["auth"] = auth
    audit = dict(data.get("audit") or {})
    if not audit.get("enabled", True):
        audit.update({"enabled": True, "backend": "sqlite", "path": str(Path(tmp.name) / "eval-audit.db"), "durability": "sync"})
        audit.pop("signing_key_file", None)
        audit.pop("signing_key_env", None)
    data["audit"] = audit
    server = dict(data.get("server") or {})
    server["use_uvloop"] = False
    data["server"] = server
    try:
        cfg = load_config(data, classes)
    except BaseException:
        tmp.cleanup()
        raise
    cfg.base_dir = root
    return cfg, priv, tmp


class InProcessTarget:
    """A Warden started in this process from a config (see the module docstring)."""

    def __init__(self, running: Any, cfg: Config, private_pem: bytes, tmp: tempfile.TemporaryDirectory[str]) -> None:
        self.running = running
        self.cfg = cfg
        self._key = private_pem
        self._tmp = tmp
        self.base_url: str = running.base_url
        self.model_default: str | None = None

    @classmethod
    async def start(cls, source: str | Path | dict[str, Any], base_dir: Path | None = None) -> InProcessTarget:
        """Start from a config file (or a parsed table, relative paths under ``base_dir``)."""
        from llm_warden.proxy.app import Warden
        from llm_warden.proxy.audit.factory import build_audit
        from llm_warden.proxy.plugin import available_plugins
        from llm_warden.proxy.testing import RunningWarden

        classes = available_plugins()
        cfg, priv, tmp = await asyncio.to_thread(_prepare, source, base_dir, classes)
        try:
            running = await RunningWarden.start(Warden(cfg, classes, audit=build_audit(cfg)))
        except BaseException:
            tmp.cleanup()
            raise
        return cls(running, cfg, priv, tmp)

    def token_for(self, p: CasePrincipal) -> str:
        return jwt.encode(claims_for(self.cfg, p), self._key, algorithm="RS256")

    async def record(self, request_id: str, tenant: str) -> dict[str, Any] | None:
        audit = self.running.warden.audit
        if audit is None:
            return None
        return await _poll(lambda: audit.find(request_id, tenant))

    async def close(self) -> None:
        try:
            await self.running.stop()
        finally:
            self._tmp.cleanup()


class RemoteTarget:
    """A running Warden at ``url``; tokens from the dev secret or a signing key, records from its audit store."""

    def __init__(self, url: str, cfg: Config, signing_key: bytes | None, reader: Any) -> None:
        self.base_url = url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.cfg = cfg
        self.model_default: str | None = None
        a = cfg.auth
        if a.mode != "jwt":
            raise ConfigError("auth.mode", "eval needs [auth] mode = \"jwt\" to speak for each case's principal")
        if signing_key is not None:
            self._key: str | bytes = signing_key
            self._alg = a.algorithms[0]
        elif a.hs256_secret_env:
            secret = os.environ.get(a.hs256_secret_env)
            if not secret:
                raise ConfigError("auth.hs256_secret_env", f"environment variable {a.hs256_secret_env} is not set")
            self._key, self._alg = secret, a.algorithms[0]
        else:
            raise ConfigError("auth", "give --signing-key PEM (the private key of [auth] public_key_file / the JWKS) or use hs256_secret_env")
        self.reader = reader

    @classmethod
    async def open(cls, url: str, config: str, signing_key: bytes | None, audit_db: str | None) -> RemoteTarget:
        """``signing_key``: the PEM of the private key whose public half Warden trusts (``None``: the dev HS256 secret)."""
        from llm_warden.proxy.audit.reader import PgTarget, open_reader

        cfg = load_config(config)
        key = signing_key
        target: Path | PgTarget
        if audit_db:
            target = PgTarget(audit_db) if audit_db.startswith(("postgresql://", "postgres://")) else Path(audit_db)
        elif cfg.audit.backend == "postgres":
            if not cfg.database.dsn:
                raise ConfigError("database.dsn_env", f"environment variable {cfg.database.dsn_env} is not set")
            target = PgTarget(cfg.database.dsn)
        else:
            target = Path(cfg.resolve_path(cfg.audit.path))
        try:
            reader = await open_reader(target) if cfg.audit.enabled or audit_db else None
        except (FileNotFoundError, ConnectionError) as e:
            raise ConfigError("audit", f"cannot read the audit store for the run's decisions: {e}") from None
        try:
            return cls(url, cfg, key, reader)
        except ConfigError:
            if reader is not None:
                await reader.close()
            raise

    def token_for(self, p: CasePrincipal) -> str:
        return jwt.encode(claims_for(self.cfg, p), self._key, algorithm=self._alg)

    async def record(self, request_id: str, tenant: str) -> dict[str, Any] | None:
        reader = self.reader
        if reader is None:
            return None
        return await _poll(lambda: reader.find(request_id, tenant))

    async def close(self) -> None:
        if self.reader is not None:
            await self.reader.close()


async def _poll(find: Callable[[], Any]) -> dict[str, Any] | None:
    deadline = time.monotonic() + RECORD_WAIT_S
    while True:
        rec: dict[str, Any] | None = await find()
        if rec is not None or time.monotonic() >= deadline:
            return rec
        await asyncio.sleep(0.05)


@dataclass(slots=True)
class CaseResult:
    case: Case
    outcome: Outcome
    checks: list[CheckResult]
    cost: float | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        n = len(self.checks)
        return {
            "id": self.case.id,
            "description": self.case.description,
            "tags": list(self.case.tags),
            "passed": self.passed,
            "score": round(sum(c.passed for c in self.checks) / n, 4) if n else 1.0,
            "checks": [c.as_dict() for c in self.checks],
            "outcome": self.outcome.as_dict(),
            "cost": self.cost,
        }


@dataclass(slots=True)
class RunOptions:
    model: str | None = None
    """Overrides every case's model (``--model``)."""
    concurrency: int = 4
    timeout_s: float = 120.0
    price_prompt_per_mtok: float | None = None
    price_completion_per_mtok: float | None = None
    progress: TextIO | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)


class Progress:
    """A one-line progress bar on a terminal (stderr); on anything else, nothing until the summary."""

    def __init__(self, total: int, out: TextIO | None) -> None:
        self.total = total
        self.out = out if out is not None and out.isatty() else None
        self.done = self.failed = 0

    def step(self, passed: bool) -> None:
        self.done += 1
        self.failed += not passed
        if self.out is None:
            return
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        self.out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}  failed {self.failed}")
        if self.done == self.total:
            self.out.write("\n")
        self.out.flush()


def request_body(case: Case, model: str | None) -> dict[str, Any]:
    """The chat request a case sends."""
    body: dict[str, Any] = dict(case.params)
    body["model"] = model or case.model or "default"
    body["messages"] = case.messages
    if case.tools is not None:
        body["tools"] = case.tools
    if case.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _read_stream(raw: bytes) -> tuple[str, list[dict[str, Any]], dict[str, Any] | None, dict[str, int] | None]:
    """(text, tool calls, error object, usage) of an OpenAI SSE answer."""
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    error: dict[str, Any] | None = None
    usage: dict[str, int] | None = None
    for line in raw.decode("utf-8", "replace").splitlines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if not payload or payload == "[DONE]":
            continue
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(chunk, dict):
            continue
        if isinstance(chunk.get("error"), dict):
            error = chunk["error"]
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            if isinstance(delta.get("content"), str):
                text.append(delta["content"])
            for tc in delta.get("tool_calls") or []:
                if not isinstance(tc, dict):
                    continue
                slot = calls.setdefault(int(tc.get("index", 0)), {"name": "", "arguments": ""})
                fn = tc.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
    return "".join(text), [calls[i] for i in sorted(calls)], error, usage


def _from_record(o: Outcome, rec: dict[str, Any]) -> None:
    o.audit = True
    o.tool_decisions = [{"name": c.get("name"), "decision": c.get("decision"), "rule": c.get("rule")} for c in rec.get("tool_calls") or []]
    o.cited = sorted({c["doc_id"] for c in rec.get("citations") or [] if c.get("valid") and c.get("doc_id")})
    o.invalid_citations = sum(1 for c in rec.get("citations") or [] if not c.get("valid"))
    o.injected = sorted({r["doc_id"] for r in rec.get("retrieved") or [] if r.get("injected") and r.get("doc_id")})
    if isinstance(rec.get("usage"), dict):
        o.usage = rec["usage"]
    if isinstance(rec.get("error"), dict):
        o.error = {k: rec["error"].get(k) for k in ("rule", "code", "type", "message")}
        status = rec["error"].get("status")
        if isinstance(status, int) and status >= 400:
            o.status = status  # a stream refused mid-way answered 200 first: the record has the refusal's status


async def run_case(session: aiohttp.ClientSession, target: Target, case: Case, opts: RunOptions) -> CaseResult:
    """Send one case, read its record, score it."""
    o = Outcome()
    headers = {"Authorization": f"Bearer {target.token_for(case.principal)}", "Content-Type": "application/json", **opts.extra_headers}
    body = request_body(case, opts.model or target.model_default)
    t0 = time.perf_counter()
    try:
        async with session.post(f"{target.base_url}/chat/completions", data=orjson.dumps(body), headers=headers) as resp:
            raw = await resp.read()
            o.status = resp.status
            o.request_id = resp.headers.get("x-request-id")
            ctype = resp.headers.get("Content-Type", "")
    except (aiohttp.ClientError, TimeoutError) as e:
        o.transport_error = f"{type(e).__name__}: {e}"
        return CaseResult(case, o, score(case, o))
    o.latency_ms = (time.perf_counter() - t0) * 1000
    if ctype.startswith("text/event-stream"):
        o.answer, o.relayed_calls, err, o.usage = _read_stream(raw)
        if err is not None:
            o.error = {k: err.get(k) for k in ("code", "type", "message")}
            o.status = max(o.status, 500 if o.status < 400 else o.status)
    else:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
            o.error = {k: doc["error"].get(k) for k in ("code", "type", "message")}
        elif isinstance(doc, dict):
            msg = ((doc.get("choices") or [{}])[0] or {}).get("message") or {}
            o.answer = msg.get("content") if isinstance(msg.get("content"), str) else None
            o.relayed_calls = [
                {"name": (c.get("function") or {}).get("name"), "arguments": (c.get("function") or {}).get("arguments")}
                for c in msg.get("tool_calls") or []
                if isinstance(c, dict)
            ]
            o.usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else None
    if o.request_id:
        rec = await target.record(o.request_id, case.principal.tenant)
        if rec is not None:
            _from_record(o, rec)
    cost = None
    if o.usage and opts.price_prompt_per_mtok is not None and opts.price_completion_per_mtok is not None:
        cost = (o.usage.get("prompt_tokens", 0) * opts.price_prompt_per_mtok + o.usage.get("completion_tokens", 0) * opts.price_completion_per_mtok) / 1e6
    return CaseResult(case, o, score(case, o), cost)


async def run_cases(target: Target, cases: list[Case], opts: RunOptions) -> list[CaseResult]:
    """Every case, at most ``opts.concurrency`` at once, in the order of the file."""
    sem = asyncio.Semaphore(max(1, opts.concurrency))
    progress = Progress(len(cases), opts.progress)
    timeout = aiohttp.ClientTimeout(total=opts.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(c: Case) -> CaseResult:
            async with sem:
                r = await run_case(session, target, c, opts)
            progress.step(r.passed)
            return r

        return list(await asyncio.gather(*(one(c) for c in cases)))
