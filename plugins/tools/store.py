"""Persistent tool state in SQLite: approvals and the read-only switch.

Everything goes through one ``aiosqlite`` connection (its own thread), so the
event loop never blocks.  State changes commit with ``synchronous=FULL``: an
approval or a mode flip that was acknowledged survives a power cut.  Several
worker processes may share the file: every state change is a single
conditional statement (an approval is consumed by exactly one caller), and
readers notice other writers through ``PRAGMA data_version``.

An approval's ``status`` column is one of ``pending``, ``approved``,
``denied`` or ``consumed``; ``expired`` is derived (pending or approved past
``expires``).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import aiosqlite
import orjson

from llm_warden.proxy.errors import ServiceUnavailable

ApprovalStatus = Literal["pending", "approved", "denied", "consumed", "expired"]
LIST_STATUSES = ("pending", "approved", "denied", "consumed", "expired", "all")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tool_approvals (
    id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    tenant TEXT NOT NULL,
    subject TEXT NOT NULL,
    principal TEXT NOT NULL,
    tool TEXT NOT NULL,
    arguments TEXT NOT NULL,
    request_id TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    decided_at REAL,
    reviewer TEXT,
    comment TEXT,
    consumed_at REAL,
    consumed_request_id TEXT
);
CREATE INDEX IF NOT EXISTS tool_approvals_fp ON tool_approvals(fingerprint, created);
CREATE INDEX IF NOT EXISTS tool_approvals_status ON tool_approvals(status, expires);
CREATE TABLE IF NOT EXISTS tool_mode (
    kind TEXT NOT NULL,
    tenant TEXT NOT NULL,
    read_only INTEGER NOT NULL,
    updated REAL NOT NULL,
    actor TEXT NOT NULL,
    PRIMARY KEY (kind, tenant)
);
"""

_COLUMNS = (
    "id, fingerprint, tenant, subject, principal, tool, arguments, request_id, status, created, expires, "
    "decided_at, reviewer, comment, consumed_at, consumed_request_id"
)


@dataclass(slots=True)
class Approval:
    """One approval request and its fate."""

    id: str
    fingerprint: str
    tenant: str
    subject: str
    principal: dict[str, Any]
    tool: str
    arguments: str
    request_id: str
    status: str
    created: float
    expires: float
    decided_at: float | None = None
    reviewer: dict[str, Any] | None = None
    comment: str | None = None
    consumed_at: float | None = None
    consumed_request_id: str | None = None

    def effective_status(self, now: float) -> ApprovalStatus:
        """``status``, with pending/approved past ``expires`` reported as ``expired``."""
        if self.status in ("pending", "approved") and self.expires <= now:
            return "expired"
        return self.status  # type: ignore[return-value]

    def to_json(self, now: float) -> dict[str, Any]:
        """The approval as shown by the admin API."""
        return {
            "id": self.id,
            "status": self.effective_status(now),
            "tool": self.tool,
            "arguments": orjson.loads(self.arguments),
            "principal": self.principal,
            "fingerprint": self.fingerprint,
            "request_id": self.request_id,
            "created": self.created,
            "expires": self.expires,
            "decided_at": self.decided_at,
            "reviewer": self.reviewer,
            "comment": self.comment,
            "consumed_at": self.consumed_at,
            "consumed_request_id": self.consumed_request_id,
        }


def _row(r: Any) -> Approval:
    return Approval(
        id=r[0],
        fingerprint=r[1],
        tenant=r[2],
        subject=r[3],
        principal=orjson.loads(r[4]),
        tool=r[5],
        arguments=r[6],
        request_id=r[7],
        status=r[8],
        created=r[9],
        expires=r[10],
        decided_at=r[11],
        reviewer=orjson.loads(r[12]) if r[12] else None,
        comment=r[13],
        consumed_at=r[14],
        consumed_request_id=r[15],
    )


def new_pending(fingerprint: str, principal: dict[str, Any], tool: str, arguments: str, request_id: str, now: float, ttl_s: float) -> Approval:
    """A new pending approval (both stores record it the same way)."""
    return Approval(
        id=new_approval_id(),
        fingerprint=fingerprint,
        tenant=str(principal.get("tenant", "")),
        subject=str(principal.get("subject", "")),
        principal=principal,
        tool=tool,
        arguments=arguments,
        request_id=request_id,
        status="pending",
        created=now,
        expires=now + ttl_s,
    )


