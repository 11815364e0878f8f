"""Canonical tool-call arguments and the fingerprint that identifies a call.

Two calls are "the same call" when they name the same tool with the same
canonical arguments: JSON with sorted keys and no whitespace, where an
integral float (``100.0``) is written as the integer it equals (``100``), so a
model cannot slip a duplicate mutation past the check by reformatting a number.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson


def _normalize(value: Any) -> Any:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 2**63:
            return int(value)
        return value
    if isinstance(value, dict):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, integral floats as integers."""
    norm = _normalize(value)
    try:
        return orjson.dumps(norm, option=orjson.OPT_SORT_KEYS).decode()
    except (orjson.JSONEncodeError, TypeError):
        # Integers beyond 64 bits: orjson refuses them, the stdlib does not.
        return json.dumps(norm, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


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
