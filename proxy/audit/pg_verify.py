"""``warden audit verify`` on PostgreSQL: every replica's chain, each walked like the SQLite log.

Each chain gets its own :class:`~proxy.audit.verify.Report` (checked by
:func:`~proxy.audit.verify.check_chain`: the same faults and warnings, and
the first bad record named by its ``seq``); :class:`StoreReport` gathers them
and adds what only a shared store can lose: records of a chain that is not
in ``audit_chains`` (``orphan_records``), and a chain named by a checkpoint
kept elsewhere that the database no longer has (``deleted_chain``).

Everything is read in one ``REPEATABLE READ`` read-only transaction: a
consistent snapshot while replicas keep appending.

Keys: a replica names its checkpoint key after its chain's origin (the
signed-note convention), so one fleet key has a verifier key per chain.
Without ``--key`` the verifier keys stored in ``audit_keys`` are trusted (and
the report says so); with ``--key`` (any chain's verifier key, or the PEM
public key) its public key is trusted for every chain.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from llm_warden.proxy.audit.chain import key_id, parse_verifier_key, public_bytes, read_checkpoint_file
from llm_warden.proxy.audit.pg_chain import lock_key
from llm_warden.proxy.audit.verify import KeyRing, Report, _b, check_chain, keyring


@dataclass(slots=True)
class StoreReport:
    """The verdict on a whole PostgreSQL store: one report per chain, plus store-wide findings."""

    target: str
    chains: list[Report] = field(default_factory=list)
    store: Report = field(default_factory=lambda: Report("store"))

    @property
    def ok(self) -> bool:
        return self.store.ok and all(r.ok for r in self.chains)

    @property
    def records(self) -> int:
        return sum(r.records for r in self.chains)

    def first_fault(self) -> tuple[str, Any] | None:
        """``(origin, Finding)`` of the first fault: store-wide first, then by chain."""
        if self.store.faults:
            return "", self.store.faults[0]
        for r in self.chains:
            if r.faults:
                return r.origin, r.faults[0]
        return None

    def to_dict(self) -> dict[str, Any]:
        first = self.first_fault()
        return {
            "target": self.target,
            "ok": self.ok,
            "records": self.records,
            "first_fault": None if first is None else {"origin": first[0] or None, **first[1].to_dict()},
            "store": self.store.to_dict(),
            "chains": [r.to_dict() for r in self.chains],
        }

    def render(self) -> str:
        lines = [f"audit store {self.target}: {len(self.chains)} chains, {self.records} records"]
        for f in self.store.findings:
            lines.append(f"  {f.severity.upper():7} {f.kind}: {f.message}")
        for r in self.chains:
            span = f"{r.first_seq}..{r.last_seq}" if r.records else "none"
            status = "ok" if r.ok else "FAIL"
            lines.append(f"  chain {r.origin}: {r.records} records (seq {span}), {r.checkpoints} checkpoints, {r.external_checkpoints} external: {status}")
            for f in r.findings:
                where = f" seq {f.seq}" if f.seq is not None else ""
                lines.append(f"    {f.severity.upper():7} {f.kind}{where}: {f.message}")
            if r.suppressed:
                lines.append(f"    ... and {r.suppressed} more findings")
        first = self.first_fault()
        if first is None:
            lines.append("OK: every chain and every checkpoint verify")
        else:
            origin, f = first
            where = f" at seq {f.seq}" if f.seq is not None else ""
            lines.append(f"FAIL: first fault: {f.kind}{where}" + (f" in chain {origin}" if origin else ""))
        return "\n".join(lines)


def fleet_ring(origin: str, trusted: list[str]) -> KeyRing:
    """The trusted public keys as ``origin``'s checkpoint keys (name = origin, key id over it)."""
    ring: KeyRing = {}
    for text in trusted:
        _name, key = parse_verifier_key(text)
        ring[key_id(origin, public_bytes(key))] = (origin, key)
    return ring


def redact_dsn(dsn: str) -> str:
    """The DSN without its password (for reports and messages)."""
    head, sep, tail = dsn.partition("@")
    if not sep or "://" not in head:
        return dsn
    scheme, _, userinfo = head.partition("://")
    return f"{scheme}://{userinfo.split(':', 1)[0]}@{tail}"


