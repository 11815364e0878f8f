"""A fleet of sidecars behaves as one system: three ``warden serve`` processes, one PostgreSQL, one Redis.

- a document ingested through replica 1's admin API is served, ACL-scoped, by replica 3 within the bound;
- a tool call held for approval on replica 2 is approved through replica 1's admin API, and passes on replica 2;
- replica 2 is SIGKILLed mid-load: every request that was answered has its record in PostgreSQL;
- ``warden audit verify`` passes over every replica's records, and catches an edited row.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llm_warden.proxy.audit.chain import seed_bytes
from llm_warden.proxy.db.migrate import registered_components
from tests import pg_helpers
from tests.conftest import ADMIN_TOKEN, AUDIENCE, ISSUER, Keys, make_token
from tests.fakeprovider import FakeProvider, Reply
from tests.proxy.test_serve import Proc, start_proc
from tests.redis_helpers import REDIS_URL

pg_admin = pg_helpers.pg_admin
pg_schema = pg_helpers.pg_schema
FRESHNESS_BOUND_S = 2.0
REFUND = {"type": "function", "function": {"name": "refund", "parameters": {"type": "object"}}}


def _free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def _config(tmp: Path, name: str, fake: FakeProvider, keys: Keys, port: int, aport: int, key_file: Path, prefix: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{aport}"
drain_s = 3.0

[upstream]
base_url = "{fake.base_url}"
api_key_env = "WARDEN_TEST_PROVIDER_KEY"
max_retries = 0

[auth]
algorithms = ["RS256"]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
public_key_file = "{keys.public_path}"

[admin]
token_env = "WARDEN_TEST_ADMIN_TOKEN"

[database]
dsn_env = "WARDEN_FLEET_DATABASE_URL"

[audit]
enabled = true
backend = "postgres"
durability = "sync"
signing_key_file = "{key_file}"

[logging]
access_log = false

[plugins]
enabled = ["limits", "retrieval", "tools", "headers"]

[limits]
backend = "redis"
redis_url = "{REDIS_URL}"
key_prefix = "{prefix}lim:"

[[limits.rules]]
scope = "tenant"
requests = "100000/minute"

[policy]
read_only = false
state_backend = "redis"
redis_url = "{REDIS_URL}"
redis_key_prefix = "{prefix}tools:"
mode_refresh_s = 0.2

[[tools]]
name = "refund"
effect = "write"
approval = "required"
schema = {{ type = "object", required = ["amount"], properties = {{ amount = {{ type = "number" }} }}, additionalProperties = false }}

[retrieval]
store = "postgres"
mode = "bm25"
embedder = "none"
index_dir = "{tmp / (name + '-index')}"
"""
    )
    return path


class Fleet:
    def __init__(self, replicas: list[Proc], dsn: str) -> None:
        self.replicas = replicas
        self.dsn = dsn


