"""The append path of the PostgreSQL audit store: one chain per writer, one statement per group.

Every running Warden process (replica) appends to a chain of its own
(``audit_chains`` row; origin ``<prefix>/<host>/<random>``), so replicas
never wait for each other's appends.  The writer keeps its chain's head in
memory and appends a group of records with **one statement** — its own
transaction, one round trip::

    WITH h AS (UPDATE audit_chains SET seq = new, hash = new_hash
               WHERE chain_id = $1 AND seq = old AND hash = old_hash RETURNING chain_id),
         c AS (INSERT INTO audit_checkpoints ... SELECT ... FROM h WHERE a note is due)
    INSERT INTO audit_records ... SELECT ... FROM h, unnest($arrays)

The head update is the guard: when the chain's head is not where the writer
believes it is (another process appended to the same chain, or a commit
whose answer was lost did land), ``h`` is empty, nothing is inserted, and the
writer reads the head again (:func:`read_head`).  Hashes and checkpoint
signatures come from :mod:`proxy.audit.chain`, as in the SQLite store.

Outcome of a commit whose answer was lost (connection cut, timeout): the
head decides.  If it holds the group's new ``(seq, hash)`` the group was
committed; if it still holds the old one, it was not (a retry cannot write it
twice: its ``UPDATE ... WHERE seq = old`` waits for, then fails after, a
late commit of the first attempt).

Liveness: a writer holds a session advisory lock keyed by its origin while
it runs; a chain left open (``closed_us IS NULL``) whose lock anybody can take
belongs to a process that died, and is sealed by the next start of any
replica (:func:`proxy.audit.pg_upkeep.seal_orphans`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llm_warden.proxy.audit.chain import genesis_hash, leaf_hash, make_checkpoint, verifier_key
from llm_warden.proxy.audit.record import Prepared

log = logging.getLogger("warden.audit")

_COLS = "chain_id, seq, ts_us, kind, request_id, tenant, subject, tools, call_ids, status, prev_hash, hash, body"
APPEND = (
    "WITH h AS (UPDATE audit_chains SET seq = $2, hash = $3, closed_us = NULL "
    "WHERE chain_id = $1 AND seq = $4 AND hash = $5 RETURNING chain_id), "
    "c AS (INSERT INTO audit_checkpoints (chain_id, size, hash, note, created_us, reason) "
    "SELECT h.chain_id, $2, $3, $17, $18, $19 FROM h WHERE $17::text IS NOT NULL RETURNING 1) "
    f"INSERT INTO audit_records ({_COLS}) SELECT h.chain_id, r.* FROM h, unnest("
    "$6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], "
    "$14::integer[], $15::bytea[], $16::bytea[], $20::bytea[]) AS r"
)
CHECKPOINT = (
    "INSERT INTO audit_checkpoints (chain_id, size, hash, note, created_us, reason) "
    "SELECT chain_id, seq, hash, $4, $5, $6 FROM audit_chains WHERE chain_id = $1 AND seq = $2 AND hash = $3 "
    "ON CONFLICT (chain_id, size) DO NOTHING"
)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ChainMoved(Exception):
    """The chain's head was not where the writer believed: nothing was written (read the head again)."""


def wall_us() -> int:
    return int(time.time() * 1_000_000)


def lock_key(origin: str) -> int:
    """The 64-bit advisory-lock key of a chain (from its origin: unique across schemas sharing a database)."""
    return int(struct.unpack(">q", hashlib.sha256(b"warden-audit-chain\x00" + origin.encode()).digest()[:8])[0])


def new_origin(prefix: str, token: str) -> str:
    """``<prefix>/<host>/<token>``: the chain of one run of one replica (host for people; token for uniqueness)."""
    host = _SAFE.sub("-", socket.gethostname())[:63].strip("-") or "host"
    return f"{prefix or 'warden-audit'}/{host}/{token}"


@dataclass(slots=True)
class Head:
    """A chain's identity and head as the writer knows it."""

    chain_id: int
    origin: str
    seq: int
    hash: bytes
    sealed: int = 0
    """The size of the chain's newest checkpoint."""


@dataclass(slots=True)
class Appended:
    """A group ready to send: the statement's arguments, the new head and the checkpoint note (if one is due)."""

    args: tuple[Any, ...]
    seq: int
    hash: bytes
    note: str | None
    records: int


