"""Fixtures for the audit tests: a started SQLite audit log in a temp dir."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from llm_warden.proxy.audit.sqlite import SQLiteAuditLog
from llm_warden.proxy.config import AuditConfig

LogFactory = Callable[..., Awaitable[SQLiteAuditLog]]


@pytest.fixture
async def make_log(tmp_path: Path) -> AsyncIterator[LogFactory]:
    logs: list[SQLiteAuditLog] = []

    async def _make(path: Path | None = None, *, upstream_key: str | None = None, **cfg: Any) -> SQLiteAuditLog:
        log = SQLiteAuditLog(AuditConfig(**cfg), path or tmp_path / "audit.db", upstream_key=upstream_key, provider="openai")
        await log.start()
        logs.append(log)
        return log

    yield _make
    for log in logs:
        await log.stop()
