"""GCRA (generic cell rate algorithm) with exact integer arithmetic.

A limit of ``N`` per ``window`` admits ``N`` at once (the burst) and then one
unit every ``window / N`` (the steady rate), never more.  The state of one key
is a single number, the *theoretical arrival time* (TAT): the instant at which
the bucket would be full again.

Arithmetic is in integer microseconds so that the in-process backend and the
Redis Lua script (whose numbers are IEEE doubles, exact below 2**53) reach the
same decisions bit for bit.  The emission interval ``T = ceil(window_us / N)``
is rounded *up* and the burst capacity is ``N * T``: a burst of exactly ``N``
is admitted and the steady rate is at most ``N / window`` (slower by under one
microsecond per unit when ``window_us`` is not a multiple of ``N``).

:class:`MemoryGCRA` keeps the TATs in a dict.  A decision is plain Python with
no ``await``, so on the event loop it is atomic without a lock.  Keys whose TAT
has passed carry no information (a fresh key behaves the same) and are evicted
by an amortised sweep, so memory stays proportional to the live keys.

This is a core utility because more than one plugin rate-limits (the limits
plugin's request and token budgets, the tools plugin's per-tool
``rate_limit``) and plugins never import one another.  A backend that keeps
the TATs elsewhere (the limits plugin's Redis script) reuses :func:`decide`
and :func:`to_result` so both reach the same decisions.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import cached_property

_US = 1_000_000

#: Largest rate accepted: one unit per microsecond.
MAX_RATE_PER_SECOND = _US

_UNITS: dict[str, float] = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}

_RATE_RE = re.compile(r"^\s*(\d[\d_]*)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-zA-Z]+)\s*$")


@dataclass(frozen=True)
class Rate:
    """``count`` units per ``period_s`` seconds."""

    count: int
    period_s: float

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count <= 0:
            raise ValueError(f"rate count must be a positive integer, got {self.count!r}")
        if not self.period_s > 0:
            raise ValueError(f"rate period must be positive, got {self.period_s!r}")
        if self.period_us // self.count < 1:
            raise ValueError(f"rate {self.count}/{self.period_s:g}s is faster than {MAX_RATE_PER_SECOND} per second")

    @cached_property
    def period_us(self) -> int:
        """The window in integer microseconds."""
        return max(1, round(self.period_s * _US))

    @cached_property
    def interval_us(self) -> int:
        """Emission interval ``T``: microseconds per unit, rounded up."""
        return -(-self.period_us // self.count)

    @cached_property
    def capacity_us(self) -> int:
        """Burst capacity ``N * T``: how far the TAT may run ahead of now."""
        return self.count * self.interval_us

    def __str__(self) -> str:
        p = self.period_s
        for name, secs in (("day", 86400.0), ("hour", 3600.0), ("minute", 60.0), ("second", 1.0)):
            if p == secs:
                return f"{self.count}/{name}"
        return f"{self.count}/{p:g}s"


def parse_rate(text: str) -> Rate:
    """Parse ``"5/minute"``, ``"600/min"``, ``"10/second"``, ``"1000/hour"``,
    ``"1/day"`` or ``"20/30s"`` (N per a multiple of a unit).

    Raises :class:`ValueError` with a message that shows the accepted forms.
    """
    if not isinstance(text, str):
        raise ValueError(f"rate must be a string like '600/minute', got {type(text).__name__}")
    m = _RATE_RE.match(text)
    if m is None:
        raise ValueError(f"invalid rate {text!r}: expected N/UNIT or N/<number><unit>, e.g. '600/minute', '10/second', '20/30s'")
    count_s, mult_s, unit = m.groups()
    unit_s = _UNITS.get(unit.lower())
    if unit_s is None:
        raise ValueError(f"invalid rate {text!r}: unknown unit {unit!r} (use second, minute, hour, day or s, m, h, d)")
    count = int(count_s.replace("_", ""))
    mult = float(mult_s) if mult_s is not None else 1.0
    if count <= 0:
        raise ValueError(f"invalid rate {text!r}: the count must be positive")
    if mult <= 0:
        raise ValueError(f"invalid rate {text!r}: the period must be positive")
    return Rate(count, mult * unit_s)


@dataclass(frozen=True)
class LimitResult:
    """The outcome of one limit check.

    ``remaining`` is how many units could still be taken at once right now;
    ``retry_after_s`` is 0 when allowed, else the wait until this request
    would be admitted; ``reset_s`` is the time until the bucket is full again.
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float
    reset_s: float


def decide(tat_us: int, now_us: int, interval_us: int, capacity_us: int, count: int, cost: int) -> tuple[bool, int, int, int, int]:
    """One GCRA step: ``(allowed, new_tat, remaining, retry_after_us, reset_us)``.

    Pure integer arithmetic, so a Lua script on Redis can mirror it line by line.
    ``new_tat`` equals the (clamped) old TAT when refused.
    """
    tat = tat_us if tat_us > now_us else now_us
    new_tat = tat + cost * interval_us
    if new_tat - now_us <= capacity_us:
        remaining = (capacity_us - (new_tat - now_us)) // interval_us
        return True, new_tat, remaining, 0, new_tat - now_us
    remaining = (capacity_us - (tat - now_us)) // interval_us
    if cost > count:
        retry = -1
    else:
        retry = new_tat - capacity_us - now_us
    return False, tat, remaining, retry, tat - now_us