def prepare_append(head: Head, preps: Sequence[Prepared], key: Ed25519PrivateKey, every: int, reason: str | None = None) -> Appended:
    """Hash ``preps`` onto ``head`` and build the arguments of :data:`APPEND` (a checkpoint every ``every`` records, or for ``reason``)."""
    seq, h = head.seq, head.hash
    n = len(preps)
    seqs: list[int] = [0] * n
    prevs: list[bytes] = [b""] * n
    hashes: list[bytes] = [b""] * n
    for i, p in enumerate(preps):
        seq += 1
        prevs[i] = h
        h = leaf_hash(h, seq, p.body)
        seqs[i] = seq
        hashes[i] = h
    why = reason or ("periodic" if seq // every > head.seq // every else None)
    note = make_checkpoint(head.origin, seq, h, int(time.time()), key) if why is not None and seq > head.sealed else None
    args = (
        head.chain_id,
        seq,
        h,
        head.seq,
        head.hash,
        seqs,
        [p.ts_us for p in preps],
        [p.kind for p in preps],
        [p.request_id for p in preps],
        [p.tenant for p in preps],
        [p.subject for p in preps],
        [p.tools for p in preps],
        [p.call_ids for p in preps],
        [p.status for p in preps],
        prevs,
        hashes,
        note,
        wall_us(),
        why,
        [p.body for p in preps],
    )
    return Appended(args, seq, h, note, n)


async def append(conn: asyncpg.Connection, head: Head, batch: Appended, timeout_s: float) -> None:
    """Run the append statement; raises :class:`ChainMoved` when the head guard matched nothing."""
    if not batch.records:
        raise ValueError("an append needs at least one record (a checkpoint alone: checkpoint())")
    status = await conn.execute(APPEND, *batch.args, timeout=timeout_s)
    if status != f"INSERT 0 {batch.records}":
        raise ChainMoved(f"chain {head.origin}: the head is not at {head.seq}")


async def read_head(conn: asyncpg.Connection, chain_id: int) -> tuple[int, bytes, int]:
    """The chain's ``(seq, hash, newest checkpoint size)`` in the database."""
    row = await conn.fetchrow(
        "SELECT seq, hash, COALESCE((SELECT max(size) FROM audit_checkpoints WHERE chain_id = $1), 0) AS sealed "
        "FROM audit_chains WHERE chain_id = $1",
        chain_id,
    )
    if row is None:
        raise LookupError(f"audit chain {chain_id} is not in the database")
    return int(row["seq"]), bytes(row["hash"]), int(row["sealed"])


async def checkpoint(conn: asyncpg.Connection, head: Head, key: Ed25519PrivateKey, reason: str, timeout_s: float) -> str | None:
    """Sign and store a checkpoint over the current head (when it moved since the last one); returns the note."""
    if head.seq <= head.sealed:
        return None
    note = make_checkpoint(head.origin, head.seq, head.hash, int(time.time()), key)
    status = await conn.execute(CHECKPOINT, head.chain_id, head.seq, head.hash, note, wall_us(), reason, timeout=timeout_s)
    if status != "INSERT 0 1":
        return None
    head.sealed = head.seq
    return note


async def publish_key(conn: asyncpg.Connection, origin: str, key: Ed25519PrivateKey) -> str:
    """Store the verifier key of ``origin`` (name = origin, as checkpoint notes name their key); returns it."""
    verifier = verifier_key(origin, key.public_key())
    await conn.execute(
        "INSERT INTO audit_keys (key_id, verifier, added_us) VALUES ($1, $2, $3) ON CONFLICT (key_id) DO NOTHING",
        verifier.split("+")[1],
        verifier,
        wall_us(),
    )
    return verifier


async def create_chain(conn: asyncpg.Connection, origin: str, key: Ed25519PrivateKey, writer: str) -> Head:
    """A new, empty chain for this run, with its verifier key published."""
    async with conn.transaction():
        chain_id = await conn.fetchval(
            "INSERT INTO audit_chains (origin, seq, hash, created_us, writer) VALUES ($1, 0, $2, $3, $4) RETURNING chain_id",
            origin,
            genesis_hash(origin),
            wall_us(),
            writer,
        )
        await publish_key(conn, origin, key)
    return Head(int(chain_id), origin, 0, genesis_hash(origin))
