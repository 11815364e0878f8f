"""``[mcp]`` is validated at load, naming the key."""

from __future__ import annotations

from typing import Any

import pytest

from llm_warden.proxy.config import load_config
from llm_warden.proxy.errors import ConfigError


def _load(mcp: dict[str, Any]) -> Any:
    return load_config({"mcp": mcp, "plugins": {"enabled": []}}, {})


@pytest.mark.parametrize(
    ("mcp", "key"),
    [
        ({"servers": [{"name": "crm"}]}, "mcp.servers[0]"),
        ({"servers": [{"name": "crm", "url": "http://a", "command": "x"}]}, "mcp.servers[0]"),
        ({"servers": [{"name": "CRM", "url": "http://a"}]}, "mcp.servers[0].name"),
        ({"servers": [{"name": "crm", "url": "ftp://a"}]}, "mcp.servers[0].url"),
        ({"servers": [{"name": "crm", "url": "http://u:p@a"}]}, "mcp.servers[0].url"),
        ({"servers": [{"name": "crm", "url": "http://a", "headers_env": {"Mcp-Session-Id": "X"}}]}, "mcp.servers[0].headers_env.Mcp-Session-Id"),
        ({"servers": [{"name": "crm", "url": "http://a", "headers_env": {"Authorization": "not a var"}}]}, "mcp.servers[0].headers_env.Authorization"),
        ({"servers": [{"name": "crm", "command": "x", "headers_env": {"Authorization": "T"}}]}, "mcp.servers[0].headers_env"),
        ({"servers": [{"name": "crm", "url": "http://a", "pins": {"t": "md5:1"}}]}, "mcp.servers[0].pins.t"),
        ({"servers": [{"name": "crm", "url": "http://a", "timeout_s": 0}]}, "mcp.servers[0].timeout_s"),
        ({"servers": [{"name": "crm", "url": "http://a"}, {"name": "crm", "command": "x"}]}, "mcp.servers[1].name"),
        ({"max_message_bytes": 10}, "mcp.max_message_bytes"),
        ({"unpinned": "trust"}, "mcp.unpinned"),
        ({"bogus": 1}, "mcp.bogus"),
    ],
)
def test_invalid_config_names_the_key(mcp: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(mcp)
    assert e.value.key == key, str(e.value)


def test_session_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _load({"session_key_env": "WARDEN_TEST_MCP_KEY"}).mcp
    monkeypatch.setenv("WARDEN_TEST_MCP_KEY", "ab" * 32)
    assert cfg.session_key() == bytes.fromhex("ab" * 32)
    monkeypatch.setenv("WARDEN_TEST_MCP_KEY", "short")
    with pytest.raises(ConfigError) as e:
        cfg.session_key()
    assert e.value.key == "mcp.session_key_env"


def test_upstream_headers_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARDEN_TEST_MCP_TOKEN", "Bearer s3cret")
    s = _load({"servers": [{"name": "crm", "url": "https://crm/mcp", "headers_env": {"Authorization": "WARDEN_TEST_MCP_TOKEN", "X-Other": "WARDEN_TEST_UNSET"}}]}).mcp.servers[0]
    assert s.upstream_headers() == {"Authorization": "Bearer s3cret"}


def test_upstream_credentials_are_redacted_by_value(monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_warden.proxy.secrets import secret_values

    monkeypatch.setenv("WARDEN_TEST_MCP_TOKEN", "Bearer upstream-token-0123456789")
    monkeypatch.setenv("WARDEN_TEST_MCP_FILES", "files-secret-0123456789")
    cfg = _load(
        {
            "servers": [
                {"name": "crm", "url": "https://crm/mcp", "headers_env": {"Authorization": "WARDEN_TEST_MCP_TOKEN"}},
                {"name": "files", "command": "files-mcp", "env": {"FILES_TOKEN": "WARDEN_TEST_MCP_FILES"}},
            ]
        }
    )
    values = secret_values(cfg)
    assert {"Bearer upstream-token-0123456789", "upstream-token-0123456789", "files-secret-0123456789"} <= set(values)
    assert not any(v.startswith("/") for v in values)  # PATH is not a secret
