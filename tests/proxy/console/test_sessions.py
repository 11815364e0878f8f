"""Console sessions: expiry, the credential's own expiry, the bound on their number, the cookie value never stored."""

from __future__ import annotations

from llm_warden.proxy.console.sessions import Sessions
from llm_warden.proxy.exchange import Principal

ADMIN = Principal(tenant="*", subject="ops")


def test_a_session_lives_until_its_ttl_then_is_gone() -> None:
    now = [1000.0]
    s = Sessions(60, clock=lambda: now[0])
    sid, session = s.create(ADMIN, "Bearer x", None)
    assert s.get(sid) is session and session.expires == 1060
    now[0] = 1059.9
    assert s.get(sid) is session
    now[0] = 1060
    assert s.get(sid) is None and len(s) == 0


def test_a_session_never_outlives_the_admin_jwt() -> None:
    s = Sessions(3600, clock=lambda: 1000.0)
    _, session = s.create(ADMIN, "Bearer jwt", 1100.0)
    assert session.expires == 1100.0


def test_the_oldest_session_is_dropped_past_the_bound() -> None:
    s = Sessions(60, max_sessions=2)
    first, _ = s.create(ADMIN, "a", None)
    second, _ = s.create(ADMIN, "b", None)
    third, _ = s.create(ADMIN, "c", None)
    assert s.get(first) is None and s.get(second) is not None and s.get(third) is not None


def test_the_cookie_value_is_not_a_key_and_hostile_values_are_no_session() -> None:
    s = Sessions(60)
    sid, session = s.create(ADMIN, "Bearer x", None)
    assert sid.encode() not in s._by_hash and len(sid) >= 43
    for hostile in ("", None, "x" * 129, sid + "x", sid[:-1], "\udcff" * 10):
        assert s.get(hostile) is None
    assert session.csrf_ok(session.csrf) and not session.csrf_ok("") and not session.csrf_ok("\udcff")
    s.drop(sid)
    assert s.get(sid) is None
