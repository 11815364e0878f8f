"""Review of the audit writer process: exactly-once across restarts, hygiene, backpressure."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import types
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from llm_warden.proxy.audit import writer_process as writer_mod
from llm_warden.proxy.audit.sqlite import SQLiteAuditLog
from llm_warden.proxy.audit.verify import verify_db
from llm_warden.proxy.audit.writer import WriterGone
from llm_warden.proxy.errors import AuditUnavailable
from tests.proxy.audit.conftest import LogFactory
from tests.proxy.audit.helpers import make_exchange, writes_fail

ROOT = Path(__file__).resolve().parents[3]


def _ids(path: Path, like: str) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT request_id FROM records WHERE request_id LIKE ? ORDER BY seq", (like,))]
    finally:
        conn.close()


@pytest.fixture
def review_child(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Start ``tests.proxy.audit.review_child`` as the writer; returns its hook files (write a count to arm one)."""
    real = subprocess.Popen

    def popen(args: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        args = ["tests.proxy.audit.review_child" if a == "llm_warden.proxy.audit.writer" else a for a in args]
        return real(args, **kw)

    monkeypatch.setattr(writer_mod, "subprocess", types.SimpleNamespace(Popen=popen, DEVNULL=subprocess.DEVNULL, TimeoutExpired=subprocess.TimeoutExpired))
    hooks = {"die_after_commit": tmp_path / "die_after_commit", "exit_after_init": tmp_path / "exit_after_init"}
    monkeypatch.setenv("WARDEN_REVIEW_DIE_AFTER_COMMIT", str(hooks["die_after_commit"]))
    monkeypatch.setenv("WARDEN_REVIEW_EXIT_AFTER_INIT", str(hooks["exit_after_init"]))
    yield hooks


@contextlib.asynccontextmanager
async def _fails_not_hangs(log: SQLiteAuditLog) -> AsyncIterator[None]:
    """On a failure, settle what a regression left unsettled, so that the fixture's stop() ends instead of hanging."""
    try:
        yield
    except BaseException:
        if log._wp is not None:
            log._wp._restart = None
            log._wp._fail_all(WriterGone("the test failed"))
        for fut in list(log._inflight):
            if not fut.done():
                fut.set_result(None)
        log._inflight.clear()
        log._inflight_records = 0
        raise


async def _until(cond: Any, within_s: float = 10.0) -> None:
    for _ in range(int(within_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_a_writer_whose_socket_has_a_high_fd_number_works(make_log: LogFactory) -> None:
    """The child keeps the fd number it was passed; a busy server (many connections) hands it one above 1023.

    ``select.select`` refuses such fds, so every such child died on its first append: after a restart under
    load the audit log was down for good (sync: every request 503).
    """
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        log = await make_log(durability="sync")
        await asyncio.wait_for(log.record_exchange(make_exchange(request_id="high_fd")), 20)
        assert log.writer_restarts == 0
        assert await log.find("high_fd") is not None
    finally:
        for fd in fds:
            os.close(fd)


async def test_a_committed_frame_is_not_written_twice_when_the_restart_fails(
    make_log: LogFactory, review_child: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch mode: the writer commits a frame and dies before answering; the first restart fails.

    The frame's outcome is known (the batch marker), so it must not go to the retry list as new records.
    """
    log = await make_log(durability="batch", batch_max_ms=0)
    wp = log._wp
    assert wp is not None
    real_spawn = wp._spawn
    spawns = 0

    async def spawn_failing_once() -> None:
        nonlocal spawns
        spawns += 1
        if spawns == 1:
            raise WriterGone("the audit writer did not start")
        await real_spawn()

    monkeypatch.setattr(wp, "_spawn", spawn_failing_once)
    review_child["die_after_commit"].write_text("1")
    await log.record_exchange(make_exchange(request_id="once_a"))
    await _until(lambda: spawns >= 1 and log._wp is not None and log._wp._restart is None and log.queue_depth == 0 and log.healthy)
    await log.record_exchange(make_exchange(request_id="once_b"))
    await log.stop()
    assert _ids(log.path, "once_%") == ["once_a", "once_b"]
    report = await verify_db(log.path)
    assert report.ok, report.render()


async def test_a_committed_frame_that_outlived_two_writers_is_not_written_twice(make_log: LogFactory, review_child: dict[str, Path]) -> None:
    """Batch mode: writer 1 commits a frame and dies unanswered, writer 2 finds it committed and dies unanswered too.

    After ``MAX_SENDS`` the frame is settled without a third send; it was committed, so it must not be retried.
    """
    log = await make_log(durability="batch", batch_max_ms=0)
    review_child["die_after_commit"].write_text("2")
    await log.record_exchange(make_exchange(request_id="twice_a"))
    await _until(lambda: log.writer_restarts >= 2 and log.queue_depth == 0 and log.healthy)
    await log.record_exchange(make_exchange(request_id="twice_b"))
    await log.stop()
    assert _ids(log.path, "twice_%") == ["twice_a", "twice_b"]


async def test_sync_caller_of_a_committed_frame_is_released_after_two_writer_deaths(make_log: LogFactory, review_child: dict[str, Path]) -> None:
    """Sync mode, same story: the record is committed, so the request must not get a 503 for it."""
    log = await make_log(durability="sync")
    review_child["die_after_commit"].write_text("2")
    await asyncio.wait_for(log.record_exchange(make_exchange(request_id="sync_twice")), 20)
    await log.stop()
    assert _ids(log.path, "sync_twice") == ["sync_twice"]


async def test_a_writer_that_exits_right_after_it_started_does_not_strand_frames(
    make_log: LogFactory, review_child: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted writer that ends between its init answer and the resend must be replaced, not written to.

    Before: the end of the stream was read while the restart was still in progress, so no further restart was
    scheduled; the unanswered frames were "resent" into the dead socket and their callers waited forever (and
    so did stop()).
    """
    log = await make_log(durability="sync")
    pid = log.writer_pid
    assert pid is not None
    review_child["exit_after_init"].write_text("1")
    # Make the race certain: hold the loop for a moment after the init answer arrives, so that the end of the
    # stream is there at the next poll (as on a busy machine).
    real_feed = asyncio.StreamReader.feed_data
    armed = False

    def slow_feed(self: asyncio.StreamReader, data: bytes) -> None:
        nonlocal armed
        real_feed(self, data)
        if armed:
            armed = False
            time.sleep(0.1)

    monkeypatch.setattr(asyncio.StreamReader, "feed_data", slow_feed)
    blocker = sqlite3.connect(log.path, timeout=10, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    call = asyncio.ensure_future(log.record_exchange(make_exchange(request_id="stranded")))
    await asyncio.sleep(0.2)
    armed = True
    os.kill(pid, signal.SIGKILL)
    blocker.execute("ROLLBACK")
    blocker.close()
    async with _fails_not_hangs(log):
        with contextlib.suppress(AuditUnavailable):
            await asyncio.wait_for(call, 10)
        await asyncio.wait_for(log.record_exchange(make_exchange(request_id="after_stranded")), 10)
        await asyncio.wait_for(log.stop(), 10)
    assert "after_stranded" in _ids(log.path, "%stranded")


async def test_a_restart_that_cannot_make_a_socket_fails_closed(make_log: LogFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE while restarting: requests get 503 (and the next restart works), they do not hang forever."""
    log = await make_log(durability="sync")
    pid = log.writer_pid
    assert pid is not None
    real = socket.socketpair
    calls = 0

    def socketpair_emfile_once(*a: Any) -> tuple[socket.socket, socket.socket]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(24, "Too many open files")
        return real(*a)

    monkeypatch.setattr(writer_mod.socket, "socketpair", socketpair_emfile_once)
    os.kill(pid, signal.SIGKILL)
    async with _fails_not_hangs(log):
        with pytest.raises(AuditUnavailable):
            await asyncio.wait_for(log.record_exchange(make_exchange(request_id="emfile")), 10)
        await asyncio.wait_for(log.record_exchange(make_exchange(request_id="after_emfile")), 10)
        await asyncio.wait_for(log.stop(), 10)


async def test_a_cancelled_answer_reader_does_not_kill_the_writer(make_log: LogFactory) -> None:
    """Cancelling the answer reader (the event loop shutting down without stop()) is not a dead writer.

    Before: the reader's ``finally`` scheduled a restart, whose first step SIGKILLs the running child —
    losing every frame it had been sent (docs: the writer commits what it was sent).
    """
    log = await make_log(durability="batch", batch_max_ms=0)
    wp = log._wp
    assert wp is not None and wp._listen is not None
    pid = wp.pid
    await asyncio.sleep(wp.RESTART_GAP_S)
    wp._listen.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await wp._listen
    await asyncio.sleep(0.3)
    assert wp._restart is None
    assert wp.restarts == 0 and wp.pid == pid


_NO_STOP = """
import asyncio, os, sqlite3, sys
from pathlib import Path
from llm_warden.proxy.audit.sqlite import SQLiteAuditLog
from llm_warden.proxy.config import AuditConfig
from tests.proxy.audit.helpers import make_exchange

async def main(path):
    log = SQLiteAuditLog(AuditConfig(durability="batch", batch_max_ms=0), Path(path))
    await log.start()
    blocker = sqlite3.connect(path, timeout=10, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    for i in range(50):
        await log.record_exchange(make_exchange(request_id=f"nostop_{i:02d}"))
    await asyncio.sleep(1.0)  # sent, waiting for the lock; a restart would not wait
    assert log.queue_depth == 50
    blocker.execute("ROLLBACK")
    blocker.close()
    # the loop ends without stop(): the writer has been sent 50 records

asyncio.run(main(sys.argv[1]))
os._exit(0)  # unclosed aiosqlite connections (non-daemon threads) would keep the interpreter from exiting
"""


async def test_an_event_loop_closed_without_stop_leaves_the_writer_to_commit(tmp_path: Path) -> None:
    db = tmp_path / "nostop.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _NO_STOP, str(db), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert b"not running; starting a new one" not in err, err.decode()
    for _ in range(500):
        if len(_ids(db, "nostop_%")) == 50:
            break
        await asyncio.sleep(0.02)
    assert _ids(db, "nostop_%") == [f"nostop_{i:02d}" for i in range(50)]


async def test_retry_wakeups_do_not_fill_the_queue(make_log: LogFactory) -> None:
    """Batch mode, store down: each failed retry used to put a wake-up into the queue while the writer task was
    busy retrying, so the queue filled with sentinels and callers got 503 with no record queued."""
    log = await make_log(durability="batch", batch_max_ms=0, queue_max=3)
    with writes_fail(log):
        await log.record_exchange(make_exchange(request_id="down_0", user_text="y" * 4000))
        await asyncio.sleep(1.2)  # several retries with backoff
        assert not log.healthy
        assert log._queue.qsize() == 0 and log.queue_depth == 1
        await log.record_exchange(make_exchange(request_id="down_1", user_text="y" * 4000))
    await _until(lambda: log.queue_depth == 0 and log.healthy, 20)
    await log.stop()
    assert sorted(_ids(log.path, "down_%")) == ["down_0", "down_1"]


@pytest.mark.parametrize("durability", ["sync", "batch"])
async def test_a_frame_that_cannot_be_built_does_not_wedge_the_store(make_log: LogFactory, monkeypatch: pytest.MonkeyPatch, durability: str) -> None:
    """``WriterProcess.submit`` raising something else than WriterGone (here: a group over 4 GiB, whose length
    does not fit the u32 header) left a future in ``_inflight`` forever (stop() hung) or killed the writer task
    (batch: its records dropped, every later record refused)."""
    real = writer_mod.append_parts
    failed = 0

    def parts(batch_id: int, preps: Any, reason: str | None) -> list[bytes]:
        nonlocal failed
        if failed == 0 and any(p.request_id == "huge" for p in preps):
            failed += 1
            raise struct.error("'I' format requires 0 <= number <= 4294967295")
        return real(batch_id, preps, reason)

    monkeypatch.setattr(writer_mod, "append_parts", parts)
    log = await make_log(durability=durability, batch_max_ms=0)
    async with _fails_not_hangs(log):
        if durability == "sync":
            with pytest.raises(AuditUnavailable):
                await log.record_exchange(make_exchange(request_id="huge"))
        else:
            await log.record_exchange(make_exchange(request_id="huge"))
        await asyncio.wait_for(log.record_exchange(make_exchange(request_id="after_huge")), 10)
        await _until(lambda: log.queue_depth == 0, 10)
        await asyncio.wait_for(log.stop(), 10)
    expected = ["after_huge"] if durability == "sync" else ["after_huge", "huge"]
    assert sorted(_ids(log.path, "%huge")) == expected


async def test_the_signing_key_is_not_in_the_writers_environment(make_log: LogFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/audit.md: the key reaches the writer over the socket, never in its environment (/proc shows that)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = Ed25519PrivateKey.generate().private_bytes_raw()
    monkeypatch.setenv("REVIEW_AUDIT_KEY", base64.b64encode(seed).decode())
    log = await make_log(signing_key_env="REVIEW_AUDIT_KEY")
    pid = log.writer_pid
    assert pid is not None
    environ = await asyncio.to_thread(Path(f"/proc/{pid}/environ").read_bytes)
    assert b"REVIEW_AUDIT_KEY=" not in environ
    assert base64.b64encode(seed) not in environ


async def test_the_writer_ignores_sighup(make_log: LogFactory) -> None:
    """Warden reloads on SIGHUP; a HUP to the process group (a closed terminal, kill -HUP -PGID) must not kill the writer."""
    log = await make_log(durability="sync")
    pid = log.writer_pid
    assert pid is not None
    os.kill(pid, signal.SIGHUP)
    await asyncio.sleep(0.2)
    await log.record_exchange(make_exchange(request_id="after_hup"))
    assert log.writer_pid == pid and log.writer_restarts == 0


async def test_the_writer_does_not_import_from_the_working_directory(
    make_log: LogFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m`` puts the working directory first on sys.path; Warden itself (a console script) does not.

    So a stray or planted ``orjson.py``/``sqlite3.py`` in Warden's working directory ran in the writer — the
    process that holds the signing key.
    """
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "orjson.py").write_text("raise ImportError('imported from the working directory')\n")
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(cwd))])
    log = await make_log(tmp_path / "cwd.db", durability="sync")
    await log.record_exchange(make_exchange(request_id="cwd_ok"))
    assert await log.find("cwd_ok") is not None


async def test_a_writer_that_dies_after_committing_a_group_of_frames_writes_none_twice(
    make_log: LogFactory, review_child: dict[str, Path]
) -> None:
    """Several frames commit in one group and the writer dies before answering any: all are resent, all are
    found committed (the marker), every caller is released, and each record is stored once."""
    log = await make_log(durability="sync")
    blocker = sqlite3.connect(log.path, timeout=10, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the frames pile up and commit as one group
    review_child["die_after_commit"].write_text("1")
    calls = [asyncio.ensure_future(log.record_exchange(make_exchange(request_id=f"grp_{i:02d}"))) for i in range(10)]
    await asyncio.sleep(0.3)
    blocker.execute("ROLLBACK")
    blocker.close()
    await asyncio.wait_for(asyncio.gather(*calls), 20)
    assert log.writer_restarts == 1
    await log.stop()
    assert _ids(log.path, "grp_%") == [f"grp_{i:02d}" for i in range(10)]
    report = await verify_db(log.path)
    assert report.ok, report.render()


async def test_at_most_two_groups_are_in_flight(make_log: LogFactory) -> None:
    """docs/audit.md: besides the queue, at most two groups (2 x batch_max_records) are in flight to the writer.

    The writer task waited only once the in-flight records had reached the limit, so after small groups a full
    one went out on top: up to 3 x batch_max_records - 1.
    """
    log = await make_log(durability="batch", batch_max_records=4, batch_max_ms=0, queue_max=100)
    peak = 0
    real = log._dispatch

    def dispatch(batch: Any) -> Any:
        nonlocal peak
        out = real(batch)
        peak = max(peak, log._inflight_records)
        return out

    log._dispatch = dispatch  # type: ignore[method-assign]
    blocker = sqlite3.connect(log.path, timeout=10, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # nothing commits: every group sent stays in flight
    try:
        for i in range(7):  # seven groups of one
            await log.record_exchange(make_exchange(request_id=f"peak_{i:02d}"))
            await asyncio.sleep(0.02)
        for i in range(7, 15):  # then full groups
            await log.record_exchange(make_exchange(request_id=f"peak_{i:02d}"))
        await asyncio.sleep(0.2)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await _until(lambda: log.queue_depth == 0, 20)
    await log.stop()
    assert peak <= 2 * 4, f"{peak} records in flight"
    assert _ids(log.path, "peak_%") == [f"peak_{i:02d}" for i in range(15)]
