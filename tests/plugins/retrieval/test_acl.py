"""ACL semantics and (de)serialisation of the shared retrieval types."""

from __future__ import annotations

import pytest

from llm_warden.plugins.retrieval.acl import Acl, Reader, acl_tokens, reader_allow_tokens, reader_deny_tokens
from llm_warden.proxy.exchange import Principal

G = frozenset


def test_deny_user_wins_over_every_grant() -> None:
    acl = Acl(public=True, allow_users=G({"ann"}), allow_groups=G({"eng"}), deny_users=G({"ann"}))
    assert not acl.allows("ann", G({"eng"}))
    assert acl.allows("bob", G())


def test_deny_group_wins_over_every_grant() -> None:
    acl = Acl(public=True, allow_users=G({"ann"}), deny_groups=G({"contractors"}))
    assert not acl.allows("ann", G({"contractors", "eng"}))
    assert acl.allows("ann", G({"eng"}))


def test_grants_public_user_group() -> None:
    assert Acl(public=True).allows("anyone", G())
    assert Acl(allow_users=G({"ann"})).allows("ann", G())
    assert not Acl(allow_users=G({"ann"})).allows("bob", G())
    assert Acl(allow_groups=G({"eng", "ops"})).allows("bob", G({"ops"}))
    assert not Acl(allow_groups=G({"eng"})).allows("bob", G({"sales"}))


def test_empty_acl_is_readable_by_no_one() -> None:
    assert not Acl().allows("ann", G({"eng"}))


def test_json_round_trip_is_stable() -> None:
    acl = Acl(public=True, allow_users=G({"b", "a"}), allow_groups=G({"g"}), deny_users=G({"x"}), deny_groups=G({"y"}))
    d = acl.to_json()
    assert d["allow_users"] == ["a", "b"]
    assert Acl.from_json(d) == acl
    assert Acl.from_json({}) == Acl()
    assert acl.key() == Acl.from_json(d).key()


@pytest.mark.parametrize(
    "bad",
    [
        {"public": "yes"},
        {"allow_users": "ann"},
        {"allow_groups": [1]},
        {"deny_users": [""]},
        {"owner": "ann"},
        ["public"],
    ],
)
def test_from_json_rejects_malformed(bad: object) -> None:
    with pytest.raises(ValueError):
        Acl.from_json(bad)  # type: ignore[arg-type]


def test_reader_from_principal() -> None:
    p = Principal(tenant="acme", subject="ann", groups=G({"eng"}), scopes=G({"chat"}))
    assert Reader.from_principal(p) == Reader("acme", "ann", G({"eng"}))


def test_tokens_match_allows() -> None:
    """A reader holds a grant token and no deny token exactly when Acl.allows says yes."""
    acls = [
        Acl(),
        Acl(public=True),
        Acl(public=True, deny_users=G({"ann"})),
        Acl(allow_groups=G({"eng"}), deny_groups=G({"ops"})),
        Acl(allow_users=G({"bob"})),
    ]
    readers = [Reader("t", s, G(g)) for s in ("ann", "bob") for g in ((), ("eng",), ("eng", "ops"))]
    for acl in acls:
        tokens = set(acl_tokens(acl))
        for r in readers:
            granted = bool(tokens & set(reader_allow_tokens(r))) and not tokens & set(reader_deny_tokens(r))
            assert granted == acl.allows(r.subject, r.groups), (acl, r)


def test_user_and_group_tokens_cannot_collide() -> None:
    """A user named like a group (or like a token) never gains that group's grant."""
    acl = Acl(allow_groups=G({"admins"}))
    tokens = set(acl_tokens(acl))
    assert not tokens & set(reader_allow_tokens(Reader("t", "admins", G())))
    assert not tokens & set(reader_allow_tokens(Reader("t", "group:admins", G())))
    assert "public" not in tokens
