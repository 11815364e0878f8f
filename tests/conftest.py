"""Shared fixtures: RSA keys, tokens, the fake provider, a running Warden, the openai SDK."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from llm_warden.proxy.app import Warden
from llm_warden.proxy.config import Config, load_config
from llm_warden.proxy.plugin import available_plugins
from llm_warden.proxy.testing import RunningWarden
from tests.fakeprovider import FakeProvider
from tests.redis_helpers import REDIS_URL, RedisServer, redis_answers

PROVIDER_KEY = "sk-test-provider-key-0123456789abcdef"
ISSUER = "https://issuer.test"
AUDIENCE = "warden-test"
ADMIN_TOKEN = "admin-bootstrap-token-0123456789abcdef"
os.environ["WARDEN_TEST_PROVIDER_KEY"] = PROVIDER_KEY
os.environ["WARDEN_TEST_ADMIN_TOKEN"] = ADMIN_TOKEN


@pytest.fixture(scope="session", autouse=True)
def _session_redis() -> Any:
    """The tests use a real Redis at 127.0.0.1:6379.  When none answers and
    ``redis-server`` is installed, one is started for the session (no
    persistence) and stopped at the end; otherwise the Redis tests fail
    with a connection error that says so."""
    import shutil

    binary = shutil.which("redis-server")
    if redis_answers() or binary is None:
        yield None
        return
    srv = RedisServer(6379)
    srv.start(binary)
    yield srv
    srv.kill()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free port, for tests that kill and restart it."""
    srv = RedisServer()
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A unique key prefix on the shared test Redis; every key under it is deleted afterwards."""
    import uuid

    import redis.asyncio as aioredis

    prefix = f"wtest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    r = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


@dataclass
class Keys:
    private_pem: bytes
    public_pem: bytes
    public_path: Path


@pytest.fixture(scope="session")
def rsa_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path_factory.mktemp("keys") / "jwt-public.pem"
    path.write_bytes(pub)
    return Keys(priv, pub, path)


def make_token(keys: Keys, *, tenant: str = "acme", sub: str = "alice", groups: list[str] | None = None, scope: str = "", exp_in: int = 3600, **extra: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "tenant": tenant, "groups": groups or [], "scope": scope, "iat": now, "exp": now + exp_in}
    claims.update(extra)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, keys.private_pem, algorithm="RS256")


@pytest.fixture
def token(rsa_keys: Keys) -> Callable[..., str]:
    def _make(**kw: Any) -> str:
        return make_token(rsa_keys, **kw)

    return _make


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    fp = FakeProvider()
    await fp.start()
    yield fp
    await fp.stop()


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@pytest.fixture
def base_config(rsa_keys: Keys, fake: FakeProvider, tmp_path: Path) -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:18080", "admin_listen": "127.0.0.1:19090", "drain_s": 5.0},
        "upstream": {"base_url": fake.base_url, "api_key_env": "WARDEN_TEST_PROVIDER_KEY", "max_retries": 1, "retry_backoff_s": 0.01, "timeout_s": 5.0, "connect_timeout_s": 2.0},
        "auth": {"mode": "jwt", "algorithms": ["RS256"], "issuer": ISSUER, "audience": AUDIENCE, "public_key_file": str(rsa_keys.public_path)},
        "admin": {"token_env": "WARDEN_TEST_ADMIN_TOKEN"},
        "audit": {"enabled": False, "path": str(tmp_path / "audit.db")},
        "logging": {"access_log": False},
        "plugins": {"enabled": ["headers"]},
    }


WardenFactory = Callable[..., Awaitable[RunningWarden]]


@pytest.fixture
async def warden_factory(base_config: dict[str, Any], tmp_path: Path) -> AsyncIterator[WardenFactory]:
    started: list[RunningWarden] = []

    async def _start(overrides: dict[str, Any] | None = None, *, audit: Any = None, plugin_classes: dict[str, Any] | None = None, **kw: Any) -> RunningWarden:
        data = deep_merge(base_config, overrides or {})
        classes = {**available_plugins(), **(plugin_classes or {})}
        cfg: Config = load_config(data, classes)
        cfg.base_dir = tmp_path
        if audit is None and cfg.audit.enabled:
            from llm_warden.proxy.audit.factory import build_audit

            audit = build_audit(cfg)
        rw = await RunningWarden.start(Warden(cfg, classes, audit=audit), **kw)
        started.append(rw)
        return rw

    yield _start
    for rw in reversed(started):
        await rw.stop()


@pytest.fixture
async def warden(warden_factory: WardenFactory) -> RunningWarden:
    return await warden_factory()


@pytest.fixture
def client(warden: RunningWarden, token: Callable[..., str]) -> Any:
    import openai

    return openai.AsyncOpenAI(base_url=warden.base_url, api_key=token(), max_retries=0, timeout=10)
