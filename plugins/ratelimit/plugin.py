"""The ``limits`` plugin: budgets, safe retries and an upstream concurrency cap.

Per request, in ``on_request``:

1. ``Idempotency-Key``: replay a recorded answer (``ex.local_reply``), wait for
   an in-flight duplicate, refuse a reused key with another body (409), or
   claim the key for this request.
2. Budgets: every ``[[limits.rules]]`` entry matching the principal and model
   contributes its request and token buckets to ONE all-or-nothing decision
   (memory: ``MemoryGCRA.check_many``; Redis: one ``EVALSHA``).  A refusal is a
   429 naming the rule, with ``Retry-After``; answers carry ``x-ratelimit-*``.
   Token budgets reserve an estimate (prompt + completion allowance).
3. ``upstream_concurrency``: take a slot of the provider's semaphore.

In ``on_complete``: reconcile the token reservation with the reported usage,
record (or release) the idempotency claim, and free the upstream slot.

For metrics: ``backend_up``, ``decisions`` (``Counter[(rule label, decision)]``
with decisions ``allow``, ``deny``, ``fail_open``, ``fail_closed``),
``replays``, ``conflicts``, ``backend_errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

from llm_warden.plugins.ratelimit.admin import LimitsAdmin
from llm_warden.plugins.ratelimit.backends import BackendDown, Item, LimitBackend, MemoryBackend, RedisBackend, RedisClient
from llm_warden.plugins.ratelimit.config import CompiledRule, LimitsConfig, compile_rules
from llm_warden.plugins.ratelimit.idempotency import (
    IdempotencyStore,
    Recorded,
    RedisStore,
    SQLiteStore,
    Waiters,
    hash_body,
    hash_key,
    is_replayable_stream,
    record_headers,
    recordable,
    replay_reply,
    valid_key,
)
from llm_warden.plugins.ratelimit.tokens import TokenEstimator, load_encoder, reported_tokens
from llm_warden.proxy.errors import BadRequest, ConfigError, Conflict, RateLimited, ServiceUnavailable
from llm_warden.proxy.exchange import Exchange, StateKey
from llm_warden.proxy.gcra import LimitResult
from llm_warden.proxy.plugin import Plugin, PluginContext

log = logging.getLogger("warden.limits")

ANONYMOUS = "_anonymous"
IDEMPOTENCY_HEADER = "idempotency-key"
_RESTART_KEYS = ("backend", "redis_url", "key_prefix", "redis_max_connections", "idempotency_db")


@dataclass(slots=True)
class _State:
    """What one exchange holds until ``on_complete``."""

    token_items: list[Item] = field(default_factory=list)
    reserved: int = 0
    claim: tuple[str, str, str, str] | None = None  # tenant, key hash, body hash, owner
    slot: asyncio.Semaphore | None = None
    finished: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    """What the audit record gets (``audit_fields``): the decision, the idempotency outcome, the token reconciliation."""


STATE = StateKey("limits", _State)


def format_duration(seconds: float) -> str:
    """OpenAI-style reset duration: ``"20ms"``, ``"1.5s"``, ``"6m0s"``, ``"1h2m3s"``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    total = math.ceil(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m}m{s}s" if h else f"{m}m{s}s"


def _header(ex: Exchange, name: str) -> str | None:
    v = ex.request_headers.get(name)
    if v is not None:
        return v
    for k, val in ex.request_headers.items():
        if k.lower() == name:
            return val
    return None


def _tightest(results: list[LimitResult]) -> LimitResult:
    return min(results, key=lambda r: (r.remaining, -r.reset_s))


