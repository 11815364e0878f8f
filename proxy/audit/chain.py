"""The hash chain and its signed checkpoints.

Canonical form
    A record is stored as ``orjson.dumps(record, option=OPT_SORT_KEYS)``:
    compact UTF-8 JSON with object keys sorted.  The hash covers exactly those
    stored bytes, so a verifier needs SHA-256 and nothing else — it never
    re-serializes JSON, and float formatting cannot cause a false alarm.
    Warden's own numbers are integers (durations in microseconds, tokens,
    counts); floats appear only where the caller sent them (``temperature``)
    or a plugin reported them (retrieval scores), and are stored as sent.
    RFC 8785 via the ``rfc8785`` package was measured at 38 µs per 1.7 KB
    record against 0.6 µs for orjson, so it is not used on the hot path.

Leaf hash (domain-separated as in RFC 6962)::

    hash(n) = SHA-256( 0x00 || hash(n-1) || uint64_be(n) || canonical_record(n) )
    hash(0) = SHA-256( b"warden-audit genesis\\n" || origin )

``n`` is the record's sequence number (1-based), so a record moved to
another position no longer matches its hash.

Checkpoints are C2SP signed notes (tlog-checkpoint layout)::

    <origin>
    <size>
    <base64 hash(size)>
    time <unix seconds>
    (blank line)
    — <key name> <base64(key id || Ed25519 signature)>

The third line is the chain head after ``size`` records (this log is a hash
chain, not a Merkle tree).  The key name is the origin; the key id is the
first 4 bytes of SHA-256(name || 0x0A || 0x01 || public key), as in the
signed-note spec.  Verifier keys are printed as ``name+hexkeyid+base64(0x01||pub)``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger("warden.audit")

CANONICAL_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
_LEAF = b"\x00"
_GIL_FREE = 2048  # hashlib's HASHLIB_GIL_MINSIZE: updates below it keep the GIL
SIG_PREFIX = "\u2014 "
_NOTE = re.compile("(?:[^\\n]+\\n)+\\n(?:\u2014 [^\\n]+\\n)+")


def canonical(record: dict[str, object]) -> bytes:
    """The stored, hashed bytes of a record (orjson, sorted keys, compact).

    The bytes are those of ``orjson.dumps(record, option=CANONICAL_OPTS,
    default=json_default)``.  A record of plain JSON with str keys (nearly
    all) is first serialized without ``OPT_NON_STR_KEYS`` and ``default``:
    orjson's faster path (about 30% on an exchange record), which gives the
    same bytes and raises ``TypeError`` on anything it would need them for.
    """
    try:
        return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        from llm_warden.proxy.audit.redact import json_default

        return orjson.dumps(record, option=CANONICAL_OPTS, default=json_default)


def genesis_hash(origin: str) -> bytes:
    """The ``prev_hash`` of record 1: binds the chain to its origin."""
    return hashlib.sha256(b"warden-audit genesis\n" + origin.encode()).digest()


def leaf_hash(prev: bytes, seq: int, body: bytes) -> bytes:
    """``SHA-256(0x00 || prev || uint64_be(seq) || body)``.

    The body is fed in pieces under 2 KiB: hashlib releases the GIL for larger
    updates, and retaking it from a busy event loop costs more than the
    microsecond of hashing it would let run in parallel.
    """
    h = hashlib.sha256(_LEAF)
    h.update(prev)
    h.update(struct.pack(">Q", seq))
    n = len(body)
    if n < _GIL_FREE:
        h.update(body)
    else:
        view = memoryview(body)
        for i in range(0, n, _GIL_FREE - 1):
            h.update(view[i : i + _GIL_FREE - 1])
    return h.digest()


# --- keys -----------------------------------------------------------------


def key_id(name: str, public: bytes) -> bytes:
    """The signed-note key id: first 4 bytes of SHA-256(name || '\\n' || 0x01 || pub)."""
    return hashlib.sha256(name.encode() + b"\n\x01" + public).digest()[:4]


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def verifier_key(name: str, key: Ed25519PublicKey) -> str:
    """The public key in signed-note verifier-key form: ``name+keyid+base64(0x01||pub)``."""
    pub = public_bytes(key)
    b64 = base64.b64encode(b"\x01" + pub).decode()
    return f"{name}+{key_id(name, pub).hex()}+{b64}"


def parse_verifier_key(text: str) -> tuple[str, Ed25519PublicKey]:
    """Parse a verifier key (``name+keyid+base64``) or a PEM public key file's text.

    Returns the key name ("" for PEM) and the key.  Raises ``ValueError``.
    """
    text = text.strip()
    if text.startswith("-----BEGIN"):
        k = serialization.load_pem_public_key(text.encode())
        if not isinstance(k, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return "", k
    parts = text.split("+", 2)
    if len(parts) != 3:
        raise ValueError("a verifier key reads name+keyid+base64")
    name, kid, b64 = parts
    raw = base64.b64decode(b64, validate=True)
    if len(raw) != 33 or raw[0] != 1:
        raise ValueError("verifier key is not an Ed25519 (type 0x01) key")
    if key_id(name, raw[1:]).hex() != kid:
        raise ValueError("verifier key id does not match its key")
    return name, Ed25519PublicKey.from_public_bytes(raw[1:])


def load_private_key(text: str) -> Ed25519PrivateKey:
    """A signing key from PEM (PKCS#8 ``PRIVATE KEY``) or the base64 of a 32-byte seed."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        k = serialization.load_pem_private_key(text.encode(), password=None)
        if not isinstance(k, Ed25519PrivateKey):
            raise ValueError("the PEM key is not an Ed25519 private key")
        return k
    try:
        seed = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("signing key is neither PEM nor base64") from None
    if len(seed) != 32:
        raise ValueError(f"a raw Ed25519 seed is 32 bytes, got {len(seed)}")
    return Ed25519PrivateKey.from_private_bytes(seed)


def seed_bytes(key: Ed25519PrivateKey) -> bytes:
    """The 32-byte seed of a signing key (what the writer process is handed)."""
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def load_or_create_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """Load the key at ``path`` or create it (mode 0600, exclusive create so two
    processes starting together agree).  Returns the key and whether it was created."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_private_key(path.read_text()), False
    key = Ed25519PrivateKey.generate()
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem(key))
        f.flush()
        os.fsync(f.fileno())
    return key, True


# --- checkpoints ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A parsed checkpoint note."""

    origin: str
    size: int
    head: bytes
    timestamp: int
    text: str
    signatures: tuple[tuple[str, bytes, bytes], ...]

    def verify(self, keys: dict[bytes, tuple[str, Ed25519PublicKey]]) -> str | None:
        """Check the note's signatures against trusted keys (by key id).

        Returns ``None`` when at least one signature by a trusted key verifies
        and none by a trusted key fails, else the reason.
        """
        body = self.text.encode()
        good = 0
        for name, kid, sig in self.signatures:
            trusted = keys.get(kid)
            if trusted is None or (trusted[0] and trusted[0] != name):
                continue
            try:
                trusted[1].verify(sig, body)
            except InvalidSignature:
                return f"invalid signature by key {name} ({kid.hex()})"
            good += 1
        if not good:
            names = ", ".join(f"{n} ({k.hex()})" for n, k, _ in self.signatures) or "none"
            return f"no signature by a trusted key (signed by: {names})"
        return None


def make_checkpoint(origin: str, size: int, head: bytes, timestamp: int, key: Ed25519PrivateKey) -> str:
    """Sign and render a checkpoint note (text ends with a newline)."""
    body = f"{origin}\n{size}\n{base64.b64encode(head).decode()}\ntime {timestamp}\n"
    pub = public_bytes(key.public_key())
    sig = key.sign(body.encode())
    return f"{body}\n{SIG_PREFIX}{origin} {base64.b64encode(key_id(origin, pub) + sig).decode()}\n"


def parse_checkpoint(note: str) -> Checkpoint:
    """Parse a checkpoint note; raises ``ValueError`` naming what is wrong."""
    text, sep, sigs = note.partition("\n\n")
    if not sep:
        raise ValueError("no blank line between the checkpoint and its signatures")
    lines = text.split("\n")
    if len(lines) < 3:
        raise ValueError("a checkpoint needs origin, size and hash lines")
    origin, size_s, head_s = lines[0], lines[1], lines[2]
    if not size_s.isdigit():
        raise ValueError(f"bad tree size {size_s!r}")
    head = base64.b64decode(head_s, validate=True)
    if len(head) != 32:
        raise ValueError("the hash line is not 32 bytes")
    ts = 0
    for extra in lines[3:]:
        if extra.startswith("time ") and extra[5:].isdigit():
            ts = int(extra[5:])
    signatures: list[tuple[str, bytes, bytes]] = []
    for line in sigs.split("\n"):
        if not line:
            continue
        if not line.startswith(SIG_PREFIX):
            raise ValueError(f"bad signature line {line[:40]!r}")
        name, _, b64 = line[len(SIG_PREFIX) :].rpartition(" ")
        raw = base64.b64decode(b64, validate=True)
        if len(raw) < 5:
            raise ValueError("signature too short")
        signatures.append((name, raw[:4], raw[4:]))
    if not signatures:
        raise ValueError("the checkpoint has no signature")
    return Checkpoint(origin, int(size_s), head, ts, text + "\n", tuple(signatures))


@dataclass(slots=True)
class CheckpointFile:
    """The notes read from an external checkpoint file, and any torn tail."""

    notes: list[str]
    torn: str | None


def read_checkpoint_file(path: Path) -> CheckpointFile:
    """Split a file of appended checkpoint notes.

    Notes are appended whole; a crash mid-append can leave a partial last
    note, reported as ``torn`` (a torn tail, not tampering).
    """
    data = path.read_text(encoding="utf-8", errors="replace")
    notes: list[str] = []
    pos = 0
    while pos < len(data):
        m = _NOTE.match(data, pos)
        if m is None:
            break
        notes.append(m.group())
        pos = m.end()
    rest = data[pos:]
    return CheckpointFile(notes, rest if rest.strip() else None)


def repair_checkpoint_file(path: Path) -> str | None:
    """Cut a torn last note off the checkpoint file (kept in ``<file>.torn``).

    Returns the torn text, or ``None`` when the file was whole.
    """
    if not path.exists():
        return None
    cf = read_checkpoint_file(path)
    if cf.torn is None:
        return None
    data = path.read_text(encoding="utf-8", errors="replace")
    keep = data[: len(data) - len(cf.torn)]
    with open(str(path) + ".torn", "a", encoding="utf-8") as f:
        f.write(cf.torn)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(keep, encoding="utf-8")
    os.replace(tmp, path)
    log.warning("audit: cut a torn checkpoint note off %s (kept in %s.torn)", path, path)
    return cf.torn


def append_checkpoint_file(path: Path, note: str) -> None:
    """Append one note with a single ``write`` and fsync it (blocking: run in a thread)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, note.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
