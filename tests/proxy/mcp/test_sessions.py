"""Sealed session ids: opened only for their own server and principal, by any holder of the key."""

from __future__ import annotations

import os

from llm_warden.proxy.exchange import Principal
from llm_warden.proxy.mcp.sessions import Session, SessionSealer

ALICE = Principal("acme", "alice")


def test_seal_and_open() -> None:
    key = os.urandom(32)
    s = Session("crm", "acme", "alice", "upstream-123", 0)
    sealed = SessionSealer(key).seal(s)
    assert "upstream-123" not in sealed and sealed.isascii() and sealed.isprintable()
    # Another replica with the same key opens it; one with another key does not.
    assert SessionSealer(key).open(sealed, "crm", ALICE) == s
    assert SessionSealer(os.urandom(32)).open(sealed, "crm", ALICE) is None


def test_bound_to_server_and_principal() -> None:
    sealer = SessionSealer(None)
    sealed = sealer.seal(Session("crm", "acme", "alice", "u", 3))
    assert sealer.open(sealed, "files", ALICE) is None
    assert sealer.open(sealed, "crm", Principal("acme", "bob")) is None
    assert sealer.open(sealed, "crm", Principal("other", "alice")) is None


def test_tampered_and_garbage() -> None:
    sealer = SessionSealer(None)
    sealed = sealer.seal(Session("crm", "acme", "alice", "u", 0))
    flipped = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    for value in (flipped, "w1.", "w1.!!!!", "x" * 5000, "", "w1." + "A" * 2000, sealed + "AAAA"):
        assert sealer.open(value, "crm", ALICE) is None