class LimitsPlugin(Plugin):
    """Request and token budgets per tenant/user/model, Idempotency-Key, upstream concurrency cap."""

    name = "limits"
    config_section = "limits"
    config_type = LimitsConfig

    section: LimitsConfig

    def __init__(self, section: LimitsConfig) -> None:
        super().__init__(section)
        self.rules: list[CompiledRule] = compile_rules(section.rules)
        self.backend: LimitBackend = MemoryBackend()
        self.redis: RedisClient | None = None
        self.idem: IdempotencyStore | None = None
        self.estimator = TokenEstimator(*load_encoder("approx", section.chars_per_token), section.default_max_tokens, section.image_tokens)
        self.waiters = Waiters()
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.replays = 0
        self.conflicts = 0
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._provider = "default"
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------

    async def start(self, ctx: PluginContext) -> None:
        """Open the backend (Redis pool or in-process), the idempotency store and the tokenizer."""
        s = self.section
        self._provider = ctx.config.upstream.provider_name
        if s.backend == "redis":
            self.redis = RedisClient(s.redis_url, s.redis_timeout_s, s.redis_max_connections, s.redis_retry_s, s.fail_open)
            self.backend = RedisBackend(self.redis)
            if s.idempotency:
                self.idem = RedisStore(self.redis, s.key_prefix)
            # Redis down at start is logged once by RedisHealth; requests follow fail_open until it is back.
            with contextlib.suppress(BackendDown):
                await self.redis.run(self.redis.redis.ping)
        else:
            self.backend = MemoryBackend()
            if s.idempotency:
                store = SQLiteStore(ctx.config.resolve_path(s.idempotency_db))
                await store.open()
                self.idem = store
                self._sweeper = asyncio.create_task(self._sweep_loop(store))
        await self._load_estimator(s)
        ctx.services["limits"] = self
        for method, path, handler in LimitsAdmin(self).routes():
            ctx.add_admin_route(method, path, handler)
        metrics = ctx.services.get("metrics")
        if metrics is not None:
            metrics.gauge("warden_limits_backend_up", "1 while the limits backend answers (always 1 for memory).", callback=lambda: 1.0 if self.backend_up else 0.0)
            metrics.counter(
                "warden_ratelimit_decisions",
                "Limit decisions by rule and decision (allow, deny, fail_open, fail_closed).",
                ("rule", "decision"),
                callback=lambda: dict(self.decisions),
            )

    async def _load_estimator(self, s: LimitsConfig) -> None:
        encoder, name = await asyncio.to_thread(load_encoder, s.tokenizer, s.chars_per_token)
        self.estimator = TokenEstimator(encoder, name, s.default_max_tokens, s.image_tokens)
        log.info("limits: %d rule(s), backend %s, token estimates by %s", len(self.rules), s.backend, name)

    async def _sweep_loop(self, store: SQLiteStore) -> None:
        period = min(60.0, max(1.0, self.section.idempotency_ttl_s / 10))
        while True:
            await asyncio.sleep(period)
            try:
                await store.sweep()
            except Exception as e:  # keep sweeping; the next pass retries
                log.warning("limits: idempotency sweep failed: %s", e)

    async def stop(self) -> None:
        """Close the stores; in-flight claims expire after ``idempotency_lock_s``."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
        if self.idem is not None:
            await self.idem.close()
        await self.backend.close()
        if self.redis is not None:
            await self.redis.close()

    async def reload(self, section: LimitsConfig, **extra_sections: Any) -> None:
        """Swap rules, estimates and caps live; backend changes need a restart."""
        for k in _RESTART_KEYS:
            if getattr(section, k) != getattr(self.section, k):
                raise ConfigError(f"limits.{k}", "changing it needs a restart")
        if (section.idempotency, section.backend) != (self.section.idempotency, self.section.backend) and section.idempotency:
            raise ConfigError("limits.idempotency", "turning it on needs a restart")
        rules = compile_rules(section.rules)
        if (section.tokenizer, section.chars_per_token, section.default_max_tokens, section.image_tokens) != (
            self.section.tokenizer,
            self.section.chars_per_token,
            self.section.default_max_tokens,
            self.section.image_tokens,
        ):
            await self._load_estimator(section)
        if section.upstream_concurrency != self.section.upstream_concurrency:
            self._slots = {}
        if self.redis is not None:
            self.redis.health.fail_open = section.fail_open
            self.redis.health.retry_s = section.redis_retry_s
        self.rules = rules
        self.section = section

    # -- metrics ---------------------------------------------------------

    @property
    def backend_up(self) -> bool:
        """False while the Redis backend is unreachable (always True for memory)."""
        return self.redis is None or self.redis.health.up

    @property
    def backend_errors(self) -> int:
        return 0 if self.redis is None else self.redis.health.errors

    # -- hooks -----------------------------------------------------------

    async def on_request(self, ex: Exchange) -> None:
        """Replay/claim the Idempotency-Key, decide all matching budgets at once, take an upstream slot."""
        st = ex.slots[STATE] = _State()
        try:
            s = self.section
            if s.idempotency and self.idem is not None:
                key = _header(ex, IDEMPOTENCY_HEADER)
                if key is not None and await self._idempotency(ex, st, key):
                    return
            if self.rules:
                await self._enforce(ex, st)
            if s.upstream_concurrency > 0:
                await self._take_slot(ex, st)
        except BaseException:
            await self._finish(ex, failed=True)
            raise

    def audit_fields(self, ex: Exchange) -> dict[str, Any] | None:
        """The limits decision, the idempotency outcome and the token reconciliation of this exchange."""
        st = ex.slots.get(STATE)
        return dict(st.record) if st is not None and st.record else None

    async def on_complete(self, ex: Exchange) -> None:
        """Reconcile tokens with reported usage, record or release the idempotency claim, free the slot."""
        try:
            await self._finish(ex, failed=False)
        except Exception:  # on_complete must not raise
            log.exception("limits: bookkeeping failed for request %s", ex.request_id)

    # -- idempotency -----------------------------------------------------

    async def _idempotency(self, ex: Exchange, st: _State, key: str) -> bool:
        """Claim the key, or replay/wait/refuse.  True when a replay was set."""
        assert self.idem is not None
        s = self.section
        rule = "limits.idempotency"
        if not valid_key(key):
            raise BadRequest("the Idempotency-Key header must be 1 to 255 printable ASCII characters", rule=rule, param="Idempotency-Key")
        tenant = ex.principal.tenant if ex.principal is not None else ANONYMOUS
        # Scoped to the caller, not only the tenant: a recorded answer can hold
        # context only that user may read, and a key is no credential.
        subject = ex.principal.subject if ex.principal is not None else ""
        kh, bh = hash_key(f"{subject}\x00{key}"), hash_body(ex.raw_body)
        owner = f"{ex.request_id}.{uuid.uuid4().hex[:12]}"
        deadline = time.monotonic() + s.idempotency_wait_s
        poll = 0.01
        waited = False
        while True:
            try:
                c = await self.idem.claim(tenant, kh, bh, owner, s.idempotency_lock_s)
            except BackendDown:
                if s.fail_open:
                    self.decisions[(rule, "fail_open")] += 1
                    st.record["idempotency"] = "skipped: backend down"
                    return False
                self.decisions[(rule, "fail_closed")] += 1
                raise ServiceUnavailable(
                    "the idempotency store is unreachable; retry later", rule=rule, headers={"Retry-After": "1"}
                ) from None
            if c.body_hash != bh:
                self.conflicts += 1
                raise Conflict("this Idempotency-Key was already used with a different request body", rule=rule, param="Idempotency-Key")
            if c.kind == "claimed":
                st.claim = (tenant, kh, bh, owner)
                st.record["idempotency"] = "first"
                return False
            if c.kind == "done" and c.record is not None:
                self.replays += 1
                opts = ex.body.get("stream_options") if isinstance(ex.body, dict) else None
                ex.local_reply = replay_reply(c.record, include_usage=isinstance(opts, dict) and opts.get("include_usage") is True)
                st.record["idempotency"] = "replay after wait" if waited else "replay"
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.conflicts += 1
                raise Conflict(
                    f"a request with this Idempotency-Key is still in progress after waiting {s.idempotency_wait_s:g} s; retry later",
                    rule=rule,
                    param="Idempotency-Key",
                    headers={"Retry-After": "1"},
                )
            waited = True
            await self.waiters.wait(tenant, kh, min(poll, remaining))
            poll = min(poll * 2, 0.25)

    async def _settle_claim(self, ex: Exchange, claim: tuple[str, str, str, str], failed: bool) -> None:
        assert self.idem is not None
        tenant, kh, bh, owner = claim
        s = self.section
        try:
            if not failed and recordable(ex.status, ex.error, ex.client_disconnected, ex.response_body):
                stream = is_replayable_stream(ex.stream, ex.status, ex.response_body)
                rec = Recorded(int(ex.status or 0), record_headers(ex.response_headers, stream), ex.response_body, stream)
                size = len(orjson.dumps(rec.body))
                if size <= s.idempotency_max_bytes:
                    await self.idem.complete(tenant, kh, owner, bh, rec, s.idempotency_ttl_s)
                    return
                log.warning("limits: answer of %s is %d bytes, over idempotency_max_bytes; not recorded", ex.request_id, size)
            await self.idem.release(tenant, kh, owner, bh)
        except BackendDown:
            log.warning(
                "limits: could not settle the Idempotency-Key of %s (store down); it expires in %g s", ex.request_id, s.idempotency_lock_s
            )
        finally:
            self.waiters.wake(tenant, kh)

    # -- budgets ---------------------------------------------------------

    def _scope_key(self, rule: CompiledRule, tenant: str, subject: str, model: str) -> str:
        scope = rule.scope
        if scope == "tenant":
            return quote(tenant, safe="")
        if scope == "user":
            return f"{quote(tenant, safe='')}:{quote(subject, safe='')}"
        if scope == "model":
            return quote(model, safe="")
        if scope == "tenant+model":
            return f"{quote(tenant, safe='')}:{quote(model, safe='')}"
        return f"{quote(tenant, safe='')}:{quote(subject, safe='')}:{quote(model, safe='')}"

    async def _enforce(self, ex: Exchange, st: _State) -> None:
        p = ex.principal
        tenant, subject, groups = (p.tenant, p.subject, p.groups) if p is not None else (ANONYMOUS, ANONYMOUS, frozenset[str]())
        model = ex.model or (ex.body.get("model") if isinstance(ex.body, dict) and isinstance(ex.body.get("model"), str) else "") or ""
        matched = [r for r in self.rules if r.matches(tenant, subject, groups, model)]
        if not matched:
            return
        tokens = await self.estimator.estimate(ex.body) if any(r.tokens is not None for r in matched) else 0
        prefix = self.section.key_prefix
        items: list[Item] = []
        labels: list[str] = []
        kinds: list[str] = []
        for r in matched:
            sk = self._scope_key(r, tenant, subject, model)
            if r.requests is not None:
                items.append((f"{prefix}lim:{r.rule_id}:q:{sk}", r.requests, 1))
                labels.append(r.label_requests)
                kinds.append("requests")
            if r.tokens is not None:
                items.append((f"{prefix}lim:{r.rule_id}:t:{sk}", r.tokens, tokens))
                labels.append(r.label_tokens)
                kinds.append("tokens")
        try:
            results = await self.backend.check_many(items)
        except BackendDown:
            if self.section.fail_open:
                self.decisions[("limits.backend", "fail_open")] += 1
                st.record["decision"] = {"rules": labels, "decision": "fail_open"}
                return
            self.decisions[("limits.backend", "fail_closed")] += 1
            raise ServiceUnavailable(
                "the rate limit backend is unreachable; retry later", rule="limits.backend", headers={"Retry-After": "1"}
            ) from None
        headers = self._headers(results, kinds) if self.section.headers else {}
        denied = [i for i, r in enumerate(results) if not r.allowed]
        if denied:
            for i in denied:
                self.decisions[(labels[i], "deny")] += 1
            worst = max(denied, key=lambda i: results[i].retry_after_s)
            res, label = results[worst], labels[worst]
            if math.isinf(res.retry_after_s):
                rate = items[worst][1]
                retry = math.ceil(rate.period_s)
                msg = f"this request needs up to {tokens} tokens, more than {label} allows at once; lower max_tokens or the prompt"
            else:
                retry = max(1, math.ceil(res.retry_after_s))
                msg = f"rate limit exceeded by {label}; retry after {retry} s"
            st.record["decision"] = {"rules": labels, "decision": "deny", "rule": label, "tokens_estimated": tokens}
            ex.response_headers.update(headers)
            raise RateLimited(msg, rule=label, headers={**headers, "Retry-After": str(retry)})
        for label in labels:
            self.decisions[(label, "allow")] += 1
        ex.response_headers.update(headers)
        st.token_items = [it for it, kind in zip(items, kinds, strict=True) if kind == "tokens"]
        st.reserved = tokens if st.token_items else 0
        st.record["decision"] = {"rules": labels, "decision": "allow", "tokens_reserved": st.reserved}

    @staticmethod
    def _headers(results: list[LimitResult], kinds: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for kind in ("requests", "tokens"):
            rs = [r for r, k in zip(results, kinds, strict=True) if k == kind]
            if rs:
                t = _tightest(rs)
                out[f"x-ratelimit-limit-{kind}"] = str(t.limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(t.remaining)
                out[f"x-ratelimit-reset-{kind}"] = format_duration(t.reset_s)
        return out

    async def _reconcile(self, ex: Exchange, st: _State) -> None:
        actual = reported_tokens(ex.usage.as_dict() if ex.usage is not None else None)
        if actual is not None:
            delta = actual - st.reserved
        elif not ex.turns:
            delta = -st.reserved  # never reached the provider
        else:
            return  # provider called but no usage reported: keep the reservation
        st.record["tokens_reconciled"] = {"reserved": st.reserved, "actual": actual}
        if delta:
            try:
                await self.backend.adjust([(k, rate, delta) for k, rate, _ in st.token_items])
            except BackendDown:
                log.debug("limits: token reconciliation of %s skipped: backend down", ex.request_id)

    # -- upstream concurrency -------------------------------------------

    async def _take_slot(self, ex: Exchange, st: _State) -> None:
        provider = self._provider
        sem = self._slots.get(provider)
        if sem is None:
            sem = self._slots[provider] = asyncio.Semaphore(self.section.upstream_concurrency)
        if sem.locked():
            try:
                async with asyncio.timeout(self.section.upstream_queue_s):
                    await sem.acquire()
            except TimeoutError:
                rule = "limits.upstream_concurrency"
                self.decisions[(rule, "deny")] += 1
                raise RateLimited(
                    f"all {self.section.upstream_concurrency} upstream slots for {provider} stayed busy for {self.section.upstream_queue_s:g} s",
                    rule=rule,
                    headers={"Retry-After": "1"},
                ) from None
        else:
            await sem.acquire()
        st.slot = sem

    # -- end of exchange -------------------------------------------------

    async def _finish(self, ex: Exchange, failed: bool) -> None:
        st = ex.slots.get(STATE)
        if st is None or st.finished:
            return
        st.finished = True
        if st.slot is not None:
            st.slot.release()
            st.slot = None
        try:
            if st.token_items:
                await self._reconcile(ex, st)
        finally:
            if st.claim is not None and self.idem is not None:
                await self._settle_claim(ex, st.claim, failed)

    # -- API for other plugins (tool rate limits) ------------------------

    async def check_keys(self, items: list[Item], rule: str) -> list[LimitResult] | None:
        """Decide ``items`` (keys are prefixed here) on the configured backend, all or nothing.

        Returns ``None`` when the backend is down and ``fail_open`` is set;
        raises :class:`~proxy.errors.ServiceUnavailable` when it is down and
        fail-closed.
        """
        prefix = self.section.key_prefix
        try:
            return await self.backend.check_many([(f"{prefix}{k}", rate, cost) for k, rate, cost in items])
        except BackendDown:
            if self.section.fail_open:
                self.decisions[(rule, "fail_open")] += 1
                return None
            self.decisions[(rule, "fail_closed")] += 1
            raise ServiceUnavailable(
                "the rate limit backend is unreachable; retry later", rule=rule, headers={"Retry-After": "1"}
            ) from None
