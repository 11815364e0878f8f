"""Admin API of the limits plugin: ``GET /admin/limits`` — usage per rule.

Query parameters (all optional): ``tenant``, ``user`` (needs ``tenant``),
``rule`` (a rule id: its ``name`` or index) and ``top`` (keys per budget,
1-200, default 20).  For each configured rule that can apply to the tenant
(and user) asked about, each budget (requests, tokens) lists the keys in
scope with their usage, remaining units, and when the bucket is full again —
the busiest first.

Reading never changes a bucket: the memory backend reads its table, the Redis
backend runs ``TIME``, ``GET``/``MGET`` and a *bounded* ``SCAN`` (``MATCH``
on the rule's and tenant's key prefix, ``COUNT`` 1000, at most
``[limits] admin_scan_keys`` keys examined per budget); when the bound cuts
the walk short the budget says ``"complete": false``.  A key named exactly by
the query (a tenant's budget, a user's) is read directly, never scanned.

A tenant admin sees its own tenant only (``tenant`` defaults to it; another
is a 403), and never the rules whose ``match.tenants`` leave it out, nor the
keys of a ``model``-scoped budget, which every tenant shares.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import orjson
from aiohttp import web

from llm_warden.plugins.ratelimit.backends import BackendDown
from llm_warden.plugins.ratelimit.config import CompiledRule
from llm_warden.proxy.admin import admin_tenant
from llm_warden.proxy.errors import BadRequest, Forbidden, ServiceUnavailable
from llm_warden.proxy.gcra import Rate

if TYPE_CHECKING:
    from llm_warden.plugins.ratelimit.plugin import LimitsPlugin

RULE = "admin.limits"
PARAMS = frozenset({"tenant", "user", "rule", "top"})
MAX_TOP = 200
DEFAULT_TOP = 20
MAX_NAME = 256
SCOPE_FIELDS: dict[str, tuple[str, ...]] = {
    "tenant": ("tenant",),
    "user": ("tenant", "user"),
    "model": ("model",),
    "tenant+model": ("tenant", "model"),
    "user+model": ("tenant", "user", "model"),
}


def _q(value: str) -> str:
    return quote(value, safe="")


def _name(request: web.Request, param: str) -> str | None:
    value = request.query.get(param)
    if value is None or value == "":
        return None
    if len(value) > MAX_NAME or not value.isprintable():
        raise BadRequest(f"{param!r} must be printable text of at most {MAX_NAME} characters", param=param, rule=RULE)
    return value


def selector(scope: str, tenant: str | None, user: str | None) -> tuple[list[str], str | None]:
    """The scope keys to read for this query: ``(exact keys, prefix to scan or None)``."""
    t = _q(tenant) if tenant is not None else None
    u = _q(user) if user is not None else None
    if scope == "tenant":
        return ([t], None) if t is not None else ([], "")
    if scope == "user":
        if t is not None and u is not None:
            return [f"{t}:{u}"], None
        return [], f"{t}:" if t is not None else ""
    if scope == "user+model" and t is not None and u is not None:
        return [], f"{t}:{u}:"
    if scope in ("tenant+model", "user+model"):
        return [], f"{t}:" if t is not None else ""
    return [], ""


def decode_scope(scope: str, scope_key: str) -> dict[str, str] | None:
    """``{"tenant": ..., "user": ..., "model": ...}`` from a key's scope part, or ``None`` when it is not one."""
    fields = SCOPE_FIELDS[scope]
    parts = scope_key.split(":")
    if len(parts) != len(fields):
        return None
    return {f: unquote(p) for f, p in zip(fields, parts, strict=True)}


