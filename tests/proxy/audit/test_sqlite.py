"""The SQLite store: secrets never reach the disk, fail-closed sync, backpressure, retention."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import orjson
import pytest

from llm_warden.proxy.audit.sqlite import SQLiteAuditLog, build_audit
from llm_warden.proxy.audit.verify import verify_db
from llm_warden.proxy.config import AuditConfig, load_config
from llm_warden.proxy.errors import AuditUnavailable
from llm_warden.proxy.exchange import Principal, UpstreamTurn
from tests.proxy.audit.conftest import LogFactory
from tests.proxy.audit.helpers import make_exchange, writes_fail
from tests.proxy.audit.test_redact import SECRETS, UPSTREAM, secret_value

PII = {
    "email": "carol.jones@example.org",
    "phone": "+44 20 7946 0958",
    "card": "5500 0000 0000 0004",
}


def _all_secret_text() -> str:
    return " | ".join(SECRETS.values()) + " | " + " | ".join(PII.values())


def _disk_bytes(path: Path) -> bytes:
    out = b""
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        if p.exists():
            out += p.read_bytes()
    return out


@pytest.mark.parametrize("mode", ["full", "redacted", "hashes"])
async def test_secrets_never_reach_the_database_files(make_log: LogFactory, tmp_path: Path, mode: str) -> None:
    log = await make_log(store_content=mode, upstream_key=UPSTREAM)
    text = _all_secret_text()
    ex = make_exchange(user_text=text, request_id="req_secret")
    ex.request_headers["x-debug"] = f"Bearer {UPSTREAM}"
    ex.error_detail = f"upstream said: invalid key {UPSTREAM}"
    ex.plugin_fields["notes"] = {"note": SECRETS["aws_access_key"]}  # what a plugin's audit_fields returned
    ex.tool_results = [{"tool_call_id": "call_prev", "content": SECRETS["private_key"]}]
    ex.response_text = "your key " + SECRETS["provider_key"]
    await log.record_exchange(ex)
    await log.record_event("ingest", {"tenant": "acme", "subject": "ops"}, {"doc": "d1", "note": SECRETS["jwt"]})
    disk = _disk_bytes(log.path)
    assert b"req_secret" in disk
    for kind, sample in SECRETS.items():
        assert secret_value(kind, sample).encode() not in disk, kind
    for value in PII.values():
        if mode == "full":
            assert value.encode() in disk  # PII is kept in full mode
        else:
            assert value.encode() not in disk
    rec = await log.find("req_secret")
    assert rec is not None
    rules = rec["redaction"]["rules"]
    assert rules.get("upstream_key", 0) >= 3
    assert set(rec["plugins"]) == {"notes"} and "[REDACTED:aws_access_key]" in rec["plugins"]["notes"]["note"], "recorded, redacted"
    assert set(SECRETS) <= set(rules) | {"upstream_key"}
    await log.stop()
    disk = _disk_bytes(log.path)
    for kind, sample in SECRETS.items():
        assert secret_value(kind, sample).encode() not in disk, kind


async def test_hashes_mode_keeps_no_content(make_log: LogFactory) -> None:
    log = await make_log(store_content="hashes")
    await log.record_exchange(make_exchange(user_text="a very particular sentence about zebras", request_id="r1"))
    assert b"zebras" not in _disk_bytes(log.path)
    rec = await log.find("r1")
    assert rec is not None
    assert set(rec["turns"][0]["request"]) == {"sha256", "bytes"}
    assert rec["tool_calls"][0]["name"] == "lookup_order" and rec["status"] == 200


async def test_record_fields(make_log: LogFactory) -> None:
    log = await make_log(store_content="full")
    ex = make_exchange(request_id="r_fields")
    ex.turns.append(
        UpstreamTurn(
            index=1, body=b'{"model":"gpt-4o","messages":[]}', status=200, response={"choices": []}, duration_s=0.002, reason="correction"
        )
    )
    await log.record_exchange(ex)
    rec = await log.find("r_fields")
    assert rec is not None
    assert rec["principal"] == {"tenant": "acme", "subject": "alice", "groups": ["support"], "scopes": ["chat"]}
    assert rec["model"] == {"requested": "gpt-4o", "reported": "gpt-4o-2024-08-06"}
    assert rec["params"]["temperature"] == 0.2 and rec["params"]["tools_offered"] == ["lookup_order"]
    assert rec["prompt"]["system_sha256"] and len(rec["prompt"]["system_sha256"]) == 64
    assert rec["latency_us"]["total"] == 13100 and rec["turns"][0]["duration_us"] == 12345
    assert [t["reason"] for t in rec["turns"]] == ["initial", "correction"]
    assert rec["tool_calls"][0]["decision"] == "allow" and rec["tool_calls"][0]["rule"] == "tools.lookup_order"
    assert rec["tool_results"][0]["tool_call_id"] == "call_prev"
    assert rec["usage"]["total_tokens"] == 129
    assert "authorization" not in rec["request_headers"]
    assert rec["provider"] == "openai" and rec["trace_id"]


async def test_sync_mode_fails_closed_when_the_database_cannot_be_written(make_log: LogFactory) -> None:
    log = await make_log(durability="sync")
    await log.record_exchange(make_exchange(request_id="before"))
    failures = log.failures
    with writes_fail(log), pytest.raises(AuditUnavailable) as info:
        await log.record_exchange(make_exchange(request_id="full_0", user_text="x" * 5000))
    assert info.value.status == 503 and info.value.rule == "audit.durability"
    assert not log.healthy and log.failures > failures
    await log.record_exchange(make_exchange(request_id="after"))
    assert log.healthy
    assert await log.find("after") is not None
    assert await log.find("full_0") is None  # the failed request's record was rolled back, not half-written
    await log.stop()
    report = await verify_db(log.path)
    assert report.ok, report.render()


async def _kill_writer(log: SQLiteAuditLog) -> int:
    """SIGKILL the writer process and wait (up to 2 s) until another runs; returns the killed pid."""
    pid = log.writer_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if log.writer_pid not in (None, pid):
            break
        await asyncio.sleep(0.01)
    return pid


async def test_a_killed_writer_process_is_restarted_and_nothing_is_lost(make_log: LogFactory) -> None:
    log = await make_log(durability="sync")
    await log.record_exchange(make_exchange(request_id="k_before"))
    pid = await _kill_writer(log)
    # Replaced without waiting for traffic.
    assert log.writer_pid not in (None, pid) and log.writer_restarts == 1
    await asyncio.gather(*(log.record_exchange(make_exchange(request_id=f"k_after_{i}")) for i in range(5)))
    assert log.healthy
    await log.record_event("mode_change", {"subject": "ops"}, {"read_only": True})
    await log.stop()
    report = await verify_db(log.path)
    assert report.ok and report.records == 7, report.render()


async def test_sync_mode_fails_closed_when_the_writer_cannot_be_restarted(make_log: LogFactory) -> None:
    log = await make_log(durability="sync")
    pid = log.writer_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    log.path.unlink()  # the database is gone: a new writer refuses to create an empty one
    with pytest.raises(AuditUnavailable):
        await log.record_exchange(make_exchange())
    assert not log.healthy
    with pytest.raises(AuditUnavailable):
        await log.record_event("mode_change", {"subject": "ops"}, {"read_only": True})


async def test_batch_backpressure_waits_and_drops_nothing(make_log: LogFactory, tmp_path: Path) -> None:
    log = await make_log(durability="batch", queue_max=4, batch_max_records=2, batch_max_ms=0)
    blocker = sqlite3.connect(log.path, timeout=10, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: commits stall
    n = 40
    done: list[int] = []

    async def one(i: int) -> None:
        await log.record_exchange(make_exchange(request_id=f"bp_{i:03d}"))
        done.append(i)

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    try:
        await asyncio.sleep(0.3)
        waiting = n - len(done)
        depth = log.queue_depth
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # The queue holds 4; besides it at most two groups (2 x 2 records) are in flight to the writer.
    assert waiting >= n - 4 - 2 * 2, "callers should be waiting on the full queue"
    assert depth <= 4 + 2 * 2
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    await log.stop()
    db = sqlite3.connect(log.path)
    ids = {r[0] for r in db.execute("SELECT request_id FROM records WHERE kind = 'exchange'")}
    db.close()
    assert ids == {f"bp_{i:03d}" for i in range(n)}
    assert log.records_written >= n


async def test_batch_mode_retries_a_failed_commit_and_never_drops(make_log: LogFactory) -> None:
    log = await make_log(durability="batch", batch_max_ms=0)
    with writes_fail(log):
        for i in range(20):
            await log.record_exchange(make_exchange(request_id=f"retry_{i}", user_text="y" * 4000))
        for _ in range(100):
            if not log.healthy:
                break
            await asyncio.sleep(0.02)
        assert not log.healthy and log.queue_depth > 0
    for _ in range(200):
        if log.queue_depth == 0 and log.healthy:
            break
        await asyncio.sleep(0.02)
    await log.stop()
    db = sqlite3.connect(log.path)
    n = db.execute("SELECT COUNT(*) FROM records WHERE request_id LIKE 'retry_%'").fetchone()[0]
    db.close()
    assert n == 20


async def test_commit_hook_and_counters(make_log: LogFactory) -> None:
    log = await make_log(durability="sync")
    seen: list[tuple[float, int]] = []
    log.on_commit = lambda s, n: seen.append((s, n))
    await asyncio.gather(*(log.record_exchange(make_exchange()) for _ in range(10)))
    assert sum(n for _, n in seen) == 10 and log.records_written == 10
    assert all(s >= 0 for s, _ in seen)
    assert len(seen) < 10, "concurrent sync records share commits"


async def test_triggers_refuse_update_and_delete(make_log: LogFactory) -> None:
    log = await make_log()
    await log.record_exchange(make_exchange(request_id="t1"))
    db = sqlite3.connect(log.path, timeout=5)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE records SET status = 500")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM records")
    db.close()


async def test_two_writers_on_one_database_keep_one_chain(make_log: LogFactory, tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    a = await make_log(path, durability="sync", checkpoint_every=7)
    b = await make_log(path, durability="batch", checkpoint_every=7, batch_max_ms=1)
    await asyncio.gather(
        *(a.record_exchange(make_exchange(request_id=f"a{i}")) for i in range(40)),
        *(b.record_exchange(make_exchange(request_id=f"b{i}")) for i in range(40)),
    )
    await a.stop()
    await b.stop()
    report = await verify_db(path)
    assert report.ok, report.render()
    assert report.records == 80


async def test_retention_prunes_to_a_checkpoint_and_verify_stays_green(make_log: LogFactory, tmp_path: Path) -> None:
    log = await make_log(durability="sync", checkpoint_every=5)
    log.cfg.retention_days = 30  # after start: no background prune races the records this test writes
    old = time.time() - 40 * 86400
    for i in range(12):
        ex = make_exchange(request_id=f"old_{i}")
        ex.wall_time = old + i
        await log.record_exchange(ex)
    for i in range(4):
        await log.record_exchange(make_exchange(request_id=f"new_{i}"))
    through = await log.prune()
    assert through == 10  # the last checkpoint before the first young record (seq 13)
    assert await log.find("old_9") is None and await log.find("old_10") is not None
    await log.record_exchange(make_exchange(request_id="after_prune"))
    await log.stop()
    report = await verify_db(log.path)
    assert report.ok, report.render()
    assert report.first_seq == 11
    db = sqlite3.connect(log.path)
    kinds = [r[0] for r in db.execute("SELECT kind FROM records ORDER BY seq")]
    assert "retention_prune" in kinds
    assert db.execute("SELECT COUNT(*) FROM checkpoints WHERE size = 10").fetchone()[0] == 1
    db.close()
    # Deleting one more old record by hand is still caught.
    db = sqlite3.connect(log.path)
    db.execute("DROP TRIGGER records_no_delete")
    db.execute("DELETE FROM records WHERE seq = 11")
    db.commit()
    db.close()
    report = await verify_db(log.path)
    assert not report.ok and report.faults[0].kind == "deleted"


async def test_search_find_and_iter(make_log: LogFactory) -> None:
    log = await make_log()
    for i in range(5):
        ex = make_exchange(
            request_id=f"s{i}", tenant="acme" if i % 2 else "globex", subject=f"u{i}", tool="lookup_order" if i < 3 else "send_mail"
        )
        await log.record_exchange(ex)
    await log.record_event(
        "feedback", Principal("acme", "rev").summary(), {"request_id": "s1", "rating": 1, "comment": "ok", "correction": None}
    )
    assert [r["request_id"] for r in await log.search(tenant="acme", kind="exchange")] == ["s3", "s1"]
    assert [r["kind"] for r in await log.search(tenant="acme")] == ["feedback", "exchange", "exchange"]
    assert [r["request_id"] for r in await log.search(tool="send_mail")] == ["s4", "s3"]
    assert [r["request_id"] for r in await log.search(user="u2")] == ["s2"]
    assert await log.search(tool="lookup%") == []
    assert await log.search(since=int(time.time() * 1e6) + 10_000_000) == []
    rows = [r async for r in log.iter_records()]
    assert [r["seq"] for r in rows] == list(range(1, 7))
    assert rows[-1]["record"]["kind"] == "feedback"
    assert rows[1]["prev_hash"] == rows[0]["hash"]
    assert (await log.find("missing")) is None


async def test_unprojectable_exchange_still_leaves_a_record(make_log: LogFactory) -> None:
    log = await make_log()
    ex = make_exchange(request_id="weird")
    ex.tool_decisions[0].call = None  # type: ignore[assignment]
    await log.record_exchange(ex)
    db = sqlite3.connect(log.path)
    kind, body = db.execute("SELECT kind, body FROM records WHERE request_id = 'weird'").fetchone()
    db.close()
    assert kind == "exchange_unprojectable" and "AttributeError" in orjson.loads(body)["data"]["error"]


async def test_signing_key_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from llm_warden.proxy.audit.chain import private_pem
    from llm_warden.proxy.errors import ConfigError

    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes_raw()
    monkeypatch.setenv("AUDIT_KEY", base64.b64encode(seed).decode())
    log = SQLiteAuditLog(AuditConfig(signing_key_env="AUDIT_KEY"), tmp_path / "env.db")
    await log.start()
    await log.record_exchange(make_exchange())
    await log.stop()
    assert not (tmp_path / "env.db.ed25519").exists()
    from llm_warden.proxy.audit.chain import verifier_key

    report = await verify_db(tmp_path / "env.db", keys=[verifier_key(log.origin, key.public_key())])
    assert report.ok, report.render()
    pem = tmp_path / "k.pem"
    pem.write_bytes(private_pem(key))
    log = SQLiteAuditLog(AuditConfig(signing_key_file=str(pem)), tmp_path / "file.db")
    await log.start()
    await log.stop()
    with pytest.raises(ConfigError, match="signing_key_env"):
        await SQLiteAuditLog(AuditConfig(signing_key_env="NOPE_NOT_SET"), tmp_path / "x.db").start()


async def test_generated_key_is_private(make_log: LogFactory) -> None:
    log = await make_log()
    assert log.key_path.stat().st_mode & 0o777 == 0o600
    assert log.key_path.with_name(log.key_path.name + ".pub").read_text().strip() == log.verifier


def test_build_audit_resolves_paths(tmp_path: Path) -> None:
    cfg = load_config({"audit": {"path": "a/audit.db", "checkpoint_file": "cp.txt"}, "plugins": {"enabled": []}}, {})
    cfg.base_dir = tmp_path
    sink = build_audit(cfg)
    assert isinstance(sink, SQLiteAuditLog)
    assert sink.path == tmp_path / "a" / "audit.db"
    assert sink.cfg.checkpoint_file == str(tmp_path / "cp.txt")
    off = load_config({"audit": {"enabled": False}, "plugins": {"enabled": []}}, {})
    assert build_audit(off) is None


async def test_two_stores_on_one_database_keep_one_chain(make_log: LogFactory, tmp_path: Path) -> None:
    """Two writer processes (two Warden workers) appending to one file interleave into one valid chain."""
    path = tmp_path / "mixed.db"
    one = await make_log(path, durability="sync", checkpoint_every=6)
    two = await make_log(path, durability="sync", checkpoint_every=6)
    assert one.writer_pid != two.writer_pid
    await asyncio.gather(
        *(one.record_exchange(make_exchange()) for _ in range(15)), *(two.record_exchange(make_exchange()) for _ in range(15))
    )
    await one.stop()
    await two.stop()
    report = await verify_db(path)
    assert report.ok and report.records == 30 and report.checkpoints >= 2, report.render()


async def test_a_dead_writer_fails_requests_instead_of_hanging(make_log: LogFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    log = await make_log(durability="sync")

    def boom(batch: object) -> None:
        raise RuntimeError("bug in the writer")

    monkeypatch.setattr(log, "_dispatch", boom)
    with pytest.raises(AuditUnavailable):
        await asyncio.wait_for(log.record_exchange(make_exchange()), 5)
    assert not log.healthy
    with pytest.raises(AuditUnavailable):
        await log.record_exchange(make_exchange())


@pytest.mark.parametrize("n", [1, 3, 4, 21, 64, 85, 150])
async def test_multi_row_inserts_keep_order_and_verify(make_log: LogFactory, tmp_path: Path, n: int) -> None:
    """Groups of any size (64/16/4-row statements plus a remainder) store every record in chain order."""
    path = tmp_path / f"multi-{n}.db"
    log = await make_log(path, durability="batch", batch_max_records=256, batch_max_ms=50.0)
    exs = [make_exchange(request_id=f"req_multi_{i:04d}") for i in range(n)]
    await asyncio.gather(*(log.record_exchange(e) for e in exs))
    await log.stop()
    report = await verify_db(path)
    assert report.ok and report.records == n, report.render()
    conn = sqlite3.connect(path)
    ids = [r[0] for r in conn.execute("SELECT request_id FROM records WHERE kind = 'exchange' ORDER BY seq")]
    conn.close()
    assert ids == [e.request_id for e in exs]


def test_leaf_hash_fed_in_pieces_is_the_plain_formula() -> None:
    import hashlib
    import struct

    from llm_warden.proxy.audit.chain import leaf_hash

    prev = hashlib.sha256(b"prev").digest()
    for size in (0, 1, 2046, 2047, 2048, 2049, 4094, 4095, 10_000):
        body = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert leaf_hash(prev, 7, body) == hashlib.sha256(b"\x00" + prev + struct.pack(">Q", 7) + body).digest()


def _frame_sizes(log: SQLiteAuditLog) -> list[int]:
    """Record bytes of every append frame sent to the writer process (recorded from here on)."""
    assert log._wp is not None
    sizes: list[int] = []
    submit = log._wp.submit

    def spy(preps, reason=None, then=None):  # type: ignore[no-untyped-def]
        sizes.append(sum(len(p.body) for p in preps))
        return submit(preps, reason, then)

    log._wp.submit = spy  # type: ignore[method-assign]
    return sizes


async def test_batch_frames_stay_within_the_byte_budget(make_log: LogFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import llm_warden.proxy.audit.sqlite as store
    monkeypatch.setattr(store, "FRAME_BYTES", 20_000)
    log = await make_log(durability="batch", batch_max_ms=50)
    sizes = _frame_sizes(log)
    for i in range(30):
        await log.record_exchange(make_exchange(request_id=f"cap_{i}", user_text="z" * 3000))
    await log.stop()
    assert len(sizes) >= 4, sizes
    # A frame stops growing once it reaches the budget: at most one record past it.
    assert all(s < 20_000 + 12_000 for s in sizes), sizes
    db = sqlite3.connect(log.path)
    assert db.execute("SELECT COUNT(*) FROM records WHERE request_id LIKE 'cap_%'").fetchone()[0] == 30
    db.close()
    assert (await verify_db(log.path)).ok


async def test_a_failed_batch_is_retried_in_groups_within_the_budget(make_log: LogFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    import llm_warden.proxy.audit.sqlite as store
    monkeypatch.setattr(store, "FRAME_BYTES", 20_000)
    log = await make_log(durability="batch", batch_max_ms=0, batch_max_records=8)
    sizes = _frame_sizes(log)
    with writes_fail(log):
        for i in range(24):
            await log.record_exchange(make_exchange(request_id=f"regroup_{i}", user_text="q" * 3000))
        for _ in range(100):
            if log._retry:
                break
            await asyncio.sleep(0.02)
        assert log._retry, "the failed records wait for a retry"
    for _ in range(300):
        if log.queue_depth == 0 and log.healthy:
            break
        await asyncio.sleep(0.02)
    await log.stop()
    assert sizes and all(s < 20_000 + 12_000 for s in sizes), sizes
    db = sqlite3.connect(log.path)
    ids = [r[0] for r in db.execute("SELECT request_id FROM records WHERE request_id LIKE 'regroup_%' ORDER BY seq")]
    db.close()
    assert sorted(ids) == sorted(f"regroup_{i}" for i in range(24)) and len(ids) == 24


async def test_an_oversized_exchange_is_recorded_by_its_size(make_log: LogFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    import llm_warden.proxy.audit.sqlite as store
    monkeypatch.setattr(store, "MAX_RECORD_BYTES", 5_000)
    log = await make_log(durability="sync")
    await log.record_exchange(make_exchange(request_id="huge", user_text="h" * 10_000))
    await log.record_exchange(make_exchange(request_id="small"))
    await log.stop()
    db = sqlite3.connect(log.path)
    rows = dict(db.execute("SELECT request_id, kind FROM records WHERE request_id IN ('huge', 'small')").fetchall())
    body = orjson.loads(db.execute("SELECT body FROM records WHERE request_id = 'huge'").fetchone()[0])
    db.close()
    assert rows == {"huge": "exchange_oversized", "small": "exchange"}
    assert body["data"]["bytes"] > 10_000 and body["data"]["limit"] == 5_000 and body["actor"]["tenant"]


async def _old_records(log: SQLiteAuditLog, n: int, prefix: str = "old") -> None:
    old = time.time() - 40 * 86400
    for i in range(n):
        ex = make_exchange(request_id=f"{prefix}_{i}")
        ex.wall_time = old + i
        await log.record_exchange(ex)


def _min_seq(path: Path) -> int:
    db = sqlite3.connect(path, timeout=10)
    try:
        return int(db.execute("SELECT COALESCE(MIN(seq), 0) FROM records").fetchone()[0])
    finally:
        db.close()


async def test_retention_deletes_in_short_transactions_that_appends_interleave_with(make_log: LogFactory) -> None:
    """A prune never holds the write lock for the whole cut: records commit between its chunks."""
    log = await make_log(durability="sync", fsync=False, checkpoint_every=5)
    log.cfg.retention_days = 30  # after start: no background prune races the records this test writes
    await _old_records(log, 60)
    log.prune_chunk = 7
    pruning = asyncio.create_task(log.prune())
    between: list[int] = []  # the first remaining seq after each append that committed while the cut was half done
    i = 0
    while not pruning.done():
        await log.record_exchange(make_exchange(request_id=f"during_{i}"))
        i += 1
        first = await asyncio.to_thread(_min_seq, log.path)
        if 1 < first <= 60:
            between.append(first)
    assert await pruning == 60
    assert len(set(between)) >= 2, f"appends should commit between the prune's chunks (saw {between})"
    assert _min_seq(log.path) == 61
    await log.stop()
    report = await verify_db(log.path)
    assert report.ok and report.first_seq == 61 and not [f for f in report.findings if f.severity == "warning"], report.render()


async def test_an_interrupted_prune_verifies_and_the_next_one_finishes_it(make_log: LogFactory, tmp_path: Path) -> None:
    log = await make_log(durability="sync", fsync=False, checkpoint_every=5, checkpoint_file=str(tmp_path / "cp.txt"))
    log.cfg.retention_days = 30  # after start: no background prune races the records this test writes
    await _old_records(log, 40)
    await log.record_exchange(make_exchange(request_id="young"))
    log.prune_chunk = 6
    log.prune_pause_s = 0.5
    pruning = asyncio.create_task(log.prune())
    for _ in range(500):
        if _min_seq(log.path) > 1:
            break
        await asyncio.sleep(0.005)
    pruning.cancel()  # as a stop (or a crash) between two chunks
    with pytest.raises(asyncio.CancelledError):
        await pruning
    first = _min_seq(log.path)
    assert 1 < first <= 40, "the prune was cut between chunks"
    report = await verify_db(log.path, checkpoint_file=tmp_path / "cp.txt")
    assert report.ok, report.render()
    # (and, as info, the running log's records after its last checkpoint)
    assert {f.kind for f in report.findings if f.severity == "warning"} == {"partial_prune"}, report.render()
    assert "live" in {f.kind for f in report.findings if f.severity == "info"}, report.render()
    # Tampering inside the part left to delete is still caught.
    db = sqlite3.connect(log.path, timeout=10)
    db.execute("DROP TRIGGER records_no_update")
    db.execute("UPDATE records SET body = CAST(REPLACE(CAST(body AS TEXT), 'old_', 'OLD_') AS BLOB) WHERE seq = ?", (first + 1,))
    db.commit()
    assert not (await verify_db(log.path)).ok
    db.execute("UPDATE records SET body = CAST(REPLACE(CAST(body AS TEXT), 'OLD_', 'old_') AS BLOB) WHERE seq = ?", (first + 1,))
    db.commit()
    db.close()
    log.prune_pause_s = 0.0
    assert await log.prune() == 40  # resumes: deletes what is left below the mark
    assert _min_seq(log.path) == 41
    await log.stop()
    report = await verify_db(log.path, checkpoint_file=tmp_path / "cp.txt")
    assert report.ok and report.first_seq == 41 and not [f for f in report.findings if f.severity == "warning"], report.render()


def _meta(path: Path, like: str) -> dict[str, str]:
    db = sqlite3.connect(path, timeout=10)
    try:
        return {str(k): str(v) for k, v in db.execute("SELECT key, value FROM meta WHERE key LIKE ?", (like,))}
    finally:
        db.close()


async def test_stale_writer_markers_are_deleted_and_live_writers_keep_exactly_once(
    make_log: LogFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SQLiteAuditLog, "stale_writer_s", 0.2)
    path = tmp_path / "shared.db"
    live = await make_log(path, durability="sync", fsync=False)
    await live.record_exchange(make_exchange(request_id="live_0"))
    (live_marker,) = _meta(path, "writer:%")
    # What two servers that crashed left behind (a clean stop deletes its own marker).
    crashed = {"writer:0123456789abcdef01234567": "17", "writer:76543210fedcba9876543210": "3"}
    db = sqlite3.connect(path, timeout=10)
    db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", crashed.items())
    db.commit()
    db.close()
    first = await make_log(path)  # a start sees them first: it only notes them
    assert set(crashed) | {live_marker} <= set(_meta(path, "writer:%"))
    await first.stop()
    await asyncio.sleep(0.3)
    await live.record_exchange(make_exchange(request_id="live_1"))  # the live one commits: its marker moves
    second = await make_log(path)
    assert second.recovery.get("stale_writer_markers") == 2
    markers = _meta(path, "writer:%")
    assert not set(crashed) & set(markers) and live_marker in markers, "only the crashed servers' markers go"
    assert not {"writer-seen:" + k[7:] for k in crashed} & set(_meta(path, "writer-seen:%"))
    await second.stop()
    # A live writer idle for longer than the bound loses its marker: harmless, its next commit writes it
    # again; a writer killed after that still writes nothing twice.
    await asyncio.sleep(0.3)
    third = await make_log(path)
    await third.stop()
    assert live_marker not in _meta(path, "writer:%")
    await live.record_exchange(make_exchange(request_id="live_2"))
    assert live_marker in _meta(path, "writer:%")
    pid = live.writer_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for i in range(3, 8):
        await live.record_exchange(make_exchange(request_id=f"live_{i}"))
    await live.stop()
    assert _meta(path, "writer:%") == {}
    db = sqlite3.connect(path)
    ids = [r[0] for r in db.execute("SELECT request_id FROM records WHERE kind = 'exchange' ORDER BY seq")]
    db.close()
    assert ids == [f"live_{i}" for i in range(8)]
    report = await verify_db(path)
    assert report.ok, report.render()


def _db_checkpoint_sizes(path: Path) -> set[int]:
    db = sqlite3.connect(path, timeout=10)
    try:
        return {int(r[0]) for r in db.execute("SELECT size FROM checkpoints")}
    finally:
        db.close()


def _file_checkpoint_sizes(path: Path) -> list[int]:
    from llm_warden.proxy.audit.chain import parse_checkpoint, read_checkpoint_file

    return [parse_checkpoint(n).size for n in read_checkpoint_file(path).notes] if path.exists() else []


async def test_start_appends_the_checkpoints_the_file_lacks(make_log: LogFactory, tmp_path: Path) -> None:
    path, cp = tmp_path / "audit.db", tmp_path / "cp.txt"
    log = await make_log(path, checkpoint_every=5)  # written while no checkpoint_file was set: none exported
    for i in range(12):
        await log.record_exchange(make_exchange(request_id=f"c{i}"))
    await log.stop()
    assert _db_checkpoint_sizes(path) == {5, 10, 12} and not cp.exists()
    log = await make_log(path, checkpoint_every=5, checkpoint_file=str(cp))
    assert sorted(_file_checkpoint_sizes(cp)) == [5, 10, 12]
    await log.record_exchange(make_exchange(request_id="c12"))
    await log.stop()
    sizes = _file_checkpoint_sizes(cp)
    assert sorted(sizes) == [5, 10, 12, 13] == sorted(set(sizes)), "each note once"
    report = await verify_db(path, checkpoint_file=cp)
    assert report.ok and report.external_checkpoints == 4, report.render()


async def test_a_writer_restart_appends_the_checkpoints_the_file_lacks(make_log: LogFactory, tmp_path: Path) -> None:
    """Notes not in the file (here: another process's, as after an answer lost with a dead writer) follow a restart."""
    path, cp = tmp_path / "audit.db", tmp_path / "cp.txt"
    log = await make_log(path, durability="sync", checkpoint_every=5, checkpoint_file=str(cp))
    other = await make_log(path, durability="sync", checkpoint_every=5)
    for i in range(7):
        await other.record_exchange(make_exchange(request_id=f"o{i}"))
    assert 5 in _db_checkpoint_sizes(path) and 5 not in _file_checkpoint_sizes(cp)
    await _kill_writer(log)
    await log.record_exchange(make_exchange(request_id="after_restart"))
    for _ in range(200):
        if 5 in _file_checkpoint_sizes(cp):
            break
        await asyncio.sleep(0.01)
    assert 5 in _file_checkpoint_sizes(cp), "the restart's first commit brought the file up to date"
    await other.stop()
    await log.stop()
    sizes = _file_checkpoint_sizes(cp)
    assert set(sizes) == _db_checkpoint_sizes(path) and len(sizes) == len(set(sizes)), sizes
    report = await verify_db(path, checkpoint_file=cp)
    assert report.ok, report.render()


async def test_verify_reads_one_snapshot_while_a_prune_runs(make_log: LogFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prune that commits between verify's pages is not reported as deleted records."""
    import llm_warden.proxy.audit.verify as verify
    log = await make_log(durability="sync", fsync=False, checkpoint_every=5)
    log.cfg.retention_days = 30  # after start: no background prune races the records this test writes
    await _old_records(log, 40)
    await log.record_exchange(make_exchange(request_id="young"))
    real = verify._rows
    pruned: list[int] = []

    async def prune_after_the_first_page(reader, page=1000):  # type: ignore[no-untyped-def]
        async for row in real(reader, page=3):
            yield row
            if not pruned:
                pruned.append(await log.prune())

    monkeypatch.setattr(verify, "_rows", prune_after_the_first_page)
    report = await verify_db(log.path)
    assert pruned and pruned[0] > 0 and _min_seq(log.path) > 1, "the prune ran while verify read"
    assert report.ok, report.findings


async def test_a_retention_backlog_is_pruned_in_the_background_after_start(make_log: LogFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Turning retention on for a large log must not hold up readiness while the backlog is deleted."""
    first = await make_log(durability="sync", fsync=False, checkpoint_every=5)
    await _old_records(first, 40)
    await first.record_exchange(make_exchange(request_id="young"))
    await first.stop()
    monkeypatch.setattr(SQLiteAuditLog, "prune_chunk", 4)
    monkeypatch.setattr(SQLiteAuditLog, "prune_pause_s", 0.05)
    t0 = time.monotonic()
    log = await make_log(first.path, durability="sync", fsync=False, checkpoint_every=5, retention_days=30)
    started_in = time.monotonic() - t0
    assert log.healthy and _min_seq(log.path) == 1, "ready before the backlog is gone"
    await log.record_exchange(make_exchange(request_id="while_pruning"))
    for _ in range(400):
        if _min_seq(log.path) > 40:
            break
        await asyncio.sleep(0.01)
    assert _min_seq(log.path) == 41 and started_in < 0.5, started_in
    await log.stop()
    assert (await verify_db(log.path)).ok
