"""Review of the audit writer process: exactly-once across restarts, hygiene, backpressure."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.proxy.audit.conftest import LogFactory
from tests.proxy.audit.helpers import make_exchange


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
