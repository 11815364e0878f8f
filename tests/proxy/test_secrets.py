"""Every secret Warden holds is removed by value from the audit log and the logs.

One configuration holds each kind: the provider key, the HS256 secret, the
bootstrap admin token, the audit signing key and the OTLP headers (from
``*_env`` variables), Redis passwords inside plugin URLs (one
percent-encoded), a plugin's own ``*_env`` key and a plugin section's
``secret_values()``.  Each is pasted into a prompt, an answer, a header, an
error text, a tool result and an event, recorded through the real SQLite
audit store, and written through the JSON log formatter: none of them may
appear in the database files or the log line.
"""

from __future__ import annotations

import base64
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from llm_warden.proxy.audit.factory import build_audit
from llm_warden.proxy.audit.sqlite import SQLiteAuditLog
from llm_warden.proxy.config import Config, load_config
from llm_warden.proxy.logs import JSONFormatter, SecretScrubber, add_secrets
from llm_warden.proxy.plugin import available_plugins
from llm_warden.proxy.secrets import MIN_SECRET_CHARS, collect_secrets, secret_values, url_passwords
from tests.proxy.audit.helpers import make_exchange

PROVIDER_KEY = "sk-held-provider-key-0123456789abcdef"
HS_SECRET = "hs256 shared secret for the secrets test 0123"
ADMIN_TOKEN = "admin-bootstrap-token-held-0987654321"
AUDIT_SEED = base64.b64encode(bytes(range(32))).decode()
OTLP_HEADERS = "x-api-key=otlp-collector-key-1234567890"
LIMITS_REDIS_PASSWORD = "r3dis-pa55word-limits"
TOOLS_REDIS_PASSWORD_URL = "p%40ss%2Fw0rd-tools"
TOOLS_REDIS_PASSWORD = "p@ss/w0rd-tools"
EMBED_KEY = "embedding-api-key-held-0123456789"
CUSTOM = 'custom "quoted\\" plugin secret-42'
PG_PASSWORD = "pg-pa55word-xyz"
DATABASE_URL = "postgresql://warden:db-pa55word-core@127.0.0.1:5432/test"
DATABASE_PASSWORD = "db-pa55word-core"
SHORT = "abc123"

HELD = {
    "hs256_secret": HS_SECRET,
    "admin_token": ADMIN_TOKEN,
    "audit_signing_key": AUDIT_SEED,
    "otlp_headers": OTLP_HEADERS,
    "limits_redis_password": LIMITS_REDIS_PASSWORD,
    "tools_redis_password_encoded": TOOLS_REDIS_PASSWORD_URL,
    "tools_redis_password": TOOLS_REDIS_PASSWORD,
    "embedding_key": EMBED_KEY,
    "custom_secret_values": CUSTOM,
    "nested_dsn_password": PG_PASSWORD,
    "database_url": DATABASE_URL,
    "database_password": DATABASE_PASSWORD,
}
"""Every secret but the provider key, which keeps its own rule (``upstream_key``)."""


@dataclass
class _Store:
    """A nested setting holding a URL with a password (convention 2 reaches into nested dataclasses and lists)."""

    dsn: str = ""


@dataclass
class _SecretsTestConfig:
    """A plugin section using all three conventions."""

    short_env: str = ""
    stores: list[_Store] = field(default_factory=list)
    custom: str = ""

    def secret_values(self) -> list[Any]:
        return [self.custom, 42, ""]  # only non-empty strings count


class _SecretsTestPlugin:
    """Only what load_config reads of a plugin class."""

    config_section = "secretstest"
    config_type = _SecretsTestConfig


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "T_SECRETS_PROVIDER": PROVIDER_KEY,
        "T_SECRETS_HS": HS_SECRET,
        "T_SECRETS_ADMIN": ADMIN_TOKEN,
        "T_SECRETS_AUDIT_KEY": AUDIT_SEED,
        "T_SECRETS_OTLP": OTLP_HEADERS,
        "T_SECRETS_EMBED": EMBED_KEY,
        "T_SECRETS_SHORT": SHORT,
        "T_SECRETS_DATABASE_URL": DATABASE_URL,
    }.items():
        monkeypatch.setenv(name, value)


