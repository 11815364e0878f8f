"""``Idempotency-Key``: a retried request gets the first answer instead of a second provider call.

Per tenant, the first request carrying a key *claims* it (an in-flight record
with the SHA-256 of the raw body and an owner id), is processed normally, and
its final answer is *recorded* for ``idempotency_ttl_s``.  Then:

- same key, same body, answer recorded  -> the recorded answer is replayed;
- same key, same body, still in flight  -> wait (bounded) for it, then replay;
- same key, different body              -> 409;
- the first exchange failed             -> its claim is released, a retry runs anew.

Storage is SQLite (aiosqlite, WAL, one statement per transition so several
processes on one host stay correct) for the ``memory`` backend, and Redis
(``SET NX PX`` claim, owner-checked Lua transitions) for the ``redis`` backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote

import aiosqlite
import orjson

from llm_warden.plugins.ratelimit.backends import RedisClient
from llm_warden.proxy.exchange import LocalReply

REPLAY_HEADER = "x-warden-idempotent-replay"

#: Response headers never recorded (per-request, hop-by-hop or recomputed on replay).
_SKIP_HEADERS = (
    "x-request-id",
    "retry-after",
    "date",
    "content-length",
    "transfer-encoding",
    "connection",
    "set-cookie",
    "x-warden-principal",
)

#: Statuses that are not a final answer worth replaying (the retry should run again).
_TRANSIENT = frozenset({408, 409, 425, 429})


@dataclass(frozen=True, slots=True)
class Recorded:
    """A final answer as stored: replayed as JSON or, for a stream, as SSE events."""

    status: int
    headers: dict[str, str]
    body: Any
    stream: bool

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "headers": self.headers, "body": self.body, "stream": self.stream}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Recorded:
        return Recorded(int(d["status"]), dict(d["headers"]), d["body"], bool(d["stream"]))


@dataclass(frozen=True, slots=True)
class Claim:
    """The state of a key after a claim attempt."""

    kind: Literal["claimed", "inflight", "done"]
    body_hash: str
    record: Recorded | None = None


class IdempotencyStore(Protocol):
    async def claim(self, tenant: str, key_hash: str, body_hash: str, owner: str, lock_s: float) -> Claim: ...

    async def complete(self, tenant: str, key_hash: str, owner: str, body_hash: str, record: Recorded, ttl_s: float) -> bool: ...

    async def release(self, tenant: str, key_hash: str, owner: str, body_hash: str) -> None: ...

    async def close(self) -> None: ...


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def hash_body(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def valid_key(key: str) -> bool:
    """1-255 printable ASCII characters (the IETF draft's and Stripe's bounds)."""
    return 0 < len(key) <= 255 and key.isascii() and key.isprintable()


class SQLiteStore:
    """Idempotency records in one SQLite table (WAL, autocommit, atomic upserts)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(str(self.path), isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA busy_timeout=5000")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute(
            "CREATE TABLE IF NOT EXISTS idempotency ("
            " tenant TEXT NOT NULL, key_hash TEXT NOT NULL, body_hash TEXT NOT NULL,"
            " state TEXT NOT NULL, owner TEXT NOT NULL, expires REAL NOT NULL, record BLOB,"
            " PRIMARY KEY (tenant, key_hash)) WITHOUT ROWID"
        )
        await db.execute("CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency(expires)")
        self.db = db

    def _conn(self) -> aiosqlite.Connection:
        if self.db is None:
            raise RuntimeError("idempotency store is not open")
        return self.db

    async def claim(self, tenant: str, key_hash: str, body_hash: str, owner: str, lock_s: float) -> Claim:
        db = self._conn()
        for _ in range(3):
            now = time.time()
            rows = await db.execute_fetchall(
                "INSERT INTO idempotency(tenant, key_hash, body_hash, state, owner, expires, record)"
                " VALUES (?, ?, ?, 'inflight', ?, ?, NULL)"
                " ON CONFLICT(tenant, key_hash) DO UPDATE SET body_hash = excluded.body_hash, state = 'inflight',"
                " owner = excluded.owner, expires = excluded.expires, record = NULL"
                " WHERE idempotency.expires <= ? RETURNING owner",
                (tenant, key_hash, body_hash, owner, now + lock_s, now),
            )
            if rows:
                return Claim("claimed", body_hash)
            found = await db.execute_fetchall(
                "SELECT body_hash, state, record FROM idempotency WHERE tenant = ? AND key_hash = ? AND expires > ?",
                (tenant, key_hash, time.time()),
            )
            for bh, state, record in found:
                if state == "done":
                    return Claim("done", bh, Recorded.from_json(orjson.loads(record)))
                return Claim("inflight", bh)
        raise RuntimeError("idempotency claim did not settle")

    async def complete(self, tenant: str, key_hash: str, owner: str, body_hash: str, record: Recorded, ttl_s: float) -> bool:
        cur = await self._conn().execute(
            "UPDATE idempotency SET state = 'done', record = ?, expires = ? WHERE tenant = ? AND key_hash = ? AND owner = ? AND state = 'inflight'",
            (orjson.dumps(record.to_json()), time.time() + ttl_s, tenant, key_hash, owner),
        )
        return cur.rowcount == 1

    async def release(self, tenant: str, key_hash: str, owner: str, body_hash: str) -> None:
        await self._conn().execute(
            "DELETE FROM idempotency WHERE tenant = ? AND key_hash = ? AND owner = ? AND state = 'inflight'",
            (tenant, key_hash, owner),
        )

    async def sweep(self) -> int:
        """Delete expired records; returns how many."""
        cur = await self._conn().execute("DELETE FROM idempotency WHERE expires <= ?", (time.time(),))
        return cur.rowcount

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()
            self.db = None


