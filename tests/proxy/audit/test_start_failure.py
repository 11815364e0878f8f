"""A start that fails after the audit store started stops the store (and reaps its writer) before the error propagates."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from llm_warden.proxy.app import Warden
from llm_warden.proxy.audit.sqlite import SQLiteAuditLog, build_audit
from llm_warden.proxy.config import load_config
from llm_warden.proxy.plugin import Plugin, PluginContext, available_plugins
from tests.conftest import Keys
from tests.fakeprovider import FakeProvider
from tests.proxy.audit.test_crash import _running
from tests.proxy.test_serve import free_port, write_config


class BrokenAtStart(Plugin):
    """A plugin whose start fails (after taking a resource it must give back in stop)."""

    name = "broken_at_start"
    stopped = 0
    writer_pid: int | None = None

    async def start(self, ctx: PluginContext) -> None:
        type(self).writer_pid = ctx.services["audit"].writer_pid  # the store started before the plugins
        raise RuntimeError("cannot reach the policy server")

    async def stop(self) -> None:
        type(self).stopped += 1


async def test_a_plugin_failing_at_start_stops_the_audit_store(base_config: dict[str, Any], tmp_path: Path) -> None:
    data = {**base_config, "audit": {"enabled": True, "path": str(tmp_path / "audit.db")}, "plugins": {"enabled": ["headers", "broken_at_start"]}}
    classes = {**available_plugins(), "broken_at_start": BrokenAtStart}
    cfg = load_config(data, classes)
    cfg.base_dir = tmp_path
    audit = build_audit(cfg)
    assert isinstance(audit, SQLiteAuditLog)
    threads_before = {t.ident for t in threading.enumerate()}
    w = Warden(cfg, classes, audit=audit)
    BrokenAtStart.stopped = 0
    BrokenAtStart.writer_pid = None
    with pytest.raises(RuntimeError, match="policy server"):
        await w.start()
    writer = BrokenAtStart.writer_pid
    assert writer is not None
    assert not w.ready
    assert audit.writer_pid is None and not audit.healthy
    assert not _running(writer), "the audit writer child was reaped"
    assert BrokenAtStart.stopped == 1, "the failing plugin's stop ran, so it can release what it opened"
    # The event loop's executor threads (asyncio_N) are joined at exit; aiosqlite's connection threads are not.
    new_threads = [t for t in threading.enumerate() if t.ident not in threads_before and not t.daemon and not t.name.startswith("asyncio_")]
    for t in new_threads:
        await asyncio.to_thread(t.join, 5)  # a closed connection's thread ends a moment after close()
    left = [t for t in new_threads if t.is_alive()]
    assert not left, f"threads left that would hold the process open: {left}"
    # The store closed cleanly: the log verifies, nothing unsealed.
    from llm_warden.proxy.audit.verify import verify_db

    report = await verify_db(tmp_path / "audit.db")
    assert report.ok and not [f for f in report.findings if f.severity == "warning"], report.render()


async def test_warden_serve_with_a_plugin_failing_at_start_exits_promptly(tmp_path: Path, fake: FakeProvider, rsa_keys: Keys) -> None:
    """A real plugin start failure (the idempotency database cannot be opened) with the audit log on."""
    (tmp_path / "idem.db").mkdir()  # a directory where the limits plugin wants its SQLite file
    cfg = tmp_path / "config.toml"
    write_config(cfg, fake, rsa_keys, free_port(), free_port(), extra='[limits]\nidempotency_db = "idem.db"\n')
    text = cfg.read_text().replace("[audit]\nenabled = false", f'[audit]\npath = "{tmp_path / "audit.db"}"')
    cfg.write_text(text.replace('enabled = ["headers"]', 'enabled = ["headers", "limits"]'))
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_warden.proxy", "serve", "--config", str(cfg), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1, out.decode()[-2000:]
    assert time.monotonic() - t0 < 20
    assert b"plugin limits failed to start" in out and b"unable to open database file" in out
    assert b"Traceback" not in out
