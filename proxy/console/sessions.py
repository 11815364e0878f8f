"""Console sessions: a signed-in operator's identity, kept server-side, with an expiry.

A session is created when an operator signs in with what the admin API
accepts (an admin JWT or the bootstrap token).  The browser holds only a
random session id (an HttpOnly cookie); the store keeps the principal, the
credential (so every action the console takes is re-authenticated by the
admin API itself, and an expired JWT ends the session), the CSRF token and
the expiry.  Sessions live in this process's memory: a replica's console
sessions are its own, so a load balancer in front of several admin listeners
needs session affinity, and a restart signs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from llm_warden.proxy.exchange import Principal

MAX_SESSIONS = 1000
"""Sessions kept at once; signing in beyond this ends the oldest session."""


@dataclass
class Session:
    """One signed-in operator."""

    principal: Principal
    credential: str
    """The ``Authorization`` header value the operator signed in with."""
    csrf: str
    """The synchronizer token every state-changing form must carry."""
    expires: float
    flash: list[tuple[str, str]] = field(default_factory=list)
    """Messages (kind, text) shown once on the next page."""

    def csrf_ok(self, token: str) -> bool:
        return hmac.compare_digest(self.csrf.encode(), token.encode("utf-8", "surrogateescape"))


class Sessions:
    """Server-side sessions keyed by a hash of the cookie value (the cookie itself is never stored)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.time, max_sessions: int = MAX_SESSIONS) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_sessions = max_sessions
        self._by_hash: OrderedDict[bytes, Session] = OrderedDict()

    @staticmethod
    def _key(sid: str) -> bytes:
        return hashlib.sha256(sid.encode("utf-8", "surrogateescape")).digest()

    def create(self, principal: Principal, credential: str, credential_expires: float | None) -> tuple[str, Session]:
        """A new session; returns the cookie value and the session."""
        now = self.clock()
        expires = now + self.ttl_s
        if credential_expires is not None:
            expires = min(expires, credential_expires)
        sid = secrets.token_urlsafe(32)
        session = Session(principal=principal, credential=credential, csrf=secrets.token_urlsafe(32), expires=expires)
        self._by_hash[self._key(sid)] = session
        while len(self._by_hash) > self.max_sessions:
            self._by_hash.popitem(last=False)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        """The live session of a cookie value, or ``None`` (an expired session is removed)."""
        if not sid or len(sid) > 128:
            return None
        key = self._key(sid)
        session = self._by_hash.get(key)
        if session is None:
            return None
        if self.clock() >= session.expires:
            del self._by_hash[key]
            return None
        return session

    def drop(self, sid: str | None) -> None:
        if sid:
            self._by_hash.pop(self._key(sid), None)

    def __len__(self) -> int:
        return len(self._by_hash)
