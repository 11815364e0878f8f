"""Limit backends: in-process (:class:`MemoryBackend`) and shared (:class:`RedisBackend`).

Both take a whole request's checks at once (every matching rule, requests and
tokens) and admit all or nothing.  The Redis backend runs the same integer GCRA
as :mod:`proxy.gcra` in one Lua script (one ``EVALSHA`` round trip),
with Redis' own clock (``TIME``) so replicas with skewed clocks still agree,
and keys that expire when their bucket is full again.

An unreachable Redis raises :class:`BackendDown`; :class:`RedisHealth` turns
the failures of an outage into one log line, one "recovered" line, and a
``backend_up`` flag for metrics, and spaces out probes while Redis is down so
that requests do not each wait for a connect timeout.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from llm_warden.proxy.gcra import LimitResult, MemoryGCRA, Rate, to_result

log = logging.getLogger("warden.limits")

Item = tuple[str, Rate, int]


class BackendDown(Exception):
    """The shared backend cannot be reached (or is being skipped until the next probe)."""


class LimitBackend(Protocol):
    async def check_many(self, items: list[Item]) -> list[LimitResult]: ...

    async def adjust(self, items: list[Item]) -> None: ...

    async def read(self, keys: list[str], prefix: str | None, max_examined: int) -> tuple[int, dict[str, int], bool]:
        """Read-only: ``(now_us, {key: TAT}, complete)`` for the live keys among ``keys`` and starting with ``prefix``."""
        ...

    async def close(self) -> None: ...


class MemoryBackend:
    """One process, exact; the decision never awaits, so it is atomic on the loop."""

    def __init__(self) -> None:
        self.store = MemoryGCRA()

    async def check_many(self, items: list[Item]) -> list[LimitResult]:
        return self.store.check_many(items)

    async def adjust(self, items: list[Item]) -> None:
        for key, rate, delta in items:
            self.store.adjust(key, rate, delta)

    async def read(self, keys: list[str], prefix: str | None, max_examined: int) -> tuple[int, dict[str, int], bool]:
        return self.store.tats(keys, prefix, max_examined)

    async def close(self) -> None:
        return None


# ARGV per key: interval_us, capacity_us, cost.  Returns {all_ok, {allowed, remaining, retry_us, reset_us}...}.
# Mirrors gcra.decide() and MemoryGCRA.check_many() exactly (integers below 2**53 are exact doubles).
CHECK_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stored, pending, out = {}, {}, {}
local all_ok = 1
for i = 1, #KEYS do
  local key = KEYS[i]
  local T = tonumber(ARGV[3*i-2])
  local cap = tonumber(ARGV[3*i-1])
  local cost = tonumber(ARGV[3*i])
  if stored[key] == nil then
    local v = redis.call('GET', key)
    stored[key] = v and tonumber(v) or 0
  end
  local tat = pending[key] or stored[key]
  if tat < now then tat = now end
  local new = tat + cost * T
  if new - now <= cap then
    pending[key] = new
    out[i] = {1, math.floor((cap - (new - now)) / T), 0, new - now}
  else
    all_ok = 0
    pending[key] = tat
    local retry = -1
    if cost * T <= cap then retry = new - cap - now end
    out[i] = {0, math.floor((cap - (tat - now)) / T), retry, tat - now}
  end
end
if all_ok == 1 then
  for key, tat in pairs(pending) do
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1)
  end
else
  for i = 1, #KEYS do
    if out[i][1] == 1 then
      local T = tonumber(ARGV[3*i-2])
      local cap = tonumber(ARGV[3*i-1])
      local tat = stored[KEYS[i]]
      if tat < now then tat = now end
      out[i] = {1, math.floor((cap - (tat - now)) / T), 0, tat - now}
    end
  end
end
return {all_ok, out}
"""

# ARGV per key: interval_us, delta (units; negative refunds).
ADJUST_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local T = tonumber(ARGV[2*i-1])
  local delta = tonumber(ARGV[2*i])
  local v = redis.call('GET', KEYS[i])
  local tat = v and tonumber(v) or 0
  if tat < now then tat = now end
  tat = tat + delta * T
  if tat <= now then
    redis.call('DEL', KEYS[i])
  else
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1)
  end
