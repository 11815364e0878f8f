"""``[database]`` and ``[audit] backend``: validated at load; the postgres store refuses to start without its URL or key."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_warden.proxy.audit.factory import build_audit
from llm_warden.proxy.audit.postgres import PostgresAuditLog
from llm_warden.proxy.audit.sqlite import SQLiteAuditLog
from llm_warden.proxy.config import AuditConfig, DatabaseConfig, load_config
from llm_warden.proxy.errors import ConfigError

BASE: dict[str, object] = {"auth": {"mode": "none"}, "plugins": {"enabled": []}}


def _load(data: dict[str, object]) -> object:
    return load_config({**BASE, **data}, {})


def test_defaults_and_the_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(BASE, {})
    assert (cfg.database.dsn_env, cfg.database.pool_min, cfg.database.pool_max) == ("WARDEN_DATABASE_URL", 1, 10)
    assert cfg.audit.backend == "sqlite"
    monkeypatch.delenv("WARDEN_DATABASE_URL", raising=False)
    assert cfg.database.dsn is None
    monkeypatch.setenv("WARDEN_DATABASE_URL", "postgresql://u@h/db")
    assert cfg.database.dsn == "postgresql://u@h/db"


@pytest.mark.parametrize(
    ("section", "key", "message"),
    [
        ({"database": {"dsn_env": ""}}, "database.dsn_env", "environment variable"),
        ({"database": {"dsn_env": "postgresql://u:p@h/db"}}, "database.dsn_env", "environment variable"),
        ({"database": {"dsn_env": "1ABC"}}, "database.dsn_env", "environment variable"),
        ({"database": {"pool_max": 0}}, "database.pool_max", "between"),
        ({"database": {"pool_min": 5, "pool_max": 2}}, "database.pool_min", "exceed"),
        ({"database": {"pool_min": -1}}, "database.pool_min", "between"),
        ({"database": {"url": "postgresql://x"}}, "database", "url"),
        ({"audit": {"backend": "mysql"}}, "audit.backend", "mysql"),
    ],
)
def test_bad_values_are_refused(section: dict[str, object], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(section)
    assert key in str(err.value) and message in str(err.value)


def test_factory_picks_the_backend(tmp_path: Path) -> None:
    base = BASE
    cfg = load_config({**base, "audit": {"path": "a.db"}}, {})
    cfg.base_dir = tmp_path
    assert isinstance(build_audit(cfg), SQLiteAuditLog)
    cfg = load_config({**base, "audit": {"backend": "postgres", "signing_key_file": "fleet.key", "checkpoint_file": "cp.txt"}}, {})
    cfg.base_dir = tmp_path
    store = build_audit(cfg)
    assert isinstance(store, PostgresAuditLog)
    assert store.cfg.signing_key_file == str(tmp_path / "fleet.key") and store.cfg.checkpoint_file == str(tmp_path / "cp.txt")
    assert build_audit(load_config({**base, "audit": {"enabled": False, "backend": "postgres"}}, {})) is None


async def test_postgres_store_needs_its_url_and_the_fleet_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WARDEN_TEST_AUDIT_KEY", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    monkeypatch.delenv("WARDEN_TEST_NO_URL", raising=False)
    with pytest.raises(ConfigError, match="WARDEN_TEST_NO_URL is not set"):
        await PostgresAuditLog(AuditConfig(backend="postgres", signing_key_env="WARDEN_TEST_AUDIT_KEY"), DatabaseConfig(dsn_env="WARDEN_TEST_NO_URL")).start()
    with pytest.raises(ConfigError, match="needs the fleet's signing key"):
        await PostgresAuditLog(AuditConfig(backend="postgres"), DatabaseConfig(), dsn="postgresql://u@127.0.0.1:1/x").start()
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="audit.signing_key_file"):
        await PostgresAuditLog(AuditConfig(backend="postgres", signing_key_file=str(bad)), DatabaseConfig(), dsn="postgresql://u@127.0.0.1:1/x").start()
    with pytest.raises(ConfigError, match="at least 2 connections"):
        await PostgresAuditLog(
            AuditConfig(backend="postgres", signing_key_env="WARDEN_TEST_AUDIT_KEY"), DatabaseConfig(pool_min=1, pool_max=1), dsn="postgresql://u@127.0.0.1:1/x"
        ).start()


async def test_unreachable_database_fails_start_with_503_kind_error() -> None:
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from llm_warden.proxy.audit.chain import seed_bytes
    from llm_warden.proxy.errors import AuditUnavailable

    key = base64.b64encode(seed_bytes(Ed25519PrivateKey.generate())).decode()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WARDEN_TEST_AUDIT_KEY2", key)
        log = PostgresAuditLog(AuditConfig(backend="postgres", signing_key_env="WARDEN_TEST_AUDIT_KEY2"), DatabaseConfig(), dsn="postgresql://u:pw@127.0.0.1:1/x")
        with pytest.raises(AuditUnavailable, match="cannot open the audit database") as err:
            await log.start()
    assert "pw" not in str(err.value)
    assert not log.healthy
