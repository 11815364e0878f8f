"""Bounds on JSON a client or a provider controls."""

from __future__ import annotations

from typing import Any


def depth_exceeds(obj: Any, raw: bytes | None, limit: int) -> bool:
    """Whether ``obj`` nests arrays and objects more than ``limit`` levels deep.

    ``raw`` (the bytes ``obj`` was parsed from) gives a fast path: with no
    more than ``limit`` opening brackets in all, the depth cannot pass it.
    Otherwise an iterative walk (never Python recursion, whatever the depth).
    """
    if raw is not None and raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        t = type(o)
        if t is dict:
            values: Any = o.values()
        elif t is list:
            values = o
        else:
            continue
        if d > limit:
            return True
        for v in values:
            tv = type(v)
            if tv is dict or tv is list:
                stack.append((v, d + 1))
    return False
