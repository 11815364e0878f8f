"""Through the real server and the fake provider: streamed, abandoned and
refused exchanges are recorded; a recorded exchange replays."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from llm_warden.proxy.audit.sqlite import SQLiteAuditLog
from llm_warden.proxy.audit.verify import verify_db
from llm_warden.proxy.cli import main
from tests.conftest import PROVIDER_KEY, WardenFactory
from tests.fakeprovider import FakeProvider, Reply
from tests.proxy.audit.helpers import writes_fail

AUDIT_ON = {"audit": {"enabled": True, "durability": "sync", "store_content": "redacted", "checkpoint_every": 5}}
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hi. My mail is zoe@example.com"}]}


def _log(rw: Any) -> SQLiteAuditLog:
    log = rw.warden.audit
    assert isinstance(log, SQLiteAuditLog)
    return log


async def _wait_record(log: SQLiteAuditLog, request_id: str) -> dict[str, Any]:
    for _ in range(100):
        rec = await log.find(request_id)
        if rec is not None:
            return rec
        await asyncio.sleep(0.05)
    raise AssertionError(f"no record for {request_id}")


async def test_streamed_exchange_is_recorded(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await warden_factory(AUDIT_ON)
    client = openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(), max_retries=0, timeout=10)
    fake.push(Reply(content="Hi there, friend."))
    stream = await client.chat.completions.with_raw_response.create(**BODY, stream=True)
    rid = stream.headers["x-request-id"]
    text = "".join([c.choices[0].delta.content or "" async for c in stream.parse() if c.choices])
    assert text == "Hi there, friend."
    rec = await _wait_record(_log(rw), rid)
    assert rec["stream"] is True and rec["status"] == 200 and not rec["client_disconnected"]
    assert rec["response"]["text"] == "Hi there, friend."
    assert rec["principal"]["tenant"] == "acme"
    sent = rec["turns"][0]["request"]
    assert sent["messages"][0]["content"] == "Say hi. My mail is [REDACTED:email]"
    assert rec["redaction"]["rules"] == {"email": 1}
    assert PROVIDER_KEY not in orjson.dumps(rec).decode()


async def test_abandoned_stream_is_recorded(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await warden_factory(AUDIT_ON)
    fake.push(Reply(content=" ".join(["word"] * 200), chunk_delay_s=0.02))
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            f"{rw.base_url}/chat/completions", json={**BODY, "stream": True}, headers={"Authorization": f"Bearer {token()}"}
        )
        rid = resp.headers["x-request-id"]
        await resp.content.readline()
        resp.close()
    rec = await _wait_record(_log(rw), rid)
    assert rec["client_disconnected"] is True
    assert rec["stream"] is True
    assert len(rec["response"]["text"] or "") < len(" ".join(["word"] * 200))


async def test_refused_request_is_recorded_with_its_rule(warden_factory: WardenFactory, token: Callable[..., str]) -> None:
    rw = await warden_factory(AUDIT_ON)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            f"{rw.base_url}/chat/completions",
            data=b"{not json",
            headers={"Authorization": f"Bearer {token()}", "Content-Type": "application/json"},
        )
        rid = resp.headers["x-request-id"]
        assert resp.status == 400
    rec = await _wait_record(_log(rw), rid)
    assert rec["status"] == 400 and rec["error"]["code"]
    assert rec["turns"] == []


async def test_sync_audit_failure_is_a_503(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider) -> None:
    rw = await warden_factory(AUDIT_ON)
    log = _log(rw)
    client = openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(), max_retries=0, timeout=10)
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 20000}]}
    with writes_fail(log), pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(**big)
    assert info.value.status_code == 503
    assert "audit" in str(info.value.body).lower()
    fake.push(Reply(content="back"))
    ok = await client.chat.completions.create(**big)
    assert ok.choices[0].message.content == "back"


async def test_replay_against_the_fake_provider(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rw = await warden_factory({"audit": {**AUDIT_ON["audit"], "store_content": "full"}})
    client = openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(), max_retries=0, timeout=10)
    fake.push(Reply(content=None, tool_calls=[{"name": "lookup_order", "arguments": '{"id": 7}'}]))
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Where is order 7?"}],
        tools=[{"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object"}}}],
    )
    rid = raw.headers["x-request-id"]
    await _wait_record(_log(rw), rid)
    db = str(_log(rw).path)
    fake.push(Reply(content=None, tool_calls=[{"name": "lookup_order", "arguments": '{"id": 8}'}], model="gpt-4o-mini"))
    before = len(fake.chat_requests())
    code = await asyncio.to_thread(main, ["replay", rid, "--db", db, "--upstream", fake.base_url, "--model", "gpt-4o-mini", "--json"])
    assert code == 0
    out = orjson.loads(capsys.readouterr().out)
    assert out["old"]["tool_calls"] == [["lookup_order", '{"id":7}']]
    assert out["new"]["tool_calls"] == [["lookup_order", '{"id":8}']]
    assert out["tool_call_changes"] == ['~ changed  lookup_order({"id":7})  ->  lookup_order({"id":8})']
    sent = fake.chat_requests()[before].body
    assert sent["model"] == "gpt-4o-mini" and sent["messages"][0]["content"] == "Where is order 7?"
    # side by side, text form
    fake.push(Reply(content="Order 7 shipped."))
    code = await asyncio.to_thread(main, ["replay", rid, "--db", db, "--upstream", fake.base_url, "--width", "100"])
    assert code == 0
    text = capsys.readouterr().out
    assert "recorded (" in text and "replay (" in text and "Order 7 shipped." in text
    assert "- removed  lookup_order" in text
    await rw.stop()
    report = await verify_db(Path(db))
    assert report.ok, report.render()


async def test_replay_refuses_a_hashes_record(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, capsys: pytest.CaptureFixture[str]
) -> None:
    rw = await warden_factory({"audit": {**AUDIT_ON["audit"], "store_content": "hashes"}})
    client = openai.AsyncOpenAI(base_url=rw.base_url, api_key=token(), max_retries=0, timeout=10)
    raw = await client.chat.completions.with_raw_response.create(**BODY)
    rid = raw.headers["x-request-id"]
    await _wait_record(_log(rw), rid)
    code = await asyncio.to_thread(main, ["replay", rid, "--db", str(_log(rw).path), "--upstream", fake.base_url])
    assert code == 2
    assert 'store_content = "hashes"' in capsys.readouterr().err
