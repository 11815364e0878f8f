"""A SIGKILL mid-load in sync mode loses no acknowledged record, and the log verifies."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from llm_warden.proxy.audit.verify import verify_db
from tests.proxy.audit.conftest import LogFactory

ROOT = Path(__file__).resolve().parents[3]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


async def _wait_exit(pid: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while _running(pid):
        assert time.monotonic() < deadline, f"the orphaned audit writer {pid} did not exit"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("fsync", ["fsync", "no-fsync"])
async def test_sigkill_in_sync_mode_keeps_every_acknowledged_record(tmp_path: Path, make_log: LogFactory, fsync: str) -> None:
    """With or without [audit] fsync: a SIGKILL is a process crash, which WAL with synchronous=NORMAL survives too."""
    db = tmp_path / "crash.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.proxy.audit.crash_writer",
        str(db),
        "8",
        fsync,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    acked: list[str] = []
    assert proc.stdout is not None
    first = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
    assert first[0] == "writer", first
    writer_pid = int(first[1])
    deadline = time.monotonic() + 30
    try:
        while len(acked) < 300 and time.monotonic() < deadline:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if not line:
                break
            acked.append(line.decode().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        rest = await proc.stdout.read()
        await proc.wait()
    acked += [x for x in rest.decode().split("\n") if x.startswith("crash_")]
    assert len(acked) >= 300, "the writer did not get going"
    # The audit writer process outlives its parent only to commit what it was already sent.
    await _wait_exit(writer_pid, 30)

    report = await verify_db(db, checkpoint_file=Path(str(db) + ".checkpoints"))
    assert report.ok, report.render()
    conn = sqlite3.connect(db)
    stored = {r[0] for r in conn.execute("SELECT request_id FROM records")}
    conn.close()
    missing = [r for r in acked if r not in stored]
    assert not missing, f"{len(missing)} acknowledged records were lost"

    # The next start seals the unsealed tail; afterwards verify has no warning left.
    log = await make_log(db, durability="sync", checkpoint_every=50, checkpoint_file=str(db) + ".checkpoints")
    await log.stop()
    report = await verify_db(db, checkpoint_file=Path(str(db) + ".checkpoints"))
    assert report.ok and not [f for f in report.findings if f.severity == "warning"], report.render()