def new_approval_id() -> str:
    """``apr_`` followed by 20 random URL-safe characters."""
    return "apr_" + secrets.token_urlsafe(15)


@dataclass(slots=True)
class ModeSetting:
    """A persisted read-only setting (global or for one tenant)."""

    read_only: bool
    updated: float
    actor: dict[str, Any]


class StateBackendDown(ServiceUnavailable):
    """The shared state backend (Redis) cannot be reached; names ``policy.state_backend``.

    Admin routes answer 503; the judge turns it into a refusal of the call.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, rule="policy.state_backend")


class ToolStore(Protocol):
    """What the judge, the plugin and the admin API need from a state store.

    Implemented by :class:`ToolStateStore` (SQLite) and
    :class:`plugins.tools.redis_store.RedisToolStateStore`.
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def changed_elsewhere(self) -> bool: ...

    async def load_modes(self) -> tuple[ModeSetting | None, dict[str, ModeSetting]]: ...

    async def set_mode(self, tenant: str | None, read_only: bool | None, actor: dict[str, Any]) -> None: ...

    async def latest_for(self, fingerprint: str) -> Approval | None: ...

    async def create(
        self,
        *,
        fingerprint: str,
        principal: dict[str, Any],
        tool: str,
        arguments: str,
        request_id: str,
        ttl_s: float,
        now: float | None = None,
    ) -> Approval: ...

    async def consume(self, approval_id: str, request_id: str, now: float | None = None) -> bool: ...

    async def decide(
        self,
        approval_id: str,
        verdict: Literal["approved", "denied"],
        reviewer: dict[str, Any],
        comment: str,
        ttl_s: float,
        now: float | None = None,
    ) -> bool: ...

    async def get(self, approval_id: str) -> Approval | None: ...

    async def list(self, status: str, limit: int = 200, now: float | None = None, tenant: str | None = None) -> list[Approval]: ...

    async def pending_count(self, now: float | None = None) -> int: ...


