"""Through the real server and the fake provider, with the PostgreSQL store built by ``factory.build_audit``:
exchanges are recorded before their answers, a refused write is a 503 in OpenAI's format, a record replays."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import openai
import orjson
import pytest

from llm_warden.proxy.audit.factory import build_audit
from llm_warden.proxy.audit.pg_verify import verify_pg
from llm_warden.proxy.audit.postgres import PostgresAuditLog
from llm_warden.proxy.cli import main
from llm_warden.proxy.config import load_config
from llm_warden.proxy.plugin import available_plugins
from tests.conftest import PROVIDER_KEY, WardenFactory, deep_merge
from tests.fakeprovider import FakeProvider, Reply

pytestmark = pytest.mark.timeout(60)
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hi. My mail is zoe@example.com"}]}


@pytest.fixture
def pg_overrides(pg_dsn: str, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("WARDEN_TEST_AUDIT_DSN", pg_dsn)
    return {
        "audit": {"enabled": True, "backend": "postgres", "durability": "sync", "store_content": "full", "signing_key_file": str(key_file)},
        "database": {"dsn_env": "WARDEN_TEST_AUDIT_DSN", "pool_max": 4},
    }


async def _start(warden_factory: WardenFactory, base_config: dict[str, Any], tmp_path: Path, overrides: dict[str, Any]) -> Any:
    cfg = load_config(deep_merge(base_config, overrides), available_plugins())
    cfg.base_dir = tmp_path
    audit = build_audit(cfg)
    assert isinstance(audit, PostgresAuditLog)
    return await warden_factory(overrides, audit=audit)


async def test_exchange_recorded_in_postgres_and_replayed(
    warden_factory: WardenFactory,
    base_config: dict[str, Any],
    tmp_path: Path,
    pg_overrides: dict[str, Any],
    pg_dsn: str,
    token: Callable[..., str],
    fake: FakeProvider,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rw = await _start(warden_factory, base_config, tmp_path, pg_overrides)
    log = rw.warden.audit
    client = openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(), max_retries=0, timeout=10)
    fake.push(Reply(content="Hi there."))
    raw = await client.chat.completions.with_raw_response.create(**BODY)
    rid = raw.headers["x-request-id"]
    # sync: the record was committed before the answer was released.
    rec = await log.find(rid)
    assert rec is not None and rec["status"] == 200 and rec["response"]["text"] == "Hi there."
    assert rec["principal"]["tenant"] == "acme" and PROVIDER_KEY not in orjson.dumps(rec).decode()
    fake.push(Reply(content="Hello again."))
    code = await asyncio.to_thread(main, ["replay", rid, "--db", pg_dsn, "--upstream", fake.base_url, "--json"])
    assert code == 0
    out = orjson.loads(capsys.readouterr().out)
    assert out["old"]["text"] == "Hi there." and out["new"]["text"] == "Hello again."
    await rw.stop()
    report = await verify_pg(pg_dsn)
    assert report.ok and report.records == 1, report.render()


async def test_unwritable_store_is_a_503_in_openai_format(
    warden_factory: WardenFactory,
    base_config: dict[str, Any],
    tmp_path: Path,
    pg_overrides: dict[str, Any],
    pg_dsn: str,
    token: Callable[..., str],
    fake: FakeProvider,
) -> None:
    rw = await _start(warden_factory, base_config, tmp_path, pg_overrides)
    client = openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(), max_retries=0, timeout=10)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("ALTER TABLE audit_records RENAME TO audit_records_away")
        fake.push(Reply(content="never released"))
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(**BODY)
        assert info.value.status_code == 503
        err = info.value.body
        assert isinstance(err, dict) and err["code"] == "audit_unavailable" and "audit.durability" in err["message"]
        assert "never released" not in str(err)
        await conn.execute("ALTER TABLE audit_records_away RENAME TO audit_records")
    finally:
        await conn.close()
    fake.push(Reply(content="back"))
    ok = await client.chat.completions.create(**BODY)
    assert ok.choices[0].message.content == "back"
