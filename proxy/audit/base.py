"""The interface the server uses to write audit records.

Every backend (SQLite embedded, PostgreSQL for scale-out) implements
:class:`AuditSink`.  The server calls ``record_exchange`` once per exchange
when it ends; in ``sync`` durability that call returns only after the record
is committed and raises :class:`~proxy.errors.AuditUnavailable` when it cannot
be, so the response is never released without its record.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from llm_warden.proxy.errors import AuditUnavailable
from llm_warden.proxy.exchange import Exchange

if TYPE_CHECKING:
    from llm_warden.proxy.audit.reader import ChainProof


class AuditSink(Protocol):
    async def start(self) -> None:
        """Open the store, repair a torn tail, start the writer task."""

    async def stop(self) -> None:
        """Flush every queued record, write a final checkpoint, close."""

    async def record_exchange(self, ex: Exchange) -> None:
        """Record one finished exchange (sync: after commit; batch: queued with backpressure)."""

    async def record_event(self, kind: str, actor: dict[str, Any], data: dict[str, Any]) -> None:
        """Record an admin action or feedback (always committed before returning)."""

    async def find(self, request_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The exchange record of ``request_id`` (of ``tenant``, when given), or ``None``."""

    @property
    def healthy(self) -> bool:
        """False while the store cannot be written."""


class RecordReader(Protocol):
    """What a store's reader answers (SQLite's ``AuditReader``, PostgreSQL's ``PgAuditReader``)."""

    async def find(self, request_id: str, tenant: str | None = None) -> dict[str, Any] | None: ...

    async def search(
        self,
        tenant: str | None,
        user: str | None,
        tool: str | None,
        since: int | None,
        until: int | None,
        limit: int,
        kind: str | None,
        *,
        request_id: str | None = None,
        status: int | None = None,
        before: str | None = None,
    ) -> list[dict[str, Any]]: ...

    def iter_records(self) -> AsyncIterator[dict[str, Any]]: ...

    async def chain_proof(self, seq: int, origin: str | None = None) -> ChainProof | None: ...


class ReaderQueries:
    """The queries every store answers from its open reader (for feedback, the CLI and admin routes).

    A store sets ``_reader`` while it is open; a query on a closed store is
    ``AuditUnavailable``.
    """

    _reader: RecordReader | None

    async def find(self, request_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The newest exchange record of ``request_id`` (of ``tenant``, when given), or ``None``."""
        return await self._open_reader().find(request_id, tenant)

    async def search(
        self,
        tenant: str | None = None,
        user: str | None = None,
        tool: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 100,
        kind: str | None = None,
        *,
        request_id: str | None = None,
        status: int | None = None,
        before: str | None = None,
    ) -> list[dict[str, Any]]:
        """Records matching the filters, newest first; ``before`` is the ``_cursor`` of a previous page's last record."""
        return await self._open_reader().search(tenant, user, tool, since, until, limit, kind, request_id=request_id, status=status, before=before)

    async def chain_proof(self, seq: int, origin: str | None = None) -> ChainProof | None:
        """The stored pieces that place record ``seq`` (of chain ``origin`` on PostgreSQL) in its hash chain."""
        return await self._open_reader().chain_proof(seq, origin)

    async def iter_records(self) -> AsyncIterator[dict[str, Any]]:
        """Every record in chain order (chain by chain on PostgreSQL), for export."""
        async for r in self._open_reader().iter_records():
            yield r

    def _open_reader(self) -> RecordReader:
        if self._reader is None:
            raise AuditUnavailable("the audit store is not open", rule="audit.durability")
        return self._reader
