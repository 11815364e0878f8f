"""Upkeep of the PostgreSQL audit store: the fleet key, sealing dead replicas' chains, retention.

Run by :class:`~proxy.audit.postgres.PostgresAuditLog` at start and hourly,
on a connection of its pool (never the writer's).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llm_warden.proxy.audit.chain import load_private_key
from llm_warden.proxy.audit.pg_chain import Head, checkpoint, lock_key, publish_key, read_head, wall_us
from llm_warden.proxy.config import AuditConfig
from llm_warden.proxy.errors import ConfigError

log = logging.getLogger("warden.audit")


def load_fleet_key(cfg: AuditConfig) -> Ed25519PrivateKey:
    """The fleet's signing key, from ``signing_key_env`` or ``signing_key_file`` (blocking: run in a thread).

    Required with the postgres backend: a key generated inside a pod would be lost with it.
    """
    if cfg.signing_key_env:
        source = "audit.signing_key_env"
        text = os.environ.get(cfg.signing_key_env)
        if not text:
            raise ConfigError(source, f"environment variable {cfg.signing_key_env} is not set")
    elif cfg.signing_key_file:
        source = "audit.signing_key_file"
        try:
            text = Path(cfg.signing_key_file).read_text()
        except FileNotFoundError:
            raise ConfigError(source, f"{cfg.signing_key_file} does not exist") from None
    else:
        raise ConfigError("audit.signing_key_env", "the postgres backend needs the fleet's signing key: set signing_key_env or signing_key_file")
    try:
        return load_private_key(text)
    except ValueError as e:
        raise ConfigError(source, str(e)) from None


async def seal_orphans(conn: asyncpg.Connection, key: Ed25519PrivateKey, own: int, timeout_s: float) -> list[tuple[str, str | None]]:
    """Seal the open chains of processes that died: a ``recovery`` checkpoint over each head, then closed.

    A chain is an orphan when it is open (``closed_us IS NULL``) and its
    advisory lock is free (its writer held it while it ran).  Returns
    ``(origin, note)`` per chain closed (``note`` ``None`` when the head was
    already sealed).
    """
    rows = await conn.fetch("SELECT chain_id, origin FROM audit_chains WHERE closed_us IS NULL AND chain_id <> $1 ORDER BY chain_id", own)
    out: list[tuple[str, str | None]] = []
    for r in rows:
        origin = str(r["origin"])
        k = lock_key(origin)
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", k):
            continue  # its writer runs
        try:
            seq, h, sealed = await read_head(conn, int(r["chain_id"]))
            head = Head(int(r["chain_id"]), origin, seq, h, sealed)
            note = None
            async with conn.transaction():
                if seq > sealed:
                    await publish_key(conn, origin, key)
                    note = await checkpoint(conn, head, key, "recovery", timeout_s)
                await conn.execute("UPDATE audit_chains SET closed_us = $2 WHERE chain_id = $1 AND closed_us IS NULL", head.chain_id, wall_us())
            if note is not None:
                log.warning("audit: sealed chain %s of a process that did not stop cleanly (%d unsealed records)", origin, seq - sealed)
            out.append((origin, note))
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", k)
    return out


async def prune_chains(conn: asyncpg.Connection, cutoff_us: int, chunk: int, pause_s: float) -> list[dict[str, Any]]:
    """Delete records older than ``cutoff_us`` from every chain, each up to a checkpoint (kept).

    One replica at a time (an advisory lock per schema; the others skip and
    return nothing).  Per chain, ``audit_prune_mark`` moves the chain's
    ``pruned_through`` to the newest checkpoint at or before its first young
    record, then ``audit_prune_chunk`` deletes ``chunk`` records per call,
    each its own short transaction, pausing at least ``pause_s`` (and as long
    as the call took) between calls.  Both functions run with the schema
    owner's rights (``SECURITY DEFINER``): the role Warden writes with has no
    DELETE, and they refuse a cut younger than one day.  Returns
    ``{origin, through, deleted}`` per chain that lost records.
    """
    schema = await conn.fetchval("SELECT current_schema()")
    k = lock_key(f"retention\x00{schema}")
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", k):
        return []
    done: list[dict[str, Any]] = []
    try:
        chains = await conn.fetch("SELECT chain_id, origin FROM audit_chains WHERE pruned_through < seq ORDER BY chain_id")
        for ch in chains:
            through = int(await conn.fetchval("SELECT audit_prune_mark($1, $2)", ch["chain_id"], cutoff_us))
            deleted = 0
            while through:
                t0 = time.monotonic()
                n = int(await conn.fetchval("SELECT audit_prune_chunk($1, $2)", ch["chain_id"], chunk))
                if not n:
                    break
                deleted += n
                await asyncio.sleep(max(pause_s, time.monotonic() - t0))
            if deleted:
                done.append({"origin": ch["origin"], "through": through, "deleted": deleted})
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", k)
    return done