def _config(tmp_path: Path, store_content: str = "full") -> Config:
    classes = {**available_plugins(), "secretstest": _SecretsTestPlugin}
    return load_config(
        {
            "upstream": {"api_key_env": "T_SECRETS_PROVIDER"},
            "auth": {"algorithms": ["HS256"], "issuer": "i", "audience": "a", "hs256_secret_env": "T_SECRETS_HS"},
            "admin": {"token_env": "T_SECRETS_ADMIN"},
            "audit": {"path": str(tmp_path / "audit.db"), "signing_key_env": "T_SECRETS_AUDIT_KEY", "store_content": store_content},
            "tracing": {"headers_env": "T_SECRETS_OTLP"},
            "database": {"dsn_env": "T_SECRETS_DATABASE_URL"},
            "limits": {"redis_url": f"redis://:{LIMITS_REDIS_PASSWORD}@127.0.0.1:6379/0"},
            "policy": {"redis_url": f"redis://warden:{TOOLS_REDIS_PASSWORD_URL}@127.0.0.1:6379/1"},
            "retrieval": {"embedding_api_key_env": "T_SECRETS_EMBED"},
            "secretstest": {"short_env": "T_SECRETS_SHORT", "stores": [{"dsn": "sqlite:///x.db"}, {"dsn": f"postgresql://app:{PG_PASSWORD}@db/x"}], "custom": CUSTOM},
            "plugins": {"enabled": ["headers"]},
        },
        classes,
    )


