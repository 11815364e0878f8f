"""The audit store the config asks for: ``[audit] backend`` picks SQLite or PostgreSQL."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm_warden.proxy.audit.base import AuditSink
    from llm_warden.proxy.config import Config


def build_audit(config: Config) -> AuditSink | None:
    """The configured audit store (not started), or ``None`` when ``[audit] enabled = false``.

    ``sqlite``: :class:`~proxy.audit.sqlite.SQLiteAuditLog` at ``[audit] path``;
    ``postgres``: :class:`~proxy.audit.postgres.PostgresAuditLog` on the
    database whose URL is in ``[database] dsn_env`` (read at start).  Paths in
    ``[audit]`` are resolved against the config file's folder.
    """
    a = config.audit
    if not a.enabled:
        return None
    if a.backend == "postgres":
        from llm_warden.proxy.audit.postgres import PostgresAuditLog

        resolved = dataclasses.replace(
            a,
            signing_key_file=str(config.resolve_path(a.signing_key_file)) if a.signing_key_file else "",
            checkpoint_file=str(config.resolve_path(a.checkpoint_file)) if a.checkpoint_file else "",
        )
        from llm_warden.proxy.secrets import secret_values

        return PostgresAuditLog(
            resolved, config.database, upstream_key=config.upstream.api_key, held_secrets=secret_values(config), provider=config.upstream.provider_name
        )
    from llm_warden.proxy.audit.sqlite import build_audit as build_sqlite

    return build_sqlite(config)