_SET_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

_DEL_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisStore:
    """Idempotency records in Redis: ``I<owner>|<body hash>`` while in flight, ``D<json>`` when done."""

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._set_if_owner = client.redis.register_script(_SET_IF_OWNER)
        self._del_if_owner = client.redis.register_script(_DEL_IF_OWNER)

    def _key(self, tenant: str, key_hash: str) -> str:
        return f"{self.prefix}idem:{quote(tenant, safe='')}:{key_hash}"

    @staticmethod
    def _inflight(owner: str, body_hash: str) -> bytes:
        return f"I{owner}|{body_hash}".encode()

    async def claim(self, tenant: str, key_hash: str, body_hash: str, owner: str, lock_s: float) -> Claim:
        key = self._key(tenant, key_hash)
        r = self.client.redis
        for _ in range(3):
            ok = await self.client.run(r.set, key, self._inflight(owner, body_hash), nx=True, px=max(1, int(lock_s * 1000)))
            if ok:
                return Claim("claimed", body_hash)
            value = await self.client.run(r.get, key)
            if value is None:
                continue  # expired in between: claim again
            if value[:1] == b"D":
                d = orjson.loads(value[1:])
                return Claim("done", d["h"], Recorded.from_json(d["r"]))
            return Claim("inflight", value.decode().rpartition("|")[2])
        raise RuntimeError("idempotency claim did not settle")

    async def complete(self, tenant: str, key_hash: str, owner: str, body_hash: str, record: Recorded, ttl_s: float) -> bool:
        value = b"D" + orjson.dumps({"h": body_hash, "r": record.to_json()})
        done = await self.client.run(
            self._set_if_owner,
            keys=[self._key(tenant, key_hash)],
            args=[self._inflight(owner, body_hash), value, max(1, int(ttl_s * 1000))],
        )
        return bool(done)

    async def release(self, tenant: str, key_hash: str, owner: str, body_hash: str) -> None:
        await self.client.run(self._del_if_owner, keys=[self._key(tenant, key_hash)], args=[self._inflight(owner, body_hash)])

    async def close(self) -> None:
        return None


def recordable(status: int | None, error: object, disconnected: bool, body: Any) -> bool:
    """Whether an exchange's outcome is a final answer to record (else the claim is released)."""
    if status is None or error is not None or disconnected or body is None:
        return False
    return status < 500 and status not in _TRANSIENT