end
return #KEYS
"""


class RedisHealth:
    """Tracks whether Redis is reachable: logs once per outage, probes at most every ``retry_s``."""

    def __init__(self, url: str, retry_s: float, fail_open: bool) -> None:
        self.url = url
        self.retry_s = retry_s
        self.fail_open = fail_open
        self.up = True
        self.down_since: float | None = None
        self.next_probe = 0.0
        self.errors = 0
        self.outages = 0

    def may_try(self) -> bool:
        """True when Redis is believed up, or a probe is due."""
        if self.up:
            return True
        now = time.monotonic()
        if now >= self.next_probe:
            self.next_probe = now + self.retry_s
            return True
        return False

    def failed(self, err: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        self.next_probe = now + self.retry_s
        if self.up:
            self.up = False
            self.down_since = now
            self.outages += 1
            action = "admitting requests (fail_open = true)" if self.fail_open else "refusing requests with 503 (fail_open = false)"
            log.error(
                "limits: Redis at %s is unreachable (%s: %s); %s until it is back", _safe_url(self.url), type(err).__name__, err, action
            )

    def succeeded(self) -> None:
        if not self.up:
            took = time.monotonic() - (self.down_since or time.monotonic())
            log.warning("limits: Redis at %s is reachable again after %.1f s; limits enforced again", _safe_url(self.url), took)
            self.up = True
            self.down_since = None


def _safe_url(url: str) -> str:
    """The URL without a password."""
    from urllib.parse import urlparse

    u = urlparse(url)
    if u.password:
        netloc = f"{u.username or ''}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
        return u._replace(netloc=netloc).geturl()
    return url


class RedisClient:
    """One pooled ``redis.asyncio`` client shared by limits and idempotency, with health tracking."""

    def __init__(self, url: str, timeout_s: float, max_connections: int, retry_s: float, fail_open: bool) -> None:
        import redis.asyncio as aioredis
        from redis import exceptions as rexc

        self._exc: tuple[type[BaseException], ...] = (rexc.ConnectionError, rexc.TimeoutError, OSError, TimeoutError)
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        self.redis: Any = aioredis.Redis(connection_pool=pool)
        self.health = RedisHealth(url, retry_s, fail_open)

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Await ``fn(*args)``; connection failures become :class:`BackendDown`."""
        if not self.health.may_try():
            raise BackendDown("redis down (waiting for the next probe)")
        try:
            result = await fn(*args, **kwargs)
        except self._exc as e:
            self.health.failed(e)
            raise BackendDown(str(e)) from e
        self.health.succeeded()
        return result

    async def close(self) -> None:
        await self.redis.aclose()


class RedisBackend:
    """GCRA in Redis: one atomic script per decision, Redis time as the clock."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._check = client.redis.register_script(CHECK_LUA)
        self._adjust = client.redis.register_script(ADJUST_LUA)

    async def check_many(self, items: list[Item]) -> list[LimitResult]:
        keys: list[str] = []
        args: list[int] = []
        for key, rate, cost in items:
            if cost < 0:
                raise ValueError(f"cost must be >= 0, got {cost}")
            keys.append(key)
            args += (rate.interval_us, rate.capacity_us, cost)
        _all_ok, rows = await self.client.run(self._check, keys=keys, args=args)
        return [to_result(rate, bool(r[0]), int(r[1]), int(r[2]), int(r[3])) for (_, rate, _c), r in zip(items, rows, strict=True)]

    async def adjust(self, items: list[Item]) -> None:
        items = [i for i in items if i[2] != 0]
        if not items:
            return
        keys = [k for k, _, _ in items]
        args: list[int] = []
        for _, rate, delta in items:
            args += (rate.interval_us, delta)
        await self.client.run(self._adjust, keys=keys, args=args)

    async def read(self, keys: list[str], prefix: str | None, max_examined: int) -> tuple[int, dict[str, int], bool]:
        """``TIME``, a bounded ``SCAN ... MATCH prefix* COUNT`` (at most ``max_examined`` keys examined) and ``MGET``; writes nothing."""
        r = self.client.redis
        sec, usec = await self.client.run(r.time)
        now_us = int(sec) * 1_000_000 + int(usec)
        names = list(dict.fromkeys(keys))
        complete = True
        if prefix is not None:
            count = max(1, min(SCAN_COUNT, max_examined))
            calls, cursor = 0, 0
            while True:
                cursor, batch = await self.client.run(r.scan, cursor=cursor, match=glob_escape(prefix) + "*", count=count)
                names += [k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k) for k in batch]
                calls += 1
                if int(cursor) == 0:
                    break
                if calls * count >= max_examined:
                    complete = False
                    break
            names = list(dict.fromkeys(names))
        found: dict[str, int] = {}
        for i in range(0, len(names), SCAN_COUNT):
            chunk = names[i : i + SCAN_COUNT]
            for name, value in zip(chunk, await self.client.run(r.mget, chunk), strict=True):
                try:
                    tat = int(value) if value is not None else 0
                except ValueError:
                    continue  # not a limit key of ours
                if tat > now_us:
                    found[name] = tat
        return now_us, found, complete

    async def close(self) -> None:
        return None


#: Keys examined per ``SCAN`` call (and per ``MGET``) when the admin API reads usage.
SCAN_COUNT = 1000


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis ``MATCH`` pattern."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)
