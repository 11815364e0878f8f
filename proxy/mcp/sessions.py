"""Sealed session ids: the ``Mcp-Session-Id`` Warden gives a caller.

The id a caller holds is never the upstream's: it is the upstream session id,
the server name, the principal (tenant and subject) and the stdio process
generation, sealed with AES-256-GCM under ``[mcp] session_key_env``.  Any
replica holding the key opens it without shared memory; a session presented
by another principal, for another server, for a restarted stdio process or
forged is answered 404 (rule ``mcp.session``), which tells an MCP client to
start a new session.  The upstream's own id never reaches the caller.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from llm_warden.proxy.exchange import Principal

_AAD = b"warden.mcp.session.v1"
_PREFIX = "w1."
MAX_SESSION_ID = 1024


@dataclass(frozen=True, slots=True)
class Session:
    server: str
    tenant: str
    subject: str
    upstream_id: str
    generation: int


class SessionSealer:
    def __init__(self, key: bytes | None) -> None:
        self._aead = AESGCM(key if key is not None else os.urandom(32))

    def seal(self, s: Session) -> str:
        nonce = os.urandom(12)
        plain = orjson.dumps([s.server, s.tenant, s.subject, s.upstream_id, s.generation])
        token = base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, plain, _AAD)).rstrip(b"=").decode()
        return _PREFIX + token

    def open(self, value: str, server: str, principal: Principal) -> Session | None:
        """The session of ``value`` when it is genuine and belongs to this server and principal, else ``None``."""
        if not value.startswith(_PREFIX) or len(value) > MAX_SESSION_ID:
            return None
        body = value[len(_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            plain = self._aead.decrypt(raw[:12], raw[12:], _AAD)
            fields = orjson.loads(plain)
        except (ValueError, InvalidTag, orjson.JSONDecodeError):
            return None
        if not isinstance(fields, list) or len(fields) != 5:
            return None
        s = Session(*fields)
        if s.server != server or s.tenant != principal.tenant or s.subject != principal.subject:
            return None
        return s