def key_usage(rate: Rate, tat_us: int, now_us: int, wall_now: float) -> dict[str, Any]:
    """One bucket's state from its TAT: units used, remaining, when it is full again, when one more unit fits."""
    used_us = max(0, tat_us - now_us)
    remaining = max(0, (rate.capacity_us - used_us) // rate.interval_us)
    reset_s = used_us / 1_000_000
    return {
        "used": math.ceil(used_us / rate.interval_us),
        "remaining": remaining,
        "exhausted": remaining == 0,
        "reset_s": round(reset_s, 3),
        "reset_at": round(wall_now + reset_s, 3),
        "retry_after_s": round(max(0, used_us + rate.interval_us - rate.capacity_us) / 1_000_000, 3),
    }


class LimitsAdmin:
    """Handlers bound to a running :class:`LimitsPlugin`."""

    def __init__(self, plugin: LimitsPlugin) -> None:
        self.plugin = plugin

    def routes(self) -> list[tuple[str, str, Any]]:
        return [("GET", "/admin/limits", self.usage)]

    async def usage(self, request: web.Request) -> web.StreamResponse:
        """Usage per rule for the keys in scope (see the module docstring)."""
        unknown = set(request.query) - PARAMS
        if unknown:
            raise BadRequest(f"unknown query parameter; accepted: {', '.join(sorted(PARAMS))}", rule=RULE)
        own = admin_tenant(request)
        tenant, user, rule_id = _name(request, "tenant"), _name(request, "user"), _name(request, "rule")
        if own is not None:
            if tenant is not None and tenant != own:
                raise Forbidden(f"this admin may manage tenant {own!r} only", param="tenant", rule="admin.tenant")
            tenant = own
        if user is not None and tenant is None:
            raise BadRequest("'user' needs 'tenant' (users are per tenant)", param="user", rule=RULE)
        top_text = request.query.get("top", str(DEFAULT_TOP))
        if not top_text.isdigit() or not 1 <= int(top_text) <= MAX_TOP:
            raise BadRequest(f"'top' must be an integer from 1 to {MAX_TOP}", param="top", rule=RULE)
        top = int(top_text)
        rules = [r for r in self.plugin.rules if rule_id is None or r.rule_id == rule_id]
        out: list[dict[str, Any]] = []
        try:
            for r in rules:
                if tenant is not None and r.tenants and tenant not in r.tenants:
                    continue
                if user is not None and r.subjects and user not in r.subjects:
                    continue
                out.append(await self._rule(r, tenant, user, own is not None, top))
        except BackendDown:
            raise ServiceUnavailable(
                "the rate limit backend is unreachable; retry later", rule="limits.backend", headers={"Retry-After": "1"}
            ) from None
        body = {"backend": self.plugin.section.backend, "tenant": tenant, "user": user, "top": top, "rules": out}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _rule(self, r: CompiledRule, tenant: str | None, user: str | None, tenant_admin: bool, top: int) -> dict[str, Any]:
        match: dict[str, list[str]] = {
            "tenants": sorted(r.tenants) if not tenant_admin else [t for t in r.tenants if t == tenant],
            "subjects": sorted(r.subjects),
            "groups": sorted(r.groups),
            "models": list(r.model_patterns),
        }
        budgets = []
        for kind, letter, rate in (("requests", "q", r.requests), ("tokens", "t", r.tokens)):
            if rate is None:
                continue
            budget: dict[str, Any] = {"kind": kind, "rate": str(rate), "limit": rate.count}
            if tenant_admin and r.scope == "model":
                budget.update(keys=[], complete=True, keys_found=0, hidden="shared by every tenant; an admin of every tenant sees it")
            else:
                budget.update(await self._budget(r, letter, rate, tenant, user, top))
            budgets.append(budget)
        return {"rule": r.rule_id, "index": r.index, "scope": r.scope, "match": match, "budgets": budgets}

    async def _budget(self, r: CompiledRule, letter: str, rate: Rate, tenant: str | None, user: str | None, top: int) -> dict[str, Any]:
        base = f"{self.plugin.section.key_prefix}lim:{r.rule_id}:{letter}:"
        exact, prefix = selector(r.scope, tenant, user)
        now_us, tats, complete = await self.plugin.backend.read(
            [base + k for k in exact], base + prefix if prefix is not None else None, self.plugin.section.admin_scan_keys
        )
        wall = time.time()
        rows: list[tuple[int, dict[str, Any]]] = []
        for name in exact:
            who = decode_scope(r.scope, name)
            if who is not None and base + name not in tats:
                rows.append((0, {**who, **key_usage(rate, 0, now_us, wall)}))  # named but idle: a full bucket
        for key, tat in tats.items():
            who = decode_scope(r.scope, key[len(base) :]) if key.startswith(base) else None
            if who is not None:
                rows.append((tat, {**who, **key_usage(rate, tat, now_us, wall)}))
        rows.sort(key=lambda row: row[0], reverse=True)
        return {"keys": [row for _, row in rows[:top]], "keys_found": len(rows), "complete": complete}
