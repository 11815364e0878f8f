"""The interface the server uses to write audit records.

Every backend (SQLite embedded, PostgreSQL for scale-out) implements
:class:`AuditSink`.  The server calls ``record_exchange`` once per exchange
when it ends; in ``sync`` durability that call returns only after the record
is committed and raises :class:`~proxy.errors.AuditUnavailable` when it cannot
be, so the response is never released without its record.
"""

from __future__ import annotations

from typing import Any, Protocol

from proxy.exchange import Exchange


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