async def verify_pg(dsn: str, *, keys: list[str] | None = None, checkpoint_file: Path | None = None) -> StoreReport:
    """Verify every chain of the PostgreSQL audit store at ``dsn``.

    ``keys``: trusted keys (verifier keys or PEM public keys; ``None``: the
    stored ones).  ``checkpoint_file``: notes kept elsewhere, each compared
    with the chain its origin names.
    """
    from llm_warden.proxy.db.migrate import COMPONENTS, check_schema, latest_version

    out = StoreReport(redact_dsn(dsn))
    if keys is not None:
        for k in keys:
            parse_verifier_key(k)  # a bad key is a usage error (ValueError), before anything is read
    notes: dict[str, list[str]] = {}
    if checkpoint_file is not None:
        cf = read_checkpoint_file(checkpoint_file)
        if cf.torn is not None:
            out.store.add("warning", "torn_tail", f"the checkpoint file ends with a partial note ({len(cf.torn)} bytes): a crash during an append")
        for note in cf.notes:
            notes.setdefault(note.split("\n", 1)[0], []).append(note)
    try:
        conn = await asyncpg.connect(dsn, server_settings={"application_name": "warden-audit-verify"})
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise ConnectionError(f"cannot open the audit database {out.target}: {type(e).__name__}: {e}") from None
    try:
        await check_schema(conn, "audit", latest_version(COMPONENTS["audit"]))
        live = await _live_origins(conn)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            stored = [str(r["verifier"]) for r in await conn.fetch("SELECT verifier FROM audit_keys")]
            if keys is None:
                out.store.add("info", "keys", "trusting the public keys stored in the database; pass --key for an independent check")
                ring = keyring(stored)
            chains = await conn.fetch("SELECT chain_id, origin, seq, hash, pruned_through FROM audit_chains ORDER BY chain_id")
            for ch in chains:
                origin = str(ch["origin"])
                report = Report(f"{out.target} chain {ch['chain_id']}", origin=origin, live=origin in live)
                cps = [
                    (int(r["size"]), _b(r["hash"]), str(r["note"]))
                    for r in await conn.fetch("SELECT size, hash, note FROM audit_checkpoints WHERE chain_id = $1 ORDER BY size", ch["chain_id"])
                ]
                await check_chain(
                    report,
                    origin,
                    fleet_ring(origin, keys) if keys is not None else ring,
                    cps,
                    notes.pop(origin, []),
                    _rows(conn, int(ch["chain_id"])),
                    pruned=int(ch["pruned_through"]),
                    head_seq=int(ch["seq"]),
                    head_hash=_b(ch["hash"]),
                )
                out.chains.append(report)
            orphans = await conn.fetch(
                "SELECT r.chain_id, count(*) AS n, min(r.seq) AS lo FROM audit_records r "
                "WHERE NOT EXISTS (SELECT 1 FROM audit_chains c WHERE c.chain_id = r.chain_id) GROUP BY r.chain_id ORDER BY r.chain_id"
            )
            for o in orphans:
                out.store.add("fault", "orphan_records", f"{o['n']} records (from seq {o['lo']}) belong to chain {o['chain_id']}, which is not in audit_chains")
            stray = await conn.fetch(
                "SELECT DISTINCT chain_id FROM audit_checkpoints k WHERE NOT EXISTS (SELECT 1 FROM audit_chains c WHERE c.chain_id = k.chain_id)"
            )
            for o in stray:
                out.store.add("fault", "orphan_records", f"checkpoints of chain {o['chain_id']}, which is not in audit_chains")
    finally:
        await conn.close()
    for origin, lost in notes.items():
        out.store.add("fault", "deleted_chain", f"{len(lost)} external checkpoints name chain {origin!r}, which is not in the database")
    return out


async def _live_origins(conn: asyncpg.Connection) -> set[str]:
    """The origins of the open chains whose writer runs: it holds the chain's advisory lock (:mod:`proxy.audit.pg_chain`).

    Probed by taking the lock without waiting and releasing it at once, as a
    starting replica does before it seals the chains of dead processes.
    """
    live: set[str] = set()
    for r in await conn.fetch("SELECT origin FROM audit_chains WHERE closed_us IS NULL"):
        origin = str(r["origin"])
        k = lock_key(origin)
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", k):
            await conn.execute("SELECT pg_advisory_unlock($1)", k)
        else:
            live.add(origin)
    return live


async def _rows(conn: asyncpg.Connection, chain_id: int, page: int = 1000) -> AsyncIterator[tuple[int, bytes, bytes, bytes, tuple[Any, ...]]]:
    cur = conn.cursor(
        "SELECT seq, prev_hash, hash, body, kind, request_id, tenant, subject FROM audit_records WHERE chain_id = $1 ORDER BY seq",
        chain_id,
        prefetch=page,
    )
    async for r in cur:
        yield int(r["seq"]), _b(r["prev_hash"]), _b(r["hash"]), _b(r["body"]), (r["kind"], r["request_id"], r["tenant"], r["subject"])
