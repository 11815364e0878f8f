"""Versioned schema migrations in PostgreSQL, one version per component.

A component (``audit``, ``retrieval``, ...) keeps its migrations as SQL files
``NNNN_name.sql`` in a folder of its own, numbered from 1 without gaps.  The
table ``warden_schema(component text primary key, version int)`` holds the
version each component's schema is at.

- :func:`migrate` (``warden db migrate``) applies the files above the current
  version, each in its own transaction together with the version bump, under
  a transaction-scoped advisory lock, so replicas or jobs that migrate at the
  same time apply each file once.  Everything is created in the first schema
  of the connection's ``search_path`` (``?options=-csearch_path%3Dname`` in
  the URL picks one); a function created with ``SET search_path FROM
  CURRENT`` is pinned to that schema (and ``pg_temp`` last).
- :func:`check_schema` is what a starting replica calls: it refuses a
  database whose schema is at another version than the one it was built for
  (older: run ``warden db migrate``; newer: a newer Warden migrated it).

A core component registers its folder in :data:`COMPONENTS`, a plugin in its
class's ``db_migrations``; ``warden db migrate`` migrates every component of
:func:`registered_components`.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from llm_warden.proxy.errors import ConfigError

COMPONENTS: dict[str, Path] = {
    "audit": Path(__file__).resolve().parent.parent / "audit" / "migrations",
}
"""Every component's migrations folder, by component name."""



def registered_components() -> dict[str, Path]:
    """Every component's migrations folder: the core's (:data:`COMPONENTS`) and each installed plugin's (``Plugin.db_migrations``)."""
    from llm_warden.proxy.plugin import available_plugins

    out = dict(COMPONENTS)
    for cls in available_plugins().values():
        for name, folder in cls.db_migrations.items():
            if out.setdefault(name, folder) != folder:
                raise ValueError(f"plugin {cls.name!r} registers the database component {name!r}, which another component already uses")
    return out


_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_TABLE = "CREATE TABLE IF NOT EXISTS warden_schema (component text PRIMARY KEY, version integer NOT NULL)"


class SchemaMismatch(ConfigError):
    """The database's schema of a component is not at the version this Warden knows."""

    def __init__(self, component: str, message: str) -> None:
        super().__init__(f"database.{component}", message)
        self.component = component


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: its version, name and SQL."""

    version: int
    name: str
    sql: str


def migrations(migrations_dir: Path) -> list[Migration]:
    """The migration files of a folder in version order; raises ``ValueError`` on a gap, a duplicate or a stray name."""
    found: dict[int, Migration] = {}
    for path in sorted(Path(migrations_dir).iterdir()):
        if path.suffix != ".sql":
            continue
        m = _FILE.match(path.name)
        if m is None:
            raise ValueError(f"{path.name}: a migration is named NNNN_lowercase_name.sql")
        version = int(m.group(1))
        if version in found:
            raise ValueError(f"{path.name}: version {version} is also {found[version].name}")
        found[version] = Migration(version, path.name, path.read_text(encoding="utf-8"))
    versions = sorted(found)
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"{migrations_dir}: migration versions must run 1..N without gaps, found {versions}")
    return [found[v] for v in versions]


def latest_version(migrations_dir: Path) -> int:
    """The version the newest file of ``migrations_dir`` migrates to (what this Warden knows)."""
    return len(migrations(migrations_dir))


def _lock_key(schema: str) -> int:
    """A 64-bit advisory-lock key for migrations of ``schema`` (other schemas in the database migrate independently)."""
    return int(struct.unpack(">q", hashlib.sha256(b"warden_schema\x00" + schema.encode()).digest()[:8])[0])


async def current_version(conn: asyncpg.Connection, component: str) -> int:
    """The component's schema version in the connection's schema (0: none yet)."""
    exists = await conn.fetchval("SELECT to_regclass('warden_schema') IS NOT NULL")
    if not exists:
        return 0
    v = await conn.fetchval("SELECT version FROM warden_schema WHERE component = $1", component)
    return int(v) if v is not None else 0


async def migrate(dsn: str, component: str, migrations_dir: Path, *, target: int | None = None) -> int:
    """Apply the component's migrations above the database's version (up to ``target``, default all); returns the version reached.

    Raises :class:`SchemaMismatch` when the database is already at a version
    newer than the files know.
    """
    files = migrations(migrations_dir)
    goal = len(files) if target is None else target
    if not 0 <= goal <= len(files):
        raise ValueError(f"target version {goal} is not between 0 and {len(files)}")
    conn = await asyncpg.connect(dsn)
    try:
        schema = await conn.fetchval("SELECT current_schema()")
        if schema is None:
            raise SchemaMismatch(component, "no schema of the search_path exists: create it first (CREATE SCHEMA ...)")
        path = f"{_ident(schema)}, pg_temp"
        version = -1
        while True:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL search_path = {path}")
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(schema))
                await conn.execute(_TABLE)
                version = await current_version(conn, component)
                if version > len(files):
                    raise SchemaMismatch(component, f"the {component} schema is at version {version}, newer than this Warden's {len(files)}")
                if version >= goal:
                    return version
                step = files[version]
                await conn.execute(step.sql)
                await conn.execute(
                    "INSERT INTO warden_schema (component, version) VALUES ($1, $2) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                    component,
                    step.version,
                )
    finally:
        await conn.close()


async def check_schema(conn: asyncpg.Connection, component: str, known_version: int) -> None:
    """Refuse (:class:`SchemaMismatch`) a database whose ``component`` schema is not at ``known_version``."""
    version = await current_version(conn, component)
    if version == known_version:
        return
    if version == 0:
        raise SchemaMismatch(component, f"the database has no {component} schema: run `warden db migrate` first")
    if version < known_version:
        raise SchemaMismatch(component, f"the {component} schema is at version {version}, this Warden needs {known_version}: run `warden db migrate`")
    raise SchemaMismatch(
        component, f"the {component} schema is at version {version}, newer than the {known_version} this Warden knows (a newer Warden migrated it)"
    )


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
