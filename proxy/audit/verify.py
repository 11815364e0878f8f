"""``warden audit verify``: walk the chain and the checkpoints, report faults.

Faults (exit code 1): a record whose content no longer matches its hash
(``edited``), a link that does not point at the previous record
(``broken_link``), missing sequence numbers (``deleted``), a record found at
another position than the one it was hashed for (``reordered``), a checkpoint
whose signature fails or that no trusted key signed (``forged_checkpoint``), a
checkpoint that disagrees with the chain (``checkpoint_mismatch``), records
missing at the end that a checkpoint covers (``truncated``), index columns that
disagree with the hashed record (``index_mismatch``).

Warnings (exit code 0): an unsealed tail — records after the last checkpoint,
left by an unclean stop and sealed at the next start —, a torn last note
in the checkpoint file, and an interrupted retention prune (``partial_prune``:
records still below ``pruned_through``, deleted by the next prune).  All are
what a crash leaves, not tampering.  While a Warden is writing the log (a
SQLite store holds a lock on ``<db>.live``, see :mod:`proxy.audit.liveness`; a
PostgreSQL chain's writer holds its advisory lock) its unsealed tail is only
the records since the last checkpoint, reported as ``info`` (``live``).

A chain kept only in its own database cannot prove its tail was not cut:
pass the latest checkpoint kept elsewhere (``--checkpoint FILE``) and the
public key kept elsewhere (``--key``) for an independent verdict.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from llm_warden.proxy.audit.chain import (
    Checkpoint,
    genesis_hash,
    key_id,
    leaf_hash,
    parse_checkpoint,
    parse_verifier_key,
    public_bytes,
    read_checkpoint_file,
)
from llm_warden.proxy.audit.liveness import writer_running
from llm_warden.proxy.audit.reader import AuditReader

Severity = Literal["fault", "warning", "info"]
_MAX_FINDINGS = 200
_REORDER_WINDOW = 100_000
_MOVE_WINDOW = 64


@dataclass(slots=True)
class Finding:
    """One thing verify found; ``seq`` is the record it concerns, if any."""

    severity: Severity
    kind: str
    message: str
    seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "kind": self.kind, "seq": self.seq, "message": self.message}


@dataclass(slots=True)
class Report:
    """The outcome of a verification."""

    path: str
    origin: str = ""
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoints: int = 0
    external_checkpoints: int = 0
    findings: list[Finding] = field(default_factory=list)
    suppressed: int = 0
    live: bool = False
    """A Warden was writing this log while it was verified."""

    @property
    def faults(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "fault"]

    @property
    def ok(self) -> bool:
        return not self.faults and not self.suppressed

    def add(self, severity: Severity, kind: str, message: str, seq: int | None = None) -> None:
        if len(self.findings) >= _MAX_FINDINGS:
            self.suppressed += 1
            return
        self.findings.append(Finding(severity, kind, message, seq))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "origin": self.origin,
            "live": self.live,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "checkpoints": self.checkpoints,
            "external_checkpoints": self.external_checkpoints,
            "first_fault": self.faults[0].to_dict() if self.faults else None,
            "findings": [f.to_dict() for f in self.findings],
            "suppressed": self.suppressed,
        }

    def render(self) -> str:
        lines = [f"audit log {self.path}" + (" (live: a running Warden is writing it)" if self.live else ""), f"  origin       {self.origin}"]
        span = f"{self.first_seq}..{self.last_seq}" if self.records else "none"
        lines.append(f"  records      {self.records} (seq {span})")
        lines.append(f"  checkpoints  {self.checkpoints} in the database, {self.external_checkpoints} external")
        for f in self.findings:
            where = f" seq {f.seq}" if f.seq is not None else ""
            lines.append(f"  {f.severity.upper():7} {f.kind}{where}: {f.message}")
        if self.suppressed:
            lines.append(f"  ... and {self.suppressed} more findings")
        if self.faults:
            first = self.faults[0]
            lines.append(f"FAIL: first fault: {first.kind}" + (f" at seq {first.seq}" if first.seq is not None else ""))
        else:
            lines.append("OK: the chain and every checkpoint verify")
        return "\n".join(lines)


KeyRing = dict[bytes, tuple[str, Ed25519PublicKey]]


def keyring(verifier_keys: list[str]) -> KeyRing:
    """Trusted keys by signed-note key id, from verifier-key strings (or PEM)."""
    ring: KeyRing = {}
    for text in verifier_keys:
        name, key = parse_verifier_key(text)
        ring[key_id(name, public_bytes(key))] = (name, key)
    return ring


async def verify_db(path: Path, *, keys: list[str] | None = None, checkpoint_file: Path | None = None) -> Report:
    """Verify the audit database at ``path``.

    ``keys``: trusted verifier keys (when ``None``, the keys recorded in the
    database are trusted, and the report says so).  ``checkpoint_file``: notes
    kept outside the database to compare the tail against.
    """
    report = Report(str(path), live=writer_running(path))
    reader = await AuditReader.open(path)
    try:
        # One read transaction: every query below sees the same snapshot. Paged reads outside one would
        # see a prune or an append that commits meanwhile as a gap (a "deleted" record that never was).
        await reader.db.execute("BEGIN")
        await _verify(reader, report, keys, checkpoint_file)
    finally:
        await reader.close()
    return report


async def _scalar(reader: AuditReader, sql: str, args: tuple[Any, ...] = ()) -> Any:
    async with reader.db.execute(sql, args) as cur:
        row = await cur.fetchone()
    return None if row is None else row[0]


async def _verify(reader: AuditReader, report: Report, keys: list[str] | None, checkpoint_file: Path | None) -> None:
    db = reader.db
    origin = await _scalar(reader, "SELECT value FROM meta WHERE key = 'origin'")
    if origin is None:
        report.add("fault", "not_an_audit_log", "no origin in the meta table")
        return
    report.origin = origin = str(origin)
    pruned = int(await _scalar(reader, "SELECT COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'pruned_through'), 0)") or 0)
    async with db.execute("SELECT seq, hash FROM head WHERE id = 1") as cur:
        head_row = await cur.fetchone()
    head_seq = int(head_row[0]) if head_row else 0

    if keys is None:
        async with db.execute("SELECT verifier FROM keys") as cur:
            stored = [str(r[0]) for r in await cur.fetchall()]
        ring = keyring(stored)
        report.add("info", "keys", "trusting the public keys stored in the database; pass --key for an independent check")
    else:
        ring = keyring(keys)

    async with db.execute("SELECT size, hash, note FROM checkpoints ORDER BY size") as cur:
        rows = [(int(r[0]), _b(r[1]), str(r[2])) for r in await cur.fetchall()]
    notes: list[str] = []
    if checkpoint_file is not None:
        cf = read_checkpoint_file(checkpoint_file)
        if cf.torn is not None:
            report.add(
                "warning", "torn_tail", f"the checkpoint file ends with a partial note ({len(cf.torn)} bytes): a crash during an append"
            )
        notes = cf.notes
    await check_chain(report, origin, ring, rows, notes, _rows(reader), pruned=pruned, head_seq=head_seq)


async def check_chain(
    report: Report,
    origin: str,
    ring: KeyRing,
    checkpoints: list[tuple[int, bytes, str]],
    external_notes: list[str],
    rows: AsyncIterator[tuple[int, bytes, bytes, bytes, tuple[Any, ...]]],
    *,
    pruned: int,
    head_seq: int,
    head_hash: bytes | None = None,
) -> None:
    """Verify one chain (any store): its records in ``seq`` order against its checkpoints and head.

    ``checkpoints``: the store's ``(size, hash, note)`` rows; ``external_notes``:
    notes kept elsewhere (all of this chain's origin); ``rows``: ``(seq,
    prev_hash, hash, body, (kind, request_id, tenant, subject))``;
    ``pruned``: the chain's ``pruned_through``; ``head_seq``/``head_hash``: the
    head the store keeps (the hash, when the store has one, must be the last
    record's).  Findings go to ``report``.
    """
    cps: dict[int, Checkpoint] = {}
    for size, h, note in checkpoints:
        report.checkpoints += 1
        cp = _check_note(report, str(note), ring, origin, "checkpoint")
        if cp is None:
            continue
        if cp.size != size or cp.head != h:
            report.add("fault", "checkpoint_mismatch", f"checkpoint row {size} disagrees with its signed note", size)
            continue
        cps[cp.size] = cp

    external: list[Checkpoint] = []
    for note in external_notes:
        report.external_checkpoints += 1
        cp = _check_note(report, note, ring, origin, "external checkpoint")
        if cp is not None:
            external.append(cp)
    wanted = {cp.size for cp in external} | set(cps)
    at: dict[int, bytes] = {}

    recent: collections.OrderedDict[bytes, int] = collections.OrderedDict()
    suspects: list[tuple[Finding | None, bytes, bytes, bytes]] = []
    expected_seq: int | None = None
    expected_prev: bytes | None = None
    last_hash: bytes | None = None
    async for seq, prev, h, body, cols in rows:
        report.records += 1
        if report.first_seq is None:
            report.first_seq = seq
            if seq <= pruned:
                # Retention marks pruned_through first, then deletes in chunks: an interrupted (or running)
                # prune leaves records seq..pruned, vouched for by the checkpoint at the mark via the chain.
                if pruned in cps:
                    report.add(
                        "warning",
                        "partial_prune",
                        f"retention pruning through {pruned} was interrupted or is running: records {seq}..{pruned} are "
                        "still there; the next prune deletes them",
                        seq,
                    )
                else:
                    report.add("fault", "deleted", f"records were pruned through {pruned} but no checkpoint at {pruned} vouches for the cut", seq)
                expected_prev = genesis_hash(origin) if seq == 1 else (cps[seq - 1].head if seq - 1 in cps else None)
            elif seq == 1:
                expected_prev = genesis_hash(origin)
            elif seq - 1 == pruned and pruned in cps:
                expected_prev = cps[pruned].head
            elif seq - 1 == pruned:
                report.add("fault", "deleted", f"records 1..{seq - 1} were pruned but no checkpoint at {pruned} vouches for the cut", seq)
            else:
                report.add("fault", "deleted", f"records {pruned + 1}..{seq - 1} are missing from the start of the log", seq)
            expected_seq = seq
        assert expected_seq is not None
        if seq != expected_seq:
            report.add("fault", "deleted", f"records {expected_seq}..{seq - 1} are missing", seq)
            expected_prev = None
        computed = leaf_hash(prev, seq, body)
        if computed != h:
            k = recent.get(prev)
            if k is not None and k + 1 != seq and leaf_hash(prev, k + 1, body) == h:
                report.add("fault", "reordered", f"the record hashed for position {k + 1} is at position {seq}", seq)
            else:
                report.add("fault", "edited", "the record's content does not match its hash (edited)", seq)
                if len(suspects) < _MAX_FINDINGS:
                    suspects.append((report.findings[-1] if report.findings else None, prev, h, body))
        elif expected_prev is not None and prev != expected_prev:
            k = recent.get(prev)
            if k is not None and k != seq - 1:
                report.add("fault", "reordered", f"the record follows record {k}, not {seq - 1}", seq)
            else:
                report.add(
                    "fault",
                    "broken_link",
                    f"prev_hash does not match record {seq - 1}: that record was altered and rehashed, or this link was",
                    seq,
                )
        _check_index(report, seq, body, cols)
        if seq in wanted:
            at[seq] = h
        recent[h] = seq
        if len(recent) > _REORDER_WINDOW:
            recent.popitem(last=False)
        expected_prev = h
        expected_seq = seq + 1
        report.last_seq = seq
        last_hash = h

    for finding, prev, h, body in suspects:
        # A record that only looked edited may verify at another position: it was moved.
        if finding is None or finding.seq is None:
            continue
        k = recent.get(prev)
        near = range(max(1, finding.seq - _MOVE_WINDOW), finding.seq + _MOVE_WINDOW + 1)
        for cand in ([k + 1] if k is not None else []) + list(near):
            if cand != finding.seq and leaf_hash(prev, cand, body) == h:
                finding.kind = "reordered"
                finding.message = f"the record hashed for position {cand} is at position {finding.seq}"
                break
    last = report.last_seq or pruned
    if head_seq != last:
        if head_seq > last:
            report.add("fault", "truncated", f"the chain head says {head_seq} records but the log ends at {last}", last + 1)
        else:
            report.add("fault", "checkpoint_mismatch", f"the chain head says {head_seq} records but the log goes on to {last}", head_seq)
    elif head_hash is not None and last_hash is not None and head_hash != last_hash:
        report.add("fault", "checkpoint_mismatch", f"the chain head's hash is not record {last}'s: the log was rewritten", last)
    for cp in cps.values():
        _compare(report, cp, at, last, pruned, "checkpoint")
    for cp in external:
        _compare(report, cp, at, last, pruned, "external checkpoint")
    sealed = max(cps) if cps else 0
    if report.last_seq is not None and report.last_seq > sealed and report.live:
        report.add(
            "info",
            "live",
            f"{report.last_seq - sealed} records after the last checkpoint ({sealed}) are not sealed yet: the running Warden "
            "signs a checkpoint every [audit] checkpoint_every records and when it stops",
            sealed + 1,
        )
    elif report.last_seq is not None and report.last_seq > sealed:
        report.add(
            "warning",
            "torn_tail",
            f"{report.last_seq - sealed} records after the last checkpoint ({sealed}) are unsealed: an unclean stop; the next start seals them",
            sealed + 1,
        )


def _check_note(report: Report, note: str, ring: KeyRing, origin: str, what: str) -> Checkpoint | None:
    try:
        cp = parse_checkpoint(note)
    except ValueError as e:
        report.add("fault", "forged_checkpoint", f"{what} is malformed: {e}")
        return None
    if cp.origin != origin:
        report.add("fault", "forged_checkpoint", f"{what} at {cp.size} names origin {cp.origin!r}, not {origin!r}", cp.size)
        return None
    problem = cp.verify(ring)
    if problem is not None:
        report.add("fault", "forged_checkpoint", f"{what} at {cp.size}: {problem}", cp.size)
        return None
    return cp


def _compare(report: Report, cp: Checkpoint, at: dict[int, bytes], last: int, pruned: int, what: str) -> None:
    if cp.size > last:
        report.add("fault", "truncated", f"{what} covers {cp.size} records but the log ends at {last}: records were cut off", last + 1)
    elif cp.size < pruned or (cp.size == pruned and cp.size not in at):
        return
    elif cp.size in at and at[cp.size] != cp.head:
        report.add("fault", "checkpoint_mismatch", f"{what} at {cp.size} does not match the chain: the log was rewritten", cp.size)


async def _rows(reader: AuditReader, page: int = 1000) -> Any:
    last = 0
    while True:
        async with reader.db.execute(
            "SELECT seq, prev_hash, hash, body, kind, request_id, tenant, subject FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
            (last, page),
        ) as cur:
            rows = await cur.fetchall()
        if not rows:
            return
        for r in rows:
            yield int(r[0]), _b(r[1]), _b(r[2]), _b(r[3]), (r[4], r[5], r[6], r[7])
            last = int(r[0])


def _b(v: Any) -> bytes:
    """A column as bytes, whatever type a tamperer left in it."""
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode()
    return b"" if v is None else str(v).encode()


def _check_index(report: Report, seq: int, body: bytes, cols: tuple[Any, ...]) -> None:
    """The searchable columns must agree with the hashed record (else a search could hide it)."""
    try:
        rec = orjson.loads(body)
    except orjson.JSONDecodeError:
        report.add("fault", "edited", "the record is not valid JSON", seq)
        return
    if not isinstance(rec, dict):
        report.add("fault", "edited", "the record is not a JSON object", seq)
        return
    kind = rec.get("kind")
    if kind == "exchange":
        who = rec.get("principal") or {}
        rid = rec.get("request_id")
    else:
        who = rec.get("actor") or {}
        data = rec.get("data") or {}
        rid = data.get("request_id") if isinstance(data, dict) else None
    tenant = who.get("tenant") if isinstance(who, dict) else None
    subject = who.get("subject") if isinstance(who, dict) else None
    expect = (
        kind,
        rid if isinstance(rid, str) else None,
        tenant if isinstance(tenant, str) else None,
        subject if isinstance(subject, str) else None,
    )
    if tuple(cols) != expect:
        report.add(
            "fault", "index_mismatch", "the searchable columns (kind, request id, tenant, subject) disagree with the hashed record", seq
        )