def test_secret_values_collects_every_kind_and_skips_short_ones(env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(tmp_path)
    with caplog.at_level(logging.WARNING, logger="warden.secrets"):
        values = secret_values(cfg)
    assert set(values) == {PROVIDER_KEY, *HELD.values(), OTLP_HEADERS.partition("=")[2]}, "the OTLP header value on its own too"
    assert len(values) == len(set(values)), "each value once"
    assert SHORT not in values
    warnings = [r.getMessage() for r in caplog.records if r.name == "warden.secrets"]
    assert len(warnings) == 1 and "secretstest.short_env ($T_SECRETS_SHORT)" in warnings[0]
    assert SHORT not in warnings[0], "a warning names the key, never the value"
    keys = {s.key for s in collect_secrets(cfg)}
    assert "auth.hs256_secret_env ($T_SECRETS_HS)" in keys
    assert "database.dsn_env ($T_SECRETS_DATABASE_URL) (URL password)" in keys
    assert "policy.redis_url (URL password)" in keys
    assert "secretstest.stores[1].dsn (URL password)" in keys
    assert "secretstest.secret_values()" in keys
    assert "tracing.secret_values()" in keys


def test_no_secret_configured_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "WARDEN_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert secret_values(load_config({"auth": {"mode": "none"}, "plugins": {"enabled": []}}, {})) == []


@pytest.mark.parametrize(
    "url,want",
    [
        ("redis://:pw-12345678@h:6379/0", ["pw-12345678"]),
        ("rediss://user:p%40ss@h", ["p%40ss", "p@ss"]),
        ("postgresql://app:secret@db:5432/x?sslmode=require", ["secret"]),
        ("redis://user@h/0", []),
        ("redis://h:6379/0", []),
        ("https://api.example.com/v1", []),
        ("not a url @ all ://", []),
        ("http://[::1:bad@x", []),
    ],
)
def test_url_passwords(url: str, want: list[str]) -> None:
    assert url_passwords(url) == want


@pytest.mark.parametrize("store_content", ["full", "redacted", "hashes"])
async def test_the_audit_log_never_stores_a_held_secret(env: None, tmp_path: Path, store_content: str) -> None:
    cfg = _config(tmp_path, store_content)
    sink = build_audit(cfg)
    assert isinstance(sink, SQLiteAuditLog)
    await sink.start()
    try:
        everything = " | ".join([PROVIDER_KEY, *HELD.values()])
        ex = make_exchange(user_text=f"please remember {everything}", request_id="req_held")
        ex.request_headers["x-debug"] = f"admin {ADMIN_TOKEN} hs {HS_SECRET}"
        ex.error_detail = f"redis said: NOAUTH for {LIMITS_REDIS_PASSWORD}; key {EMBED_KEY}"
        ex.response_text = f"the secret is {HS_SECRET} and {CUSTOM}"
        ex.tool_results = [{"tool_call_id": "call_prev", "content": f"{PG_PASSWORD} {TOOLS_REDIS_PASSWORD}"}]
        await sink.record_exchange(ex)
        await sink.record_event("ingest", {"tenant": "acme", "subject": "ops", "via": f"token {ADMIN_TOKEN}"}, {"note": f"{AUDIT_SEED} {OTLP_HEADERS}"})
        rec = await sink.find("req_held")
        assert rec is not None
        rules = rec["redaction"]["rules"]
        if store_content != "hashes":
            assert rules.get("secret_value", 0) >= len(HELD) + 6, rules
            assert rules.get("upstream_key", 0) >= 1
        else:
            assert rules.get("secret_value", 0) >= 2, rules  # the header and the error text are metadata, kept
    finally:
        await sink.stop()
    disk = _database_bytes(tmp_path / "audit.db")
    assert b"req_held" in disk
    for kind, value in {"provider_key": PROVIDER_KEY, **HELD}.items():
        for form in {value.encode(), orjson.dumps(value)[1:-1]}:
            assert form not in disk, f"{kind} reached the audit database"


async def test_an_event_actor_holding_a_secret_is_redacted_in_the_index_columns_too(env: None, tmp_path: Path) -> None:
    sink = build_audit(_config(tmp_path))
    assert isinstance(sink, SQLiteAuditLog)
    await sink.start()
    try:
        await sink.record_event("ingest", {"tenant": "acme", "subject": f"ops {ADMIN_TOKEN}"}, {"note": "n"})
    finally:
        await sink.stop()
    assert ADMIN_TOKEN.encode() not in _database_bytes(tmp_path / "audit.db")


def _database_bytes(path: Path) -> bytes:
    return b"".join(Path(f"{path}{suffix}").read_bytes() for suffix in ("", "-wal", "-shm") if Path(f"{path}{suffix}").exists())


def _line(formatter: JSONFormatter, values: list[str]) -> str:
    joined = " ".join(values)
    record = logging.LogRecord("warden.test", logging.ERROR, __file__, 1, "upstream failed with %s", (joined,), None)
    record.detail = {"header": joined, "list": values}
    try:
        raise RuntimeError(f"boom: {joined}")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    return formatter.format(record)


def test_the_log_formatter_removes_every_held_secret(env: None, tmp_path: Path) -> None:
    values = secret_values(_config(tmp_path))
    scrub = SecretScrubber()
    for v in values:
        scrub.add(v)
    line = _line(JSONFormatter(scrub=scrub), values)
    parsed = orjson.loads(line)
    assert parsed["msg"].startswith("upstream failed with [redacted]")
    assert "boom: [redacted]" in parsed["exc"]
    for v in values:
        assert v not in line and orjson.dumps(v).decode()[1:-1] not in line, v
        assert v not in orjson.dumps(parsed).decode()


def test_add_secrets_feeds_the_process_wide_formatter(env: None, tmp_path: Path) -> None:
    values = secret_values(_config(tmp_path))
    add_secrets(values)
    line = _line(JSONFormatter(), values)
    for v in values:
        assert v not in line, v


def test_short_values_are_never_registered_for_the_logs() -> None:
    scrub = SecretScrubber()
    scrub.add("x" * (MIN_SECRET_CHARS - 1))
    scrub.add("")
    scrub.add(None)
    assert scrub.values == []
    scrub.add("abcdefgh")
    scrub.add("abcdefgh-longer")
    assert scrub("abcdefgh-longer abcdefgh") == "[redacted] [redacted]"


def test_a_secret_with_an_undecodable_byte_is_registered_without_crashing() -> None:
    """os.environ hands an undecodable byte over as a lone surrogate, which has no JSON spelling."""
    scrub = SecretScrubber()
    scrub.add("bad-byte-\udcff-secret")
    assert scrub("x bad-byte-\udcff-secret y") == "x [redacted] y"
    from llm_warden.proxy.audit.redact import Redactor

    counts: dict[str, int] = {}
    assert Redactor(secrets=["bad-byte-\udcff-secret"], apply_pii=False).text("x bad-byte-\udcff-secret y", counts) == "x [REDACTED:secret_value] y"


def test_a_warden_registers_every_held_secret_for_its_logs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from llm_warden.proxy.app import Warden

    hs = "warden-wiring-hs256-secret-0123456789-abcdef"
    monkeypatch.setenv("T_SECRETS_WIRING_HS", hs)
    cfg = load_config(
        {
            "auth": {"algorithms": ["HS256"], "issuer": "i", "audience": "a", "hs256_secret_env": "T_SECRETS_WIRING_HS"},
            "audit": {"enabled": False},
            "limits": {"redis_url": "redis://:wiring-redis-password@127.0.0.1:6379/0"},
            "plugins": {"enabled": ["headers"]},
        }
    )
    Warden(cfg)
    line = JSONFormatter().format(logging.LogRecord("t", logging.INFO, __file__, 1, f"{hs} wiring-redis-password", None, None))
    assert hs not in line and "wiring-redis-password" not in line, line
