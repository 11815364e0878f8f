"""Tool state in Redis: approvals and the read-only switch shared by every replica.

Chosen with ``[policy] state_backend = "redis"``.  Same interface as the
SQLite :class:`~plugins.tools.store.ToolStateStore`, so the judge and the admin
API do not care which one runs.

Keys (all under ``redis_key_prefix``, default ``warden:tools:``):

- ``apr:<id>`` — a hash per approval.  The key expires ``HISTORY_S`` after
  the approval's own ``expires`` time, so decided/consumed/expired approvals
  stay visible to the admin API for a while and then vanish by themselves.
- ``fp:<fingerprint>`` — the id of the latest approval for that call
  (same expiry as the approval).
- ``idx:all`` and ``idx:t:<tenant>`` — sorted sets of ids by ``created``,
  for listing newest first; stale members are trimmed lazily.
- ``pending`` — sorted set of pending ids by ``expires`` (``pending_count``).
- ``mode`` — a hash: ``global`` and ``t:<tenant>`` to a JSON setting;
  ``mode:version`` is bumped on every change so replicas notice.

Every state transition (approve/deny only when pending; consume only when
approved and unexpired) is one Lua script, so two replicas racing on the same
approval cannot both win.  Connection failures raise
:class:`~plugins.tools.store.StateBackendDown` (rule ``policy.state_backend``),
logged once per outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

import orjson

from llm_warden.plugins.tools.store import Approval, ModeSetting, StateBackendDown, new_pending

log = logging.getLogger("warden.tools")

HISTORY_S = 7 * 86400.0
"""How long an approval stays in Redis after its ``expires`` time."""
TIMEOUT_S = 1.0
"""Connect and command timeout: a stalled Redis refuses calls quickly rather than hanging them."""
_SCAN_BATCH = 200

# KEYS[1] approval hash, KEYS[2] pending zset; ARGV: now, request_id, id
CONSUME_LUA = """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'approved' then return 0 end
local exp = tonumber(redis.call('HGET', KEYS[1], 'expires'))
local now = tonumber(ARGV[1])
if exp == nil or exp <= now then return 0 end
redis.call('HSET', KEYS[1], 'status', 'consumed', 'consumed_at', ARGV[1], 'consumed_request_id', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
"""

# KEYS[1] approval hash, KEYS[2] pending zset, KEYS[3] fingerprint key;
# ARGV: now, verdict, reviewer json, comment, new expires, expire-at ms, id
DECIDE_LUA = """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'pending' then return 0 end
local exp = tonumber(redis.call('HGET', KEYS[1], 'expires'))
local now = tonumber(ARGV[1])
if exp == nil or exp <= now then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'decided_at', ARGV[1], 'reviewer', ARGV[3], 'comment', ARGV[4], 'expires', ARGV[5])
redis.call('PEXPIREAT', KEYS[1], ARGV[6])
if redis.call('GET', KEYS[3]) == ARGV[7] then redis.call('PEXPIREAT', KEYS[3], ARGV[6]) end
redis.call('ZREM', KEYS[2], ARGV[7])
return 1
"""


def _f(v: bytes | None) -> float | None:
    return None if v is None or v == b"" else float(v)


def _s(v: bytes | None) -> str | None:
    return None if v is None else v.decode()


def _approval(h: dict[bytes, bytes]) -> Approval | None:
    if not h or b"id" not in h:
        return None
    reviewer = h.get(b"reviewer")
    return Approval(
        id=h[b"id"].decode(),
        fingerprint=h[b"fingerprint"].decode(),
        tenant=h[b"tenant"].decode(),
        subject=h[b"subject"].decode(),
        principal=orjson.loads(h[b"principal"]),
        tool=h[b"tool"].decode(),
        arguments=h[b"arguments"].decode(),
        request_id=h[b"request_id"].decode(),
        status=h[b"status"].decode(),
        created=float(h[b"created"]),
        expires=float(h[b"expires"]),
        decided_at=_f(h.get(b"decided_at")),
        reviewer=orjson.loads(reviewer) if reviewer else None,
        comment=_s(h.get(b"comment")),
        consumed_at=_f(h.get(b"consumed_at")),
        consumed_request_id=_s(h.get(b"consumed_request_id")),
    )


def _matches(apr: Approval, status: str, now: float) -> bool:
    return status == "all" or apr.effective_status(now) == status


class RedisToolStateStore:
    """Approvals and read-only mode in Redis, shared by every replica."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio as aioredis
        from redis import exceptions as rexc

        self.url = url
        self.prefix = prefix
        self._exc: tuple[type[BaseException], ...] = (rexc.ConnectionError, rexc.TimeoutError, OSError, TimeoutError)
        self.redis: Any = aioredis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self._consume = self.redis.register_script(CONSUME_LUA)
        self._decide = self.redis.register_script(DECIDE_LUA)
        self._version: bytes | None = None
        self._seen_version = False
        self.down = False
        self._outage = False

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Await one Redis call; connection failures become :class:`StateBackendDown` (logged once per outage)."""
        try:
            result = await fn(*args, **kwargs)
        except self._exc as e:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # redis-py may turn a cancellation into a connection error: keep it a cancellation.
                raise asyncio.CancelledError() from e
            self._outage = True
            if not self.down:
                self.down = True
                log.error("tool state backend redis unreachable (%s): approvals are refused, read-only mode keeps its last value", e)
            raise StateBackendDown(f"the tool state backend (redis) is unreachable: {type(e).__name__}") from e
        if self.down:
            self.down = False
            log.warning("tool state backend redis reachable again")
        return result

    async def open(self) -> None:
        """Check the connection (raises :class:`StateBackendDown` when Redis is unreachable)."""
        await self._run(self.redis.ping)

    async def close(self) -> None:
        await self.redis.aclose()

    async def changed_elsewhere(self) -> bool:
        """True when the mode version changed since the last call, or was never read, or Redis was
        unreachable meanwhile (it may have restarted empty)."""
        outage = self._outage
        version = await self._run(self.redis.get, self._k("mode", "version"))
        self._outage = False
        changed = outage or not self._seen_version or version != self._version
        self._version = version
        self._seen_version = True
        return changed

    # -- read-only mode -------------------------------------------------

    async def load_modes(self) -> tuple[ModeSetting | None, dict[str, ModeSetting]]:
        """The stored global setting (or ``None``) and the per-tenant ones."""
        raw: dict[bytes, bytes] = await self._run(self.redis.hgetall, self._k("mode"))
        glob: ModeSetting | None = None
        tenants: dict[str, ModeSetting] = {}
        for field, value in raw.items():
            data = orjson.loads(value)
            setting = ModeSetting(bool(data["read_only"]), float(data["updated"]), data["actor"])
            name = field.decode()
            if name == "global":
                glob = setting
            elif name.startswith("t:"):
                tenants[name[2:]] = setting
        return glob, tenants

    async def set_mode(self, tenant: str | None, read_only: bool | None, actor: dict[str, Any]) -> None:
        """Store a setting; ``read_only=None`` removes it (back to the default)."""
        field = "global" if tenant is None else f"t:{tenant}"
        pipe = self.redis.pipeline(transaction=True)
        if read_only is None:
            pipe.hdel(self._k("mode"), field)
        else:
            pipe.hset(self._k("mode"), field, orjson.dumps({"read_only": read_only, "updated": time.time(), "actor": actor}))
        pipe.incr(self._k("mode", "version"))
        await self._run(pipe.execute)

    # -- approvals ------------------------------------------------------

    async def get(self, approval_id: str) -> Approval | None:
        if not approval_id or len(approval_id) > 128:
            return None
        return _approval(await self._run(self.redis.hgetall, self._k("apr", approval_id)))

    async def latest_for(self, fingerprint: str) -> Approval | None:
        """The most recent approval for this fingerprint."""
        approval_id = await self._run(self.redis.get, self._k("fp", fingerprint))
        return None if approval_id is None else await self.get(approval_id.decode())

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
        """Record a new pending approval (one MULTI/EXEC)."""
        now = time.time() if now is None else now
        apr = new_pending(fingerprint, principal, tool, arguments, request_id, now, ttl_s)
        key = self._k("apr", apr.id)
        expire_at_ms = int((apr.expires + HISTORY_S) * 1000)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "id": apr.id,
                "fingerprint": fingerprint,
                "tenant": apr.tenant,
                "subject": apr.subject,
                "principal": orjson.dumps(principal),
                "tool": tool,
                "arguments": arguments,
                "request_id": request_id,
                "status": "pending",
                "created": repr(apr.created),
                "expires": repr(apr.expires),
            },
        )
        pipe.pexpireat(key, expire_at_ms)
        pipe.set(self._k("fp", fingerprint), apr.id, pxat=expire_at_ms)
        pipe.zadd(self._k("idx", "all"), {apr.id: now})
        pipe.zadd(self._k("idx", "t", apr.tenant), {apr.id: now})
        pipe.zadd(self._k("pending"), {apr.id: apr.expires})
        await self._run(pipe.execute)
        return apr

    async def consume(self, approval_id: str, request_id: str, now: float | None = None) -> bool:
        """Use an approved, unexpired approval once, atomically; ``False`` if someone else did."""
        now = time.time() if now is None else now
        done = await self._run(
            self._consume, keys=[self._k("apr", approval_id), self._k("pending")], args=[repr(now), request_id, approval_id]
        )
        return int(done) == 1

    async def decide(
        self,
        approval_id: str,
        verdict: Literal["approved", "denied"],
        reviewer: dict[str, Any],
        comment: str,
        ttl_s: float,
        now: float | None = None,
    ) -> bool:
        """Approve or deny a pending, unexpired approval atomically; ``False`` if it was not.

        An approval is usable for ``ttl_s`` from the moment it is granted; a
        denial is remembered for ``ttl_s``.
        """
        now = time.time() if now is None else now
        apr = await self.get(approval_id)
        if apr is None:
            return False
        expires = now + ttl_s
        done = await self._run(
            self._decide,
            keys=[self._k("apr", approval_id), self._k("pending"), self._k("fp", apr.fingerprint)],
            args=[repr(now), verdict, orjson.dumps(reviewer), comment, repr(expires), int((expires + HISTORY_S) * 1000), approval_id],
        )
        return int(done) == 1

    async def list(self, status: str, limit: int = 200, now: float | None = None, tenant: str | None = None) -> list[Approval]:
        """Approvals with this (effective) status, newest first (of one tenant when ``tenant`` is given)."""
        now = time.time() if now is None else now
        index = self._k("idx", "all") if tenant is None else self._k("idx", "t", tenant)
        out: list[Approval] = []
        gone: list[bytes] = []
        start = 0
        while len(out) < limit:
            ids: list[bytes] = await self._run(self.redis.zrevrange, index, start, start + _SCAN_BATCH - 1)
            if not ids:
                break
            start += len(ids)
            pipe = self.redis.pipeline(transaction=False)
            for i in ids:
                pipe.hgetall(self._k("apr", i.decode()))
            rows = await self._run(pipe.execute)
            for i, row in zip(ids, rows, strict=True):
                apr = _approval(row)
                if apr is None:
                    gone.append(i)
                elif _matches(apr, status, now):
                    out.append(apr)
                    if len(out) >= limit:
                        break
        if gone:
            await self._run(self.redis.zrem, index, *gone)
        return out

    async def pending_count(self, now: float | None = None) -> int:
        """Pending, unexpired approvals (expired ones are trimmed from the set)."""
        now = time.time() if now is None else now
        pipe = self.redis.pipeline(transaction=True)
        pipe.zremrangebyscore(self._k("pending"), "-inf", repr(now))
        pipe.zcard(self._k("pending"))
        _, count = await self._run(pipe.execute)
        return int(count)
