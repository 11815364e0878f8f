"""The audit writer process: group commit across frames, exactly-once appends, restarts, signals."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from llm_warden.proxy.audit.verify import verify_db
from llm_warden.proxy.audit.writer import AppendResult, Batch, WriterError, append_parts, append_tx, frame
from llm_warden.proxy.audit.writer_process import _Frame
from tests.proxy.audit.conftest import LogFactory
from tests.proxy.audit.helpers import make_exchange


def _count(path: Path, where: str = "1") -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM records WHERE {where}").fetchone()[0])
    finally:
        conn.close()


async def test_append_tx_skips_a_batch_it_already_committed(make_log: LogFactory, tmp_path: Path) -> None:
    log = await make_log(tmp_path / "dup.db")
    preps = [log.projector.exchange(make_exchange(request_id=f"dup_{i}")) for i in range(3)]
    key, origin = log._key, log.origin
    assert key is not None
    await log.stop()
    rows = [[p.ts_us, p.kind, p.request_id, p.tenant, p.subject, p.tools, p.call_ids, p.status, len(p.body)] for p in preps]
    conn = sqlite3.connect(log.path, isolation_level=None)
    first = append_tx(conn, [Batch(1, rows[:2], [p.body for p in preps[:2]])], origin, key, 1000, "writer:t")
    # Batch 1 again (its answer was lost) together with a new batch 2: only batch 2 is appended.
    again = append_tx(
        conn, [Batch(1, rows[:2], [p.body for p in preps[:2]]), Batch(2, rows[2:], [preps[2].body])], origin, key, 1000, "writer:t"
    )
    conn.close()
    assert first[2] == set() and again[2] == {1}
    assert again[1] == first[1] + 1
    assert _count(log.path, "request_id LIKE 'dup_%'") == 3
    report = await verify_db(log.path)
    assert report.ok, report.render()


async def test_a_resent_frame_is_answered_dup_and_not_written_twice(make_log: LogFactory) -> None:
    log = await make_log(durability="sync")
    wp = log._wp
    assert wp is not None
    prep = log.projector.exchange(make_exchange(request_id="once"))
    res = await wp.append([prep])
    assert not res.dup
    # Send the very same frame (same batch id) again, as a restart would after a lost answer.
    bid = wp._next_id
    fut: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
    wp._frames[bid] = _Frame(bid, append_parts(bid, [prep], None), 1, fut)
    wp._send(wp._frames[bid])
    again = await asyncio.wait_for(fut, 10)
    assert again.dup
    await log.stop()
    assert _count(log.path, "request_id = 'once'") == 1


async def test_frames_sent_during_a_commit_share_the_next_one(make_log: LogFactory) -> None:
    log = await make_log(durability="sync")
    wp = log._wp
    assert wp is not None
    commits: list[tuple[float, int]] = []
    wp.on_commit = lambda s, n: commits.append((s, n))
    blocker = sqlite3.connect(log.path, timeout=10, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the writer's first commit waits for this lock
    futs = [wp.submit([log.projector.exchange(make_exchange(request_id=f"grp_{i}"))]) for i in range(20)]
    await asyncio.sleep(0.3)
    blocker.execute("ROLLBACK")
    blocker.close()
    results = await asyncio.wait_for(asyncio.gather(*futs), 20)
    assert sum(n for _, n in commits) == 20
    assert len(commits) <= 3, f"20 frames took {len(commits)} commits"
    assert [r.seq for r in results] == sorted(r.seq for r in results)
    await log.stop()
    report = await verify_db(log.path)
    assert report.ok and report.records == 20, report.render()


async def test_a_malformed_frame_fails_alone(make_log: LogFactory) -> None:
    log = await make_log(durability="sync")
    wp = log._wp
    assert wp is not None
    p = log.projector.exchange(make_exchange(request_id="bad"))
    row = [p.ts_us, p.kind, p.request_id, p.tenant, p.subject, p.tools, p.call_ids, p.status, len(p.body)]
    # The header promises more body bytes than the frame carries: refused, and the writer keeps going.
    data = frame({"op": "append", "id": 998, "reason": None, "rows": [row]}, p.body[:-10])
    fut: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
    wp._frames[998] = _Frame(998, [data], 1, fut)
    wp._send(wp._frames[998])
    with pytest.raises(WriterError, match="bodies do not match"):
        await asyncio.wait_for(fut, 10)
    await log.record_exchange(make_exchange(request_id="after_bad"))
    assert await log.find("after_bad") is not None
    assert await log.find("bad") is None


async def test_the_writer_ignores_sigint_and_sigterm(make_log: LogFactory) -> None:
    """A Ctrl-C to the process group must not cut the writer short: the server drains, then stops it."""
    log = await make_log(durability="sync")
    pid = log.writer_pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    await asyncio.sleep(0.1)
    await log.record_exchange(make_exchange(request_id="still_here"))
    assert log.writer_pid == pid
    assert log._wp is not None and log._wp.restarts == 0


async def test_unanswered_frames_go_to_the_new_writer_in_order(make_log: LogFactory) -> None:
    log = await make_log(durability="batch", batch_max_ms=0)
    pid, wp = log.writer_pid, log._wp
    assert pid is not None and wp is not None
    blocker = sqlite3.connect(log.path, timeout=10, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # frames pile up unanswered behind the lock
    for i in range(30):
        await log.record_exchange(make_exchange(request_id=f"order_{i:02d}"))
    await asyncio.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.1)
    blocker.execute("ROLLBACK")
    blocker.close()
    await log.stop()
    assert wp.restarts == 1
    conn = sqlite3.connect(log.path)
    ids = [r[0] for r in conn.execute("SELECT request_id FROM records WHERE kind = 'exchange' ORDER BY seq")]
    conn.close()
    assert ids == [f"order_{i:02d}" for i in range(30)]
    report = await verify_db(log.path)
    assert report.ok, report.render()


async def test_stop_forgets_the_batch_marker(make_log: LogFactory) -> None:
    log = await make_log(durability="sync")
    await log.record_exchange(make_exchange())
    conn = sqlite3.connect(log.path)
    assert conn.execute("SELECT COUNT(*) FROM meta WHERE key LIKE 'writer:%'").fetchone()[0] == 1
    await log.stop()
    assert conn.execute("SELECT COUNT(*) FROM meta WHERE key LIKE 'writer:%'").fetchone()[0] == 0
    conn.close()
