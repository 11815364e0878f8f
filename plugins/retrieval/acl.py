"""Access-control types shared by the retrieval store, the search engines and the pipeline.

An :class:`Acl` says who in a tenant may read a document; a :class:`Reader` is the
principal as retrieval sees it. Both engines turn an ACL into indexed *tokens*
(:func:`acl_tokens`) and a reader into the tokens that would grant or deny it
(:func:`reader_allow_tokens`, :func:`reader_deny_tokens`), so "may this reader
read this chunk" is decided inside each search by term filters, never by
post-filtering. :meth:`Acl.allows` is the reference semantics those filters
implement: deny wins, then public / allowed user / allowed group, else no.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy

if TYPE_CHECKING:
    from llm_warden.proxy.exchange import Principal

PUBLIC_TOKEN = "public"
"""Indexed token of a document readable by everyone in its tenant (unless denied)."""


def _names(value: Any, field: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"acl.{field} must be a list of strings")
    out = set()
    for item in value:
        if not isinstance(item, str) or not item:
            raise ValueError(f"acl.{field} must contain non-empty strings")
        out.add(item)
    return frozenset(out)


@dataclass(frozen=True)
class Acl:
    """Who in the tenant may read a document.

    Deny wins: a reader whose subject is in ``deny_users`` or who is in any of
    ``deny_groups`` may not read, whatever else is granted. Otherwise the reader
    may read when the document is ``public`` (within its tenant), or the subject is
    in ``allow_users``, or the reader is in any of ``allow_groups``. An ACL that
    grants nothing makes the document readable by no one (fail closed).
    """

    public: bool = False
    allow_users: frozenset[str] = frozenset()
    allow_groups: frozenset[str] = frozenset()
    deny_users: frozenset[str] = frozenset()
    deny_groups: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict with sorted lists (stable, so equal ACLs serialise equally)."""
        return {
            "public": self.public,
            "allow_users": sorted(self.allow_users),
            "allow_groups": sorted(self.allow_groups),
            "deny_users": sorted(self.deny_users),
            "deny_groups": sorted(self.deny_groups),
        }

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> Acl:
        """Parse :meth:`to_json` output; missing keys default to empty, unknown keys are errors.

        Raises ``ValueError`` with the offending field on malformed input.
        """
        if not isinstance(d, Mapping):
            raise ValueError("acl must be an object")
        known = {"public", "allow_users", "allow_groups", "deny_users", "deny_groups"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"acl has unknown keys: {', '.join(sorted(map(str, unknown)))}")
        public = d.get("public", False)
        if not isinstance(public, bool):
            raise ValueError("acl.public must be a boolean")
        return Acl(
            public=public,
            allow_users=_names(d.get("allow_users"), "allow_users"),
            allow_groups=_names(d.get("allow_groups"), "allow_groups"),
            deny_users=_names(d.get("deny_users"), "deny_users"),
            deny_groups=_names(d.get("deny_groups"), "deny_groups"),
        )

    def allows(self, subject: str, groups: frozenset[str]) -> bool:
        """Whether ``subject`` (member of ``groups``) may read: deny wins, then any grant."""
        if subject in self.deny_users or not groups.isdisjoint(self.deny_groups):
            return False
        return self.public or subject in self.allow_users or not groups.isdisjoint(self.allow_groups)

    def key(self) -> str:
        """A canonical string for this ACL (equal ACLs have equal keys)."""
        return "\x1e".join(acl_tokens(self))


@dataclass(frozen=True)
class Reader:
    """The principal as retrieval sees it: tenant, subject and group memberships."""

    tenant: str
    subject: str
    groups: frozenset[str] = frozenset()

    @staticmethod
    def from_principal(p: Principal) -> Reader:
        """The reader for an authenticated :class:`~proxy.exchange.Principal`."""
        return Reader(tenant=p.tenant, subject=p.subject, groups=frozenset(p.groups))


@dataclass
class IndexedChunk:
    """One chunk as both search engines index it.

    ``chunk_id`` is globally unique and opaque to the engines; ``(tenant, doc_id)`` is
    the document key used to delete or re-permission every chunk of a document.
    ``vector`` is float32 and L2-normalised (dimension fixed per vector index), or
    ``None`` when there is no embedder.
    """

    chunk_id: str
    tenant: str
    doc_id: str
    text: str
    acl: Acl
    vector: numpy.ndarray | None = None


def acl_tokens(acl: Acl) -> list[str]:
    """The indexed ACL terms of a chunk: grants and denials, sorted.

    ``public``, ``user:U``, ``group:G`` grant; ``deny_user:U``, ``deny_group:G`` deny.
    """
    out = [PUBLIC_TOKEN] if acl.public else []
    out += [f"user:{u}" for u in sorted(acl.allow_users)]
    out += [f"group:{g}" for g in sorted(acl.allow_groups)]
    out += [f"deny_user:{u}" for u in sorted(acl.deny_users)]
    out += [f"deny_group:{g}" for g in sorted(acl.deny_groups)]
    return out


def reader_allow_tokens(reader: Reader) -> list[str]:
    """The ACL terms any one of which lets ``reader`` read a chunk (unless denied)."""
    return [PUBLIC_TOKEN, f"user:{reader.subject}", *(f"group:{g}" for g in sorted(reader.groups))]


def reader_deny_tokens(reader: Reader) -> list[str]:
    """The ACL terms any one of which forbids ``reader`` from reading a chunk."""
    return [f"deny_user:{reader.subject}", *(f"deny_group:{g}" for g in sorted(reader.groups))]
