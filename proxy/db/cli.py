"""``warden db migrate``: bring the PostgreSQL schema of every component up to this Warden's version."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from llm_warden.proxy.errors import ConfigError


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``db`` (``migrate``) to ``warden``."""
    db = sub.add_parser("db", help="the PostgreSQL schema ([database])")
    dsub = db.add_subparsers(dest="db_command", required=True)
    p = dsub.add_parser("migrate", help="apply the schema migrations this Warden knows (run it as the schema's owner)")
    p.add_argument("--component", action="append", help="migrate only this component (repeatable; default: all)")
    p.add_argument("--dsn-env", help="environment variable with the postgresql:// URL (default: [database] dsn_env, else WARDEN_DATABASE_URL)")
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    import os

    from llm_warden.proxy.db.migrate import registered_components

    components = registered_components()
    env = args.dsn_env
    if not env:
        env = "WARDEN_DATABASE_URL"
        if getattr(args, "config", None):
            from llm_warden.proxy.config import load_config

            env = load_config(args.config).database.dsn_env
    dsn = os.environ.get(env)
    if not dsn:
        raise ConfigError("database.dsn_env", f"environment variable {env} is not set")
    names = args.component or sorted(components)
    unknown = [n for n in names if n not in components]
    if unknown:
        print(f"warden: unknown component {unknown[0]!r} (known: {', '.join(sorted(components))})", file=sys.stderr)
        return 2
    return asyncio.run(_migrate(dsn, {n: components[n] for n in names}))


async def _migrate(dsn: str, components: dict[str, Path]) -> int:
    import asyncpg

    from llm_warden.proxy.audit.pg_verify import redact_dsn
    from llm_warden.proxy.db.migrate import current_version, migrate

    for name, folder in components.items():
        try:
            conn = await asyncpg.connect(dsn)
            try:
                before = await current_version(conn, name)
            finally:
                await conn.close()
            after = await migrate(dsn, name, folder)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
            print(f"warden: cannot migrate {name} on {redact_dsn(dsn)}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"{name}: schema version {before} -> {after}" if after != before else f"{name}: schema version {after} (up to date)")
    return 0
