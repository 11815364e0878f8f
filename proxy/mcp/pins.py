"""Tool descriptions are untrusted: each tool's description and input schema are pinned by digest.

The digest of a tool is ``sha256:`` and the SHA-256 of the canonical JSON
(sorted keys, no spaces) of ``{"description", "inputSchema"}`` as the
upstream server lists it.  A tool is shown and may be called only while its
digest is accepted: pinned in the config (``[[mcp.servers]] pins``) or
accepted by an operator through the admin API (kept in ``[mcp] pin_db``,
every acceptance audited).  A changed description or schema (a "rug pull")
hides the tool and refuses its calls (rule ``mcp.pin``) until an operator
accepts the new digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal

import orjson

Status = Literal["accepted", "changed", "unpinned"]


def tool_digest(tool: dict[str, Any]) -> str:
    """The digest of one upstream tool entry (its description and input schema)."""
    doc = {"description": tool.get("description"), "inputSchema": tool.get("inputSchema")}
    try:
        raw = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        raw = repr(doc).encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


class PinStore:
    """Operator-accepted digests (SQLite) and the digests last seen from each server (memory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.accepted: dict[tuple[str, str], str] = {}
        self.seen: dict[tuple[str, str], str] = {}
        """(server, tool) → the digest the upstream listed last on this replica."""
        self._lock = asyncio.Lock()

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.execute("CREATE TABLE IF NOT EXISTS mcp_pins (server TEXT NOT NULL, tool TEXT NOT NULL, digest TEXT NOT NULL, accepted_by TEXT NOT NULL, accepted_at REAL NOT NULL, PRIMARY KEY (server, tool))")
        return db

    def _load(self) -> dict[tuple[str, str], str]:
        db = self._db()
        try:
            return {(s, t): d for s, t, d in db.execute("SELECT server, tool, digest FROM mcp_pins")}
        finally:
            db.close()

    async def load(self) -> None:
        self.accepted = await asyncio.to_thread(self._load)

    def _accept(self, server: str, tool: str, digest: str, actor: str) -> None:
        db = self._db()
        try:
            with db:
                db.execute(
                    "INSERT INTO mcp_pins VALUES (?, ?, ?, ?, ?) ON CONFLICT (server, tool) DO UPDATE SET digest = excluded.digest, accepted_by = excluded.accepted_by, accepted_at = excluded.accepted_at",
                    (server, tool, digest, actor, time.time()),
                )
        finally:
            db.close()

    async def accept(self, server: str, tool: str, digest: str, actor: str) -> str | None:
        """Accept ``digest`` for the tool; returns the digest it replaces."""
        async with self._lock:
            await asyncio.to_thread(self._accept, server, tool, digest, actor)
            previous = self.accepted.get((server, tool))
            self.accepted[(server, tool)] = digest
            return previous

    def status(self, server: str, tool: str, digest: str, config_pin: str | None) -> Status:
        stored = self.accepted.get((server, tool))
        if digest == config_pin or digest == stored:
            return "accepted"
        if config_pin is not None or stored is not None:
            return "changed"
        return "unpinned"
