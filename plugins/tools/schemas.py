"""JSON Schema compilation for the tool registry, and how a failing validator is recognised.

Every schema of the registry (a tool's arguments, ``approval_if``, a rule's
``when``) is compiled once at load with ``jsonschema-rs`` (Draft 2020-12):
formats are asserted and remote ``$ref`` refused.
"""

from __future__ import annotations

from typing import Any

import jsonschema_rs


def _refuse_remote(uri: str) -> Any:
    raise ValueError(f"remote $ref {uri!r} is not allowed; inline the schema or use $defs")


def compile_schema(schema: dict[str, Any]) -> jsonschema_rs.Draft202012Validator:
    """Compile a Draft 2020-12 schema; formats are asserted, remote refs refused.

    Raises ``ValueError`` with the validator's message when the schema is invalid.
    """
    try:
        return jsonschema_rs.Draft202012Validator(schema, validate_formats=True, retriever=_refuse_remote)
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(first) from None


def validator_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failure of a check itself, to be turned into a decision.

    Every ``Exception`` is; so is the ``PanicException`` a Rust extension
    (jsonschema-rs) raises when it panics, which derives from
    ``BaseException``.  Cancellation and interpreter exits are not.
    """
    return isinstance(error, Exception) or type(error).__name__ == "PanicException"