def to_result(rate: Rate, allowed: bool, remaining: int, retry_us: int, reset_us: int) -> LimitResult:
    """Build a :class:`LimitResult`; ``retry_us == -1`` (never admissible) maps to ``inf``."""
    retry = float("inf") if retry_us < 0 else retry_us / _US
    return LimitResult(allowed, rate.count, max(0, remaining), retry, reset_us / _US)


class MemoryGCRA:
    """In-process GCRA store: exact, lock-free on the event loop.

    ``now`` arguments are seconds on any monotonic clock (default
    ``time.monotonic()``); tests pass explicit values.
    """

    def __init__(self, min_sweep: int = 1024) -> None:
        self._tat: dict[str, int] = {}
        self._min_sweep = max(16, min_sweep)
        self._sweep_at = self._min_sweep

    def __len__(self) -> int:
        return len(self._tat)

    @staticmethod
    def _now_us(now: float | None) -> int:
        return int((time.monotonic() if now is None else now) * _US)

    def check(self, key: str, rate: Rate, cost: int = 1, now: float | None = None) -> LimitResult:
        """Take ``cost`` units from ``key`` if the rate admits them."""
        return self.check_many([(key, rate, cost)], now)[0]

    def check_many(self, items: list[tuple[str, Rate, int]], now: float | None = None) -> list[LimitResult]:
        """All-or-nothing: admit only if every item admits, then charge all.

        The same key may appear more than once; later items see earlier charges.
        """
        now_us = self._now_us(now)
        pending: dict[str, int] = {}
        decided: list[tuple[Rate, bool, int, int, int]] = []
        all_ok = True
        for key, rate, cost in items:
            if cost < 0:
                raise ValueError(f"cost must be >= 0, got {cost}")
            tat = pending.get(key)
            if tat is None:
                tat = self._tat.get(key, 0)
            ok, new_tat, remaining, retry, reset = decide(tat, now_us, rate.interval_us, rate.capacity_us, rate.count, cost)
            pending[key] = new_tat
            all_ok = all_ok and ok
            decided.append((rate, ok, remaining, retry, reset))
        if not all_ok:
            # Nothing is charged; an item that would have passed reports its
            # state without this request's charge.
            out: list[LimitResult] = []
            for (key, rate, _cost), (_, ok, remaining, retry, reset) in zip(items, decided, strict=True):
                if ok:
                    tat = max(self._tat.get(key, 0), now_us)
                    remaining = (rate.capacity_us - (tat - now_us)) // rate.interval_us
                    out.append(to_result(rate, True, remaining, 0, tat - now_us))
                else:
                    out.append(to_result(rate, False, remaining, retry, reset))
            return out
        self._tat.update(pending)
        if len(self._tat) >= self._sweep_at:
            self.sweep(now_us)
        return [to_result(rate, ok, remaining, retry, reset) for rate, ok, remaining, retry, reset in decided]

    def adjust(self, key: str, rate: Rate, delta: int, now: float | None = None) -> None:
        """Charge (``delta > 0``) or refund (``delta < 0``) units without a check.

        Used to reconcile a reservation with the real usage.  A refund never
        moves the TAT before now; an extra charge may push it past the burst
        capacity, which delays later requests (the usage really happened).
        """
        if delta == 0:
            return
        now_us = self._now_us(now)
        tat = max(self._tat.get(key, 0), now_us) + delta * rate.interval_us
        if tat <= now_us:
            self._tat.pop(key, None)
        else:
            self._tat[key] = tat

    def peek(self, key: str, rate: Rate, now: float | None = None) -> LimitResult:
        """The state of ``key`` without charging anything."""
        now_us = self._now_us(now)
        tat = max(self._tat.get(key, 0), now_us)
        remaining = (rate.capacity_us - (tat - now_us)) // rate.interval_us
        return to_result(rate, remaining > 0, remaining, 0, tat - now_us)

    def tats(self, keys: list[str], prefix: str | None, max_examined: int) -> tuple[int, dict[str, int], bool]:
        """Read-only: ``(now_us, {key: TAT}, complete)`` for the live keys among ``keys`` and those starting with ``prefix``.

        The prefix walk examines at most ``max_examined`` keys; ``complete`` is
        False when it stopped there.  Keys whose TAT has passed are left out
        (they carry no state).
        """
        now_us = self._now_us(None)
        found = {k: t for k in keys if (t := self._tat.get(k, 0)) > now_us}
        complete = True
        if prefix is not None:
            for examined, (k, t) in enumerate(self._tat.items()):
                if examined >= max_examined:
                    complete = False
                    break
                if t > now_us and k.startswith(prefix):
                    found[k] = t
        return now_us, found, complete

    def sweep(self, now_us: int | None = None) -> int:
        """Evict keys whose TAT has passed; return how many were evicted.

        Runs automatically when the key count doubles since the last sweep,
        so the cost is amortised O(1) per decision.
        """
        now_us = self._now_us(None) if now_us is None else now_us
        dead = [k for k, tat in self._tat.items() if tat <= now_us]
        for k in dead:
            del self._tat[k]
        self._sweep_at = max(self._min_sweep, 2 * len(self._tat))
        return len(dead)