def record_headers(headers: dict[str, str], stream: bool) -> dict[str, str]:
    """The response headers worth replaying, with the right content type."""
    out = {k: v for k, v in headers.items() if k.lower() not in _SKIP_HEADERS and not k.lower().startswith("x-ratelimit-")}
    out = {k: v for k, v in out.items() if k.lower() != "content-type"}
    out["content-type"] = "text/event-stream" if stream else "application/json"
    return out


def is_replayable_stream(stream: bool, status: int | None, body: Any) -> bool:
    """A streamed answer is replayed as SSE only if it succeeded and was reassembled."""
    return stream and status == 200 and isinstance(body, dict) and body.get("object") in ("chat.completion", "text_completion")


def replay_reply(rec: Recorded, include_usage: bool = True) -> LocalReply:
    """The :class:`LocalReply` that replays a recorded answer.

    A stream is replayed as SSE events (the core adds ``[DONE]``); its usage
    chunk is sent only when the retry asked for ``stream_options.include_usage``.
    A streamed request whose first attempt ended in an error status is replayed
    as that JSON error, as it was first answered.
    """
    headers = dict(rec.headers)
    headers[REPLAY_HEADER] = "true"
    if rec.stream:
        return LocalReply(rec.status, b"", headers, sse_events=completion_to_sse(rec.body, include_usage))
    return LocalReply(rec.status, orjson.dumps(rec.body), headers)


def completion_to_sse(body: Any, include_usage: bool = True) -> list[bytes]:
    """Re-chunk a reassembled ``chat.completion`` (or ``text_completion``) as stream events.

    One chunk per choice carries the whole content and tool calls, a second its
    ``finish_reason``; a last chunk with empty ``choices`` carries ``usage``
    (when ``include_usage``).
    """
    if not isinstance(body, dict):
        return []
    chat = body.get("object") != "text_completion"
    base: dict[str, Any] = {
        "id": body.get("id", ""),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": body.get("created", int(time.time())),
        "model": body.get("model", ""),
    }
    if body.get("system_fingerprint") is not None:
        base["system_fingerprint"] = body["system_fingerprint"]
    events: list[bytes] = []
    for choice in body.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        idx = choice.get("index", 0)
        if chat:
            msg = choice.get("message") or {}
            delta: dict[str, Any] = {"role": msg.get("role", "assistant"), "content": msg.get("content")}
            if msg.get("refusal") is not None:
                delta["refusal"] = msg["refusal"]
            if msg.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **tc} for i, tc in enumerate(msg["tool_calls"]) if isinstance(tc, dict)]
            first = {"index": idx, "delta": delta, "finish_reason": None}
            last = {"index": idx, "delta": {}, "finish_reason": choice.get("finish_reason")}
            if choice.get("logprobs") is not None:
                first["logprobs"] = choice["logprobs"]
        else:
            first = {"index": idx, "text": choice.get("text", ""), "finish_reason": None}
            last = {"index": idx, "text": "", "finish_reason": choice.get("finish_reason")}
        events.append(orjson.dumps({**base, "choices": [first]}))
        events.append(orjson.dumps({**base, "choices": [last]}))
    if include_usage and body.get("usage") is not None:
        events.append(orjson.dumps({**base, "choices": [], "usage": body["usage"]}))
    return events


class Waiters:
    """Wakes local duplicates as soon as the first request of their key ends."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], tuple[asyncio.Event, list[int]]] = {}

    def __len__(self) -> int:
        return len(self._events)

    def wake(self, tenant: str, key_hash: str) -> None:
        entry = self._events.pop((tenant, key_hash), None)
        if entry is not None:
            entry[0].set()

    async def wait(self, tenant: str, key_hash: str, within_s: float) -> None:
        """Until woken locally or ``within_s`` passes (other processes are seen by polling)."""
        k = (tenant, key_hash)
        entry = self._events.get(k)
        if entry is None:
            entry = self._events[k] = (asyncio.Event(), [0])
        entry[1][0] += 1
        try:
            await asyncio.wait_for(entry[0].wait(), within_s)
        except TimeoutError:
            pass
        finally:
            entry[1][0] -= 1
            if entry[1][0] == 0 and self._events.get(k) is entry:
                del self._events[k]
