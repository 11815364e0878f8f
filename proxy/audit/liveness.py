"""Whether a Warden is writing a SQLite audit log right now.

Every running SQLite audit store holds a shared ``flock`` on ``<db>.live``
for as long as it is open (several worker processes sharing one database each
hold one).  The kernel drops the lock when the process ends, however it ends
(SIGKILL included), so ``warden audit verify`` can tell a log that is being
written — whose newest records are simply not sealed by a checkpoint yet —
from one left by an unclean stop: it asks for an exclusive lock without
waiting, and a refusal means a live writer.

``flock`` is per host: a Warden on another machine writing the same file
over a network filesystem is not seen (SQLite over a network filesystem is
unsafe anyway).  PostgreSQL chains have their own signal: each writer holds
an advisory lock keyed by its origin (:mod:`proxy.audit.pg_chain`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def live_path(db: Path) -> Path:
    """The lock file beside the audit database ``db``."""
    return db.with_name(db.name + ".live")


class LiveLock:
    """The shared lock a running audit store holds on ``<db>.live``."""

    def __init__(self, db: Path) -> None:
        self.path = live_path(db)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (at a clean stop; the kernel does the same when the process dies)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def writer_running(db: Path) -> bool:
    """True when a process on this host has the audit database ``db`` open for writing."""
    try:
        fd = os.open(live_path(db), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the exclusive lock when it was granted
    return False
