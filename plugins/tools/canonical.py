"""Canonical tool-call arguments and the fingerprint that identifies a call.

Two calls are "the same call" when they name the same tool with the same
canonical arguments: JSON with sorted keys and no whitespace, where an
integral float (``100.0``) is written as the integer it equals (``100``), so a
model cannot slip a duplicate mutation past the check by reformatting a number.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import orjson

from llm_warden.plugins.tools.bounds import MAX_DEPTH_LIMIT


class NotCanonical(ValueError):
    """A value with no canonical JSON form: nested deeper than
    :data:`~plugins.tools.bounds.MAX_DEPTH_LIMIT`, a NaN or infinite number,
    or an integer too long to write (over Python's 4300 digits)."""


def _normalize(value: Any, depth: int) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotCanonical("NaN and infinite numbers are not JSON")
        if value.is_integer() and abs(value) < 2**63:
            return int(value)
        return value
    if isinstance(value, dict | list):
        # The recursion is bounded here, whatever parser produced the value.
        if depth >= MAX_DEPTH_LIMIT:
            raise NotCanonical(f"nested deeper than {MAX_DEPTH_LIMIT} levels")
        if isinstance(value, dict):
            return {str(k): _normalize(v, depth + 1) for k, v in value.items()}
        return [_normalize(v, depth + 1) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, integral floats as integers.

    Raises :class:`NotCanonical` for values JSON cannot carry faithfully.
    """
    norm = _normalize(value, 0)
    try:
        return orjson.dumps(norm, option=orjson.OPT_SORT_KEYS).decode()
    except (orjson.JSONEncodeError, TypeError):
        pass
    # Integers beyond 64 bits: orjson refuses them, the stdlib does not
    # (up to the interpreter's limit on integer digits).
    try:
        return json.dumps(norm, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except ValueError as e:
        raise NotCanonical(str(e).split(";")[0]) from None


def fingerprint(tenant: str, subject: str, tool: str, canonical_args: str) -> str:
    """SHA-256 (hex) over tenant, subject, tool and canonical arguments.

    The parts are framed as a JSON array so no two different tuples share an
    encoding.
    """
    framed = orjson.dumps([tenant, subject, tool, canonical_args])
    return hashlib.sha256(framed).hexdigest()


def call_key(tool: str, canonical_args: str) -> str:
    """The key of a call within one conversation (tool + canonical arguments)."""
    return f"{tool}\x00{canonical_args}"