@pytest.fixture
async def fleet(tmp_path: Path, fake: FakeProvider, rsa_keys: Keys, pg_schema: str, redis_prefix: str) -> AsyncIterator[Fleet]:
    from llm_warden.proxy.db.migrate import migrate

    for component, directory in registered_components().items():
        await migrate(pg_schema, component, directory)
    key_file = tmp_path / "fleet.key"
    key_file.write_text(base64.b64encode(seed_bytes(Ed25519PrivateKey.generate())).decode())
    os.environ["WARDEN_FLEET_DATABASE_URL"] = pg_schema
    procs: list[Proc] = []
    try:
        for i in (1, 2, 3):
            port, aport = _free_port(), _free_port()
            procs.append(await start_proc(_config(tmp_path, f"r{i}", fake, rsa_keys, port, aport, key_file, redis_prefix), port, aport))
        yield Fleet(procs, pg_schema)
    finally:
        for p in procs:
            if p.proc.returncode is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            if p.proc.returncode is None:
                try:
                    await asyncio.wait_for(p.proc.wait(), 15)
                except TimeoutError:
                    p.proc.kill()
                    await p.proc.wait()


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def _chat(s: aiohttp.ClientSession, p: Proc, token: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
    async with s.post(f"{p.base}/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json(), r.headers.get("x-request-id", "")


async def test_a_fleet_of_three_replicas_behaves_as_one_system(fleet: Fleet, fake: FakeProvider, rsa_keys: Keys) -> None:
    r1, r2, r3 = fleet.replicas
    alice = make_token(rsa_keys, sub="alice", groups=["finance"])
    bob = make_token(rsa_keys, sub="bob", groups=["sales"])
    answered: list[str] = []
    async with aiohttp.ClientSession() as s:
        # 1. Ingest through replica 1; replica 3 serves it, scoped by the ACL, within the bound.
        doc = {"text": "The kayak rental budget for 2027 is 42,000 euros.", "title": "Budget", "acl": {"allow_groups": ["finance"]}}
        t0 = time.monotonic()
        async with s.put(f"{r1.admin}/admin/documents/acme/budget", json=doc, headers=ADMIN) as r:
            assert r.status == 201, await r.text()
        question = {"model": "m", "messages": [{"role": "user", "content": "What is the kayak rental budget?"}]}
        injected = False
        while time.monotonic() - t0 < FRESHNESS_BOUND_S + 3:
            fake.push(Reply(content="It is 42,000 euros [1]."))
            status, _, rid = await _chat(s, r3, alice, question)
            assert status == 200
            answered.append(rid)
            system = [m for m in fake.chat_requests()[-1].body["messages"] if m["role"] == "system"]
            if system and "42,000" in system[0]["content"]:
                injected = True
                break
            await asyncio.sleep(0.1)
        lag = time.monotonic() - t0
        assert injected and lag < FRESHNESS_BOUND_S + 1.0, f"replica 3 served the document after {lag:.2f} s"
        fake.push(Reply(content="I do not know."))
        status, _, rid = await _chat(s, r3, bob, question)
        answered.append(rid)
        system = [m for m in fake.chat_requests()[-1].body["messages"] if m["role"] == "system"]
        assert status == 200 and not any("42,000" in m["content"] for m in system), "bob's groups may not read it"

        # 2. Held for approval on replica 2, approved through replica 1, passes on replica 2.
        refund = {"model": "m", "messages": [{"role": "user", "content": "refund 30"}], "tools": [REFUND]}
        fake.push(Reply(tool_calls=[{"id": "c1", "name": "refund", "arguments": '{"amount": 30}'}]), Reply(content="Approval requested."))
        status, out, rid = await _chat(s, r2, alice, refund)
        answered.append(rid)
        assert status == 200 and not out["choices"][0]["message"].get("tool_calls"), "held, not relayed"
        async with s.get(f"{r1.admin}/admin/approvals?status=pending", headers=ADMIN) as r:
            pending = (await r.json())["data"]
        (held,) = [a for a in pending if a["tool"] == "refund"]
        async with s.post(f"{r1.admin}/admin/approvals/{held['id']}/approve", json={"comment": "ok"}, headers=ADMIN) as r:
            assert r.status == 200, await r.text()
        fake.push(Reply(tool_calls=[{"id": "c2", "name": "refund", "arguments": '{"amount": 30}'}]))
        status, out, rid = await _chat(s, r2, alice, refund)
        answered.append(rid)
        assert status == 200 and out["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "refund"

        # 3. Replica 2 SIGKILLed mid-load: every answered request has its record.
        simple = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

        async def load(p: Proc, n: int) -> None:
            for _ in range(n):
                try:
                    status, _, rid = await _chat(s, p, alice, simple)
                except aiohttp.ClientError:
                    continue
                if status == 200:
                    answered.append(rid)

        workers = [asyncio.create_task(load(p, 40)) for p in (r1, r2, r3) for _ in range(3)]
        await asyncio.sleep(0.3)
        r2.proc.send_signal(signal.SIGKILL)
        await r2.proc.wait()
        await asyncio.gather(*workers)
    assert len(answered) > 40
    conn = await asyncpg.connect(fleet.dsn)
    try:
        stored = {row["request_id"] for row in await conn.fetch("SELECT request_id FROM audit_records WHERE kind = 'exchange'")}
    finally:
        await conn.close()
    missing = [rid for rid in answered if rid not in stored]
    assert not missing, f"{len(missing)} answered requests have no record, e.g. {missing[:3]}"

    # 4. verify passes over every replica's records (replica 2's chain included); an edited row is caught.
    for p in (r1, r3):
        p.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(p.proc.wait(), 15)
    env = {**os.environ, "WARDEN_FLEET_DATABASE_URL": fleet.dsn}
    ok = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_warden.proxy", "audit", "verify", "--db", fleet.dsn, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    out = (await ok.communicate())[0].decode()
    assert ok.returncode == 0, out
    conn = await asyncpg.connect(fleet.dsn)
    try:
        await conn.execute("ALTER TABLE audit_records DISABLE TRIGGER USER")
        edited = await conn.execute(
            "UPDATE audit_records SET body = convert_to(replace(convert_from(body, 'UTF8'), 'kayak', 'canoe'), 'UTF8') "
            "WHERE (chain_id, seq) = (SELECT chain_id, seq FROM audit_records WHERE kind = 'exchange' "
            "AND convert_from(body, 'UTF8') LIKE '%kayak%' ORDER BY chain_id, seq LIMIT 1)"
        )
        assert edited == "UPDATE 1"
        await conn.execute("ALTER TABLE audit_records ENABLE TRIGGER USER")
    finally:
        await conn.close()
    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_warden.proxy", "audit", "verify", "--db", fleet.dsn, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    out = (await bad.communicate())[0].decode()
    assert bad.returncode != 0 and "FAULT" in out, out
    assert orjson.dumps(out)  # printable
