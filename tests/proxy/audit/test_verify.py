"""The chain and checkpoints catch edits, deletions, reordering, forgery and a cut tail."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llm_warden.proxy.audit.chain import append_checkpoint_file, make_checkpoint, verifier_key
from llm_warden.proxy.audit.verify import verify_db
from tests.proxy.audit.conftest import LogFactory
from tests.proxy.audit.helpers import make_exchange


async def _fill(make_log: LogFactory, tmp_path: Path, n: int = 30, **cfg: object) -> Path:
    log = await make_log(durability="sync", checkpoint_every=10, checkpoint_file=str(tmp_path / "checkpoints.txt"), **cfg)
    for i in range(n):
        await log.record_exchange(make_exchange(request_id=f"req_{i + 1:04d}"))
    await log.stop()
    return log.path


def _tamper(path: Path, *sql: str, args: tuple[object, ...] = ()) -> None:
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER IF EXISTS records_no_update")
    db.execute("DROP TRIGGER IF EXISTS records_no_delete")
    db.execute("DROP TRIGGER IF EXISTS checkpoints_no_update")
    db.execute("DROP TRIGGER IF EXISTS checkpoints_no_delete")
    for s in sql:
        db.execute(s, args if "?" in s else ())
    db.commit()
    db.close()


def _kinds(report: object) -> list[tuple[str, int | None]]:
    return [(f.kind, f.seq) for f in report.faults]  # type: ignore[attr-defined]


async def test_clean_log_verifies(make_log: LogFactory, tmp_path: Path) -> None:
    path = await _fill(make_log, tmp_path)
    report = await verify_db(path, checkpoint_file=tmp_path / "checkpoints.txt")
    assert report.ok, report.render()
    assert report.records == 30 and report.checkpoints == 3 and report.external_checkpoints == 3


async def test_edited_record_is_reported(make_log: LogFactory, tmp_path: Path) -> None:
    path = await _fill(make_log, tmp_path)
    db = sqlite3.connect(path)
    body = db.execute("SELECT body FROM records WHERE seq = 7").fetchone()[0]
    db.close()
    _tamper(path, "UPDATE records SET body = ? WHERE seq = 7", args=(body.replace(b'"status":200', b'"status":201'),))
    report = await verify_db(path)
    assert _kinds(report)[0] == ("edited", 7)
    assert not report.ok


async def test_edited_and_rehashed_record_breaks_the_next_link_and_checkpoint(make_log: LogFactory, tmp_path: Path) -> None:
    from llm_warden.proxy.audit.chain import leaf_hash

    path = await _fill(make_log, tmp_path)
    db = sqlite3.connect(path)
    prev, body = db.execute("SELECT prev_hash, body FROM records WHERE seq = 7").fetchone()
    db.close()
    new = body.replace(b'"status":200', b'"status":201')
    _tamper(path, "UPDATE records SET body = ?, hash = ? WHERE seq = 7", args=(new, leaf_hash(prev, 7, new)))
    report = await verify_db(path)
    kinds = _kinds(report)
    assert kinds[0] == ("broken_link", 8)
    assert not report.ok


async def test_deleted_record_is_reported(make_log: LogFactory, tmp_path: Path) -> None:
    path = await _fill(make_log, tmp_path)
    _tamper(path, "DELETE FROM records WHERE seq = 12")
    report = await verify_db(path)
    assert _kinds(report)[0] == ("deleted", 13)
    assert "12..12" in report.faults[0].message


async def test_reordered_records_are_reported(make_log: LogFactory, tmp_path: Path) -> None:
    path = await _fill(make_log, tmp_path)
    _tamper(
        path,
        "UPDATE records SET seq = -1 WHERE seq = 15",
        "UPDATE records SET seq = 15 WHERE seq = 16",
        "UPDATE records SET seq = 16 WHERE seq = -1",
    )
    report = await verify_db(path)
    kinds = [k for k, _ in _kinds(report)]
    assert kinds[0] == "reordered", report.render()
    assert report.faults[0].seq == 15


async def test_forged_checkpoint_is_reported(make_log: LogFactory, tmp_path: Path) -> None:
    path = await _fill(make_log, tmp_path)
    db = sqlite3.connect(path)
    origin = db.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()[0]
    size, h = db.execute("SELECT size, hash FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
    db.close()
    # Signed by a key the verifier does not trust.
    rogue = Ed25519PrivateKey.generate()
    note = make_checkpoint(origin, size + 5, h, 0, rogue)
    _tamper(path, "INSERT INTO checkpoints (size, hash, note, created_us, reason) VALUES (?, ?, ?, 0, 'x')", args=(size + 5, h, note))
    report = await verify_db(path)
    assert ("forged_checkpoint", size + 5) in _kinds(report)
    # A trusted key's note with an altered size fails its signature.
    trusted = (path.with_name(path.name + ".ed25519.pub")).read_text().strip()
    good = db_note(path, size)
    altered = good.replace(f"\n{size}\n", f"\n{size - 1}\n")
    ext = tmp_path / "forged.txt"
    ext.write_text(altered)
    report = await verify_db(path, keys=[trusted], checkpoint_file=ext)
    assert any(f.kind == "forged_checkpoint" and "invalid signature" in f.message for f in report.faults)


def db_note(path: Path, size: int) -> str:
    db = sqlite3.connect(path)
    note = db.execute("SELECT note FROM checkpoints WHERE size = ?", (size,)).fetchone()[0]
    db.close()
    return str(note)


async def test_untrusted_key_is_refused_with_independent_key(make_log: LogFactory, tmp_path: Path) -> None:
    path = await _fill(make_log, tmp_path, n=10)
    other = verifier_key("someone-else", Ed25519PrivateKey.generate().public_key())
    report = await verify_db(path, keys=[other])
    assert {f.kind for f in report.faults} == {"forged_checkpoint"}
    assert "no signature by a trusted key" in report.faults[0].message


async def test_truncated_tail_is_caught_by_the_external_checkpoint(make_log: LogFactory, tmp_path: Path) -> None:
    path = await _fill(make_log, tmp_path)
    _tamper(
        path,
        "DELETE FROM records WHERE seq > 25",
        "DELETE FROM checkpoints WHERE size > 25",
        "UPDATE head SET seq = 25, hash = (SELECT hash FROM records WHERE seq = 25)",
    )
    alone = await verify_db(path)
    assert alone.ok, "without an outside checkpoint a clean cut after a checkpoint is invisible"
    report = await verify_db(path, checkpoint_file=tmp_path / "checkpoints.txt")
    assert [f.kind for f in report.faults] == ["truncated"]
    assert "covers 30 records but the log ends at 25" in report.faults[0].message


async def test_cut_tail_without_head_update_is_caught_by_the_head(make_log: LogFactory, tmp_path: Path) -> None:
    path = await _fill(make_log, tmp_path)
    _tamper(path, "DELETE FROM records WHERE seq > 28")
    report = await verify_db(path)
    assert "truncated" in [f.kind for f in report.faults]


async def test_torn_checkpoint_file_and_unsealed_tail_are_warnings_not_faults(make_log: LogFactory, tmp_path: Path) -> None:
    path = await _fill(make_log, tmp_path, n=20)
    cp = tmp_path / "checkpoints.txt"
    full = cp.read_text()
    with cp.open("a") as f:
        f.write(full[:40])  # a crash in the middle of an append
    log = await make_log(durability="sync", checkpoint_every=10)
    for i in range(3):
        await log.record_exchange(make_exchange(request_id=f"late_{i}"))
    # no stop(): the last three records are after the last checkpoint. While the log is open they are "live" ...
    report = await verify_db(path, checkpoint_file=cp)
    assert report.ok and report.live, report.render()
    assert [(f.severity, f.seq) for f in report.findings if f.kind == "live"] == [("info", 21)], report.render()
    assert "live: a running Warden is writing it" in report.render()
    # ... and once the process is gone (the kernel drops its lock, as here) they are what an unclean stop left.
    assert log.live_lock is not None
    log.live_lock.release()
    report = await verify_db(path, checkpoint_file=cp)
    assert report.ok and not report.live, report.render()
    warnings = [f for f in report.findings if f.severity == "warning"]
    assert {w.kind for w in warnings} == {"torn_tail"}
    assert len(warnings) == 2
    # The next start repairs both: the note is cut off the file and the tail is sealed.
    await log.stop()
    log2 = await make_log(durability="sync", checkpoint_every=10, checkpoint_file=str(cp))
    assert log2.recovery.get("checkpoint_file_torn") == 40
    await log2.stop()
    report = await verify_db(path, checkpoint_file=cp)
    assert report.ok and not [f for f in report.findings if f.severity == "warning"], report.render()


async def test_index_columns_that_lie_are_reported(make_log: LogFactory, tmp_path: Path) -> None:
    path = await _fill(make_log, tmp_path, n=5)
    _tamper(path, "UPDATE records SET tenant = 'other' WHERE seq = 3")
    report = await verify_db(path)
    assert _kinds(report) == [("index_mismatch", 3)]


async def test_external_checkpoint_from_another_log_is_refused(make_log: LogFactory, tmp_path: Path) -> None:
    path = await _fill(make_log, tmp_path, n=10)
    ext = tmp_path / "other.txt"
    append_checkpoint_file(ext, make_checkpoint("other/origin", 5, b"\x00" * 32, 0, Ed25519PrivateKey.generate()))
    report = await verify_db(path, checkpoint_file=ext)
    assert [f.kind for f in report.faults] == ["forged_checkpoint"]
