"""An in-process eval target on the fake provider: retrieval with documents of two tenants, fenced tools, audit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llm_warden.proxy.eval.runner import InProcessTarget
from tests.conftest import ADMIN_TOKEN
from tests.fakeprovider import FakeProvider

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

DOCS: list[tuple[str, str, dict[str, Any]]] = [
    ("acme", "refunds", {"title": "Refund policy", "text": "# Refunds\n\nRefunds are accepted within 30 days of purchase.", "acl": {"public": True}}),
    ("acme", "salaries", {"title": "Salary bands", "text": "Salary bands for refunds staff are secret.", "acl": {"allow_groups": ["hr"]}}),
    ("globex", "globex-refunds", {"title": "Globex refunds", "text": "Globex refunds take 90 days.", "acl": {"public": True}}),
]

TOOLS = [
    {"name": "lookup_invoice", "effect": "read", "schema": {"type": "object", "required": ["invoice_id"], "additionalProperties": False, "properties": {"invoice_id": {"type": "string"}}}},
    {"name": "refund", "effect": "write", "schema": {"type": "object", "required": ["invoice_id"], "additionalProperties": False, "properties": {"invoice_id": {"type": "string"}}}},
]


def eval_config(fake: FakeProvider, tmp: Path, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "upstream": {"base_url": fake.base_url, "api_key_env": "WARDEN_TEST_PROVIDER_KEY", "max_retries": 0, "timeout_s": 10.0},
        "auth": {"mode": "jwt", "algorithms": ["RS256"], "issuer": "https://issuer.test", "audience": "warden-test", "public_key_file": "/nonexistent.pem"},
        "admin": {"token_env": "WARDEN_TEST_ADMIN_TOKEN"},
        "audit": {"enabled": True, "path": str(tmp / "audit.db"), "fsync": False},
        "logging": {"access_log": False},
        "plugins": {"enabled": ["headers", "retrieval", "tools"]},
        "retrieval": {"db": str(tmp / "r.db"), "index_dir": str(tmp / "r-index"), "embedding_model": "fake-embed", "sync_interval_s": 0.2},
        "policy": {"read_only": True, "state_db": str(tmp / "state.db")},
        "tools": TOOLS,
    }
    cfg.update(over)
    return cfg


DEV_SECRET_ENV = "WARDEN_EVAL_DEV_SECRET"


def dev_config(fake: FakeProvider, tmp: Path, tail: str) -> Path:
    """A config file whose [auth] takes dev HS256 tokens (secret in ``DEV_SECRET_ENV``); ``tail`` adds sections."""
    p = tmp / "warden.toml"
    p.write_text(f"""
[upstream]
base_url = "{fake.base_url}"
api_key_env = "WARDEN_TEST_PROVIDER_KEY"
max_retries = 0

[auth]
mode = "jwt"
algorithms = ["HS256"]
issuer = "https://issuer.test"
audience = "warden-test"
hs256_secret_env = "{DEV_SECRET_ENV}"

[admin]
token_env = "WARDEN_TEST_ADMIN_TOKEN"

[logging]
access_log = false
{tail}""")
    return p


async def put_docs(admin_url: str, docs: list[tuple[str, str, dict[str, Any]]]) -> None:
    async with aiohttp.ClientSession() as s:
        for tenant, doc_id, body in docs:
            async with s.put(f"{admin_url}/admin/documents/{tenant}/{doc_id}?wait=true", json=body, headers=ADMIN) as r:
                assert r.status in (200, 201), await r.text()


@pytest.fixture
async def target(fake: FakeProvider, tmp_path: Path) -> AsyncIterator[InProcessTarget]:
    t = await InProcessTarget.start(eval_config(fake, tmp_path), base_dir=tmp_path)
    await put_docs(t.running.admin_url, DOCS)
    yield t
    await t.close()
