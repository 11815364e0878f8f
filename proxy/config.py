"""Warden's configuration: one TOML file, validated into typed sections.

Core sections are declared here; each plugin declares its own section through
``Plugin.config_section`` / ``config_type`` and is validated by the same
loader.  Secrets never live in the file: it names environment variables.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from proxy.confload import load_dataclass
from proxy.errors import ConfigError


def parse_hostport(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class ServerConfig:
    """``[server]``: listeners and request bounds."""

    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:9090"
    max_body_bytes: int = 4 * 1024 * 1024
    drain_s: float = 20.0
    use_uvloop: bool = True

    def validate(self, key: str) -> None:
        parse_hostport(self.listen, f"{key}.listen")
        parse_hostport(self.admin_listen, f"{key}.admin_listen")
        if self.listen == self.admin_listen:
            raise ConfigError(f"{key}.admin_listen", "must differ from server.listen")
        if self.max_body_bytes <= 0:
            raise ConfigError(f"{key}.max_body_bytes", "must be positive")
        if self.drain_s < 0:
            raise ConfigError(f"{key}.drain_s", "must be >= 0")


@dataclass
class UpstreamConfig:
    """``[upstream]``: the OpenAI-compatible provider."""

    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    max_retries: int = 2
    retry_backoff_s: float = 0.2
    max_connections: int = 100
    max_response_bytes: int = 64 * 1024 * 1024
    stream_usage: bool = True
    provider_name: str = "openai"

    def validate(self, key: str) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.base_url", "must start with http:// or https://")
        for name in ("timeout_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}", "must be positive")
        if self.max_retries < 0:
            raise ConfigError(f"{key}.max_retries", "must be >= 0")
        if self.max_connections <= 0:
            raise ConfigError(f"{key}.max_connections", "must be positive")

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


@dataclass
class AuthConfig:
    """``[auth]``: how callers are identified."""

    mode: Literal["jwt", "none"] = "jwt"
    algorithms: list[str] = field(default_factory=lambda: ["RS256"])
    issuer: str = ""
    audience: str = ""
    public_key_file: str = ""
    jwks_url: str = ""
    hs256_secret_env: str = ""
    tenant_claim: str = "tenant"
    subject_claim: str = "sub"
    groups_claim: str = "groups"
    scopes_claim: str = "scope"
    leeway_s: float = 30.0
    max_token_bytes: int = 8192
    cache_size: int = 10000
    jwks_cache_s: float = 300.0
    jwks_min_refresh_s: float = 30.0
    dev_tenant: str = "dev"
    dev_subject: str = "dev-user"
    dev_groups: list[str] = field(default_factory=list)

    def validate(self, key: str) -> None:
        if self.mode == "none":
            return
        algs = self.algorithms
        if not algs:
            raise ConfigError(f"{key}.algorithms", "must name at least one algorithm")
        allowed = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "HS256", "HS384", "HS512"}
        for a in algs:
            if a not in allowed:
                raise ConfigError(f"{key}.algorithms", f"{a!r} is not accepted (allowed: {', '.join(sorted(allowed))})")
        hs = [a for a in algs if a.startswith("HS")]
        if hs and len(hs) != len(algs):
            raise ConfigError(f"{key}.algorithms", "HS* algorithms cannot be mixed with asymmetric ones")
        if not self.issuer:
            raise ConfigError(f"{key}.issuer", "is required in jwt mode")
        if not self.audience:
            raise ConfigError(f"{key}.audience", "is required in jwt mode")
        sources = [bool(self.public_key_file), bool(self.jwks_url), bool(self.hs256_secret_env)]
        if sum(sources) != 1:
            raise ConfigError(key, "set exactly one of public_key_file, jwks_url, hs256_secret_env")
        if self.hs256_secret_env and not hs:
            raise ConfigError(f"{key}.hs256_secret_env", "requires algorithms = [\"HS256\"]")
        if hs and not self.hs256_secret_env:
            raise ConfigError(f"{key}.algorithms", "HS* algorithms need hs256_secret_env")
        if self.max_token_bytes < 256:
            raise ConfigError(f"{key}.max_token_bytes", "must be at least 256")
        if self.cache_size < 0:
            raise ConfigError(f"{key}.cache_size", "must be >= 0")


@dataclass
class AdminConfig:
    """``[admin]``: who may call the admin API."""

    token_env: str = "WARDEN_ADMIN_TOKEN"
    scope: str = "warden:admin"


@dataclass
class AuditConfig:
    """``[audit]``: the tamper-evident exchange log."""

    enabled: bool = True
    path: str = "warden-audit.db"
    durability: Literal["sync", "batch"] = "sync"
    batch_max_records: int = 256
    batch_max_ms: float = 5.0
    queue_max: int = 10000
    store_content: Literal["full", "redacted", "hashes"] = "redacted"
    signing_key_file: str = ""
    signing_key_env: str = ""
    checkpoint_every: int = 1000
    checkpoint_file: str = ""
    retention_days: int = 0
    tool_result_max_bytes: int = 16384
    redact_patterns: dict[str, str] = field(default_factory=dict)
    redact_pii: list[str] = field(default_factory=lambda: ["email", "phone", "card"])

    def validate(self, key: str) -> None:
        for name in ("batch_max_records", "queue_max", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}", "must be positive")
        if self.retention_days < 0:
            raise ConfigError(f"{key}.retention_days", "must be >= 0")


@dataclass
class MetricsConfig:
    """``[metrics]``: Prometheus exposition on the admin listener."""

    tenant_label: bool = False
    models: list[str] = field(default_factory=list)


@dataclass
class TracingConfig:
    """``[tracing]``: OpenTelemetry (GenAI semantic conventions)."""

    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    service_name: str = "warden"
    capture_content: bool = False


@dataclass
class LoggingConfig:
    """``[logging]``: structured logs on stdout."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True


