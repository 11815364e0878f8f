"""Typed errors that become OpenAI-format error bodies.

Every refusal Warden makes is a :class:`WardenError` (or a subclass) carrying the
HTTP status, the OpenAI error ``type`` and ``code``, and the ``rule`` that
refused.  The server renders it with :func:`error_body`; nothing else ever
reaches a client, so no stack trace can leak.
"""

from __future__ import annotations

from typing import Any

import orjson


class WardenError(Exception):
    """A refusal with an OpenAI-format rendering.

    ``rule`` names the configuration rule or check that refused (for example
    ``auth.exp`` or ``limits.rules[0]``); it is included in the message and the
    audit record so every refusal says which rule refused.
    """

    status: int = 400
    type: str = "invalid_request_error"
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        rule: str | None = None,
        param: str | None = None,
        status: int | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.rule = rule
        self.param = param
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if type is not None:
            self.type = type
        self.headers: dict[str, str] = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        message = self.message if self.rule is None else f"{self.message} (rule: {self.rule})"
        return {"error": {"message": message, "type": self.type, "code": self.code, "param": self.param}}


class BadRequest(WardenError):
    status, type, code = 400, "invalid_request_error", "bad_request"


class Unauthorized(WardenError):
    status, type, code = 401, "authentication_error", "invalid_token"


class Forbidden(WardenError):
    status, type, code = 403, "permission_error", "forbidden"


class NotFound(WardenError):
    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(WardenError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class Conflict(WardenError):
    status, type, code = 409, "invalid_request_error", "conflict"


class PayloadTooLarge(WardenError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class ToolCallInvalid(WardenError):
    status, type, code = 422, "invalid_request_error", "tool_call_invalid"


class RateLimited(WardenError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class UpstreamError(WardenError):
    status, type, code = 502, "api_error", "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status, type, code = 504, "api_error", "upstream_timeout"


class AuditUnavailable(WardenError):
    status, type, code = 503, "api_error", "audit_unavailable"


class ServiceUnavailable(WardenError):
    status, type, code = 503, "api_error", "service_unavailable"


class ConfigError(Exception):
    """Invalid configuration; the message names the key (``server.listen``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error at '{key}': {message}")
        self.key = key


def error_body(err: WardenError) -> bytes:
    """Serialize an error as an OpenAI-format JSON body."""
    return orjson.dumps(err.to_dict())


def internal_error(request_id: str) -> WardenError:
    """The error shown when something unexpected failed: no detail leaks."""
    return WardenError(
        f"internal error; see the Warden log for request {request_id}",
        status=500,
        type="api_error",
        code="internal_error",
    )