class ToolStateStore:
    """Approvals and read-only mode in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db: aiosqlite.Connection | None = None
        self._data_version: int | None = None

    async def open(self) -> None:
        """Open (creating if needed) the database."""
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA busy_timeout=5000")
            await db.executescript(_SCHEMA)
            await db.commit()
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("tool state store is not open")
        return self._db

    async def changed_elsewhere(self) -> bool:
        """True when another connection committed since the last call."""
        async with self.db.execute("PRAGMA data_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        changed = self._data_version is not None and version != self._data_version
        self._data_version = version
        return changed

    # -- read-only mode -------------------------------------------------

    async def load_modes(self) -> tuple[ModeSetting | None, dict[str, ModeSetting]]:
        """The persisted global setting (or ``None``) and the per-tenant ones."""
        glob: ModeSetting | None = None
        tenants: dict[str, ModeSetting] = {}
        async with self.db.execute("SELECT kind, tenant, read_only, updated, actor FROM tool_mode") as cur:
            async for kind, tenant, ro, updated, actor in cur:
                setting = ModeSetting(bool(ro), updated, orjson.loads(actor))
                if kind == "global":
                    glob = setting
                else:
                    tenants[tenant] = setting
        return glob, tenants

    async def set_mode(self, tenant: str | None, read_only: bool | None, actor: dict[str, Any]) -> None:
        """Persist a setting; ``read_only=None`` removes it (back to the default)."""
        kind, key = ("global", "") if tenant is None else ("tenant", tenant)
        if read_only is None:
            await self.db.execute("DELETE FROM tool_mode WHERE kind = ? AND tenant = ?", (kind, key))
        else:
            await self.db.execute(
                "INSERT INTO tool_mode (kind, tenant, read_only, updated, actor) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(kind, tenant) DO UPDATE SET read_only = excluded.read_only, updated = excluded.updated, actor = excluded.actor",
                (kind, key, int(read_only), time.time(), orjson.dumps(actor).decode()),
            )
        await self.db.commit()

    # -- approvals ------------------------------------------------------

    async def latest_for(self, fingerprint: str) -> Approval | None:
        """The most recent approval for this fingerprint."""
        async with self.db.execute(
            f"SELECT {_COLUMNS} FROM tool_approvals WHERE fingerprint = ? ORDER BY created DESC LIMIT 1", (fingerprint,)
        ) as cur:
            row = await cur.fetchone()
        return _row(row) if row else None

    async def create(
        self,
        *,
        fingerprint: str,
        principal: dict[str, Any],
        tool: str,
        arguments: str,
        request_id: str,
        ttl_s: float,
        now: float | None = None,
    ) -> Approval:
        """Record a new pending approval."""
        now = time.time() if now is None else now
        apr = new_pending(fingerprint, principal, tool, arguments, request_id, now, ttl_s)
        await self.db.execute(
            f"INSERT INTO tool_approvals ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL, NULL)",
            (
                apr.id,
                apr.fingerprint,
                apr.tenant,
                apr.subject,
                orjson.dumps(principal).decode(),
                tool,
                arguments,
                request_id,
                "pending",
                apr.created,
                apr.expires,
            ),
        )
        await self.db.commit()
        return apr

    async def consume(self, approval_id: str, request_id: str, now: float | None = None) -> bool:
        """Use an approved, unexpired approval once; ``False`` if someone else did."""
        now = time.time() if now is None else now
        cur = await self.db.execute(
            "UPDATE tool_approvals SET status = 'consumed', consumed_at = ?, consumed_request_id = ? "
            "WHERE id = ? AND status = 'approved' AND expires > ?",
            (now, request_id, approval_id, now),
        )
        await self.db.commit()
        return cur.rowcount == 1

    async def decide(
        self,
        approval_id: str,
        verdict: Literal["approved", "denied"],
        reviewer: dict[str, Any],
        comment: str,
        ttl_s: float,
        now: float | None = None,
    ) -> bool:
        """Approve or deny a pending, unexpired approval; ``False`` if it was not.

        An approval is usable for ``ttl_s`` from the moment it is granted; a
        denial is remembered for ``ttl_s`` (the same call is refused meanwhile).
        """
        now = time.time() if now is None else now
        cur = await self.db.execute(
            "UPDATE tool_approvals SET status = ?, decided_at = ?, reviewer = ?, comment = ?, expires = ? "
            "WHERE id = ? AND status = 'pending' AND expires > ?",
            (verdict, now, orjson.dumps(reviewer).decode(), comment, now + ttl_s, approval_id, now),
        )
        await self.db.commit()
        return cur.rowcount == 1

    async def get(self, approval_id: str) -> Approval | None:
        async with self.db.execute(f"SELECT {_COLUMNS} FROM tool_approvals WHERE id = ?", (approval_id,)) as cur:
            row = await cur.fetchone()
        return _row(row) if row else None

    async def list(self, status: str, limit: int = 200, now: float | None = None, tenant: str | None = None) -> list[Approval]:
        """Approvals with this (effective) status, newest first (of one tenant when ``tenant`` is given)."""
        now = time.time() if now is None else now
        where: str
        params: tuple[float | str, ...]
        where, params = {
            "pending": ("status = 'pending' AND expires > ?", (now,)),
            "approved": ("status = 'approved' AND expires > ?", (now,)),
            "denied": ("status = 'denied'", ()),
            "consumed": ("status = 'consumed'", ()),
            "expired": ("status IN ('pending', 'approved') AND expires <= ?", (now,)),
            "all": ("1 = 1", ()),
        }[status]
        if tenant is not None:
            where, params = f"({where}) AND tenant = ?", (*params, tenant)
        async with self.db.execute(
            f"SELECT {_COLUMNS} FROM tool_approvals WHERE {where} ORDER BY created DESC LIMIT ?", (*params, limit)
        ) as cur:
            rows = await cur.fetchall()
        return [_row(r) for r in rows]

    async def pending_count(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        async with self.db.execute("SELECT count(*) FROM tool_approvals WHERE status = 'pending' AND expires > ?", (now,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0