@dataclass
class PluginsConfig:
    """``[plugins]``: which plugins run, in this order."""

    enabled: list[str] = field(default_factory=lambda: ["headers"])


CORE_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "upstream": UpstreamConfig,
    "auth": AuthConfig,
    "admin": AdminConfig,
    "audit": AuditConfig,
    "metrics": MetricsConfig,
    "tracing": TracingConfig,
    "logging": LoggingConfig,
    "plugins": PluginsConfig,
}


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    plugin_sections: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    base_dir: Path = field(default_factory=Path.cwd)

    def resolve_path(self, value: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        p = Path(value)
        return p if p.is_absolute() else self.base_dir / p


def load_config(
    source: str | Path | dict[str, Any],
    plugin_classes: dict[str, type] | None = None,
) -> Config:
    """Load and validate a config file (or an already-parsed table).

    ``plugin_classes`` maps plugin names to classes (see
    :func:`proxy.plugin.available_plugins`); their sections are validated
    too.  A section that no core part or known plugin owns is an error.
    """
    if plugin_classes is None:
        from proxy.plugin import available_plugins

        plugin_classes = available_plugins()
    path: str | None = None
    base_dir = Path.cwd()
    if isinstance(source, dict):
        data = source
    else:
        path = str(source)
        base_dir = Path(path).resolve().parent
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("<file>", f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("<file>", f"{path} is not valid TOML: {e}") from None
    owners: dict[str, tuple[str, type]] = {}
    for pname, cls in plugin_classes.items():
        sec = getattr(cls, "config_section", None)
        ctype = getattr(cls, "config_type", None)
        if sec and ctype:
            owners[sec] = (pname, ctype)
        for extra, etype in getattr(cls, "extra_sections", {}).items():
            owners[extra] = (pname, etype)
    kwargs: dict[str, Any] = {}
    plugin_sections: dict[str, Any] = {}
    for name, value in data.items():
        if name in CORE_SECTIONS:
            kwargs[name] = load_dataclass(CORE_SECTIONS[name], value, name)
        elif name in owners:
            plugin_sections[name] = _load_plugin_section(owners[name][1], value, name)
        else:
            known = sorted([*CORE_SECTIONS, *owners])
            raise ConfigError(name, f"unknown section (known: {', '.join(known)})")
    cfg = Config(**kwargs, plugin_sections=plugin_sections, path=path, base_dir=base_dir)
    for pname in cfg.plugins.enabled:
        if pname not in plugin_classes:
            raise ConfigError("plugins.enabled", f"unknown plugin {pname!r} (available: {', '.join(sorted(plugin_classes))})")
    if len(set(cfg.plugins.enabled)) != len(cfg.plugins.enabled):
        raise ConfigError("plugins.enabled", "lists a plugin twice")
    for pname in cfg.plugins.enabled:
        cls = plugin_classes[pname]
        sec = getattr(cls, "config_section", None)
        ctype = getattr(cls, "config_type", None)
        if sec and ctype and sec not in cfg.plugin_sections:
            cfg.plugin_sections[sec] = _load_plugin_section(ctype, {}, sec)
        for extra, etype in getattr(cls, "extra_sections", {}).items():
            if extra not in cfg.plugin_sections:
                cfg.plugin_sections[extra] = _load_plugin_section(etype, [] if _is_list(etype) else {}, extra)
    return cfg


def _is_list(tp: Any) -> bool:
    from typing import get_origin

    return get_origin(tp) is list


def _load_plugin_section(tp: Any, value: Any, key: str) -> Any:
    from proxy.confload import convert

    return convert(tp, value, key)
