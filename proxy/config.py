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

from llm_warden.proxy.confload import load_dataclass
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.mcp.config import McpConfig


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
    passthrough_routes: list[str] = field(default_factory=list)
    """Extra ``"METHOD /v1/path"`` routes relayed to the provider (authenticated, limited, audited, not interpreted).

    A path segment may be a ``{name}`` placeholder matching one segment of
    letters, digits, ``.``, ``_`` and ``-``.  Every other route is refused.
    """
    max_json_depth: int = 64
    """Deepest nesting of arrays and objects a request body may have (400 ``request.json_depth``)."""
    max_messages: int = 4096
    """Most entries in ``messages`` of one request (400 ``request.max_messages``)."""
    max_tools: int = 512
    """Most entries in ``tools`` (and legacy ``functions``) of one request (400 ``request.max_tools``)."""
    max_url_bytes: int = 8192
    """Longest request target (path and query) accepted; longer: 414 ``server.max_url_bytes``."""
    max_header_bytes: int = 16384
    """Longest header line (name and value) accepted; longer: 431 ``server.max_header_bytes``.

    A bearer token travels in one header line: keep this above
    ``[auth] max_token_bytes`` plus about 30 bytes.
    """
    max_headers: int = 100
    """Most header lines in one request; more: 431 ``server.max_headers``."""
    header_timeout_s: float = 10.0
    """A request's headers must be complete this long after the connection opened (its first request)
    or after its first byte (a later request on a kept-alive connection); otherwise 408
    ``server.header_timeout_s`` and the connection closes.  A connection that sent nothing is closed silently."""
    body_timeout_s: float = 60.0
    """A request's whole body must arrive this long after its headers; otherwise 408 ``server.body_timeout_s`` and close."""
    keepalive_timeout_s: float = 75.0
    """An idle kept-alive connection is closed after this long (keep it above the clients' own idle timeout)."""
    max_connections: int = 1024
    """Most open connections per listener (data and admin each); beyond it a new connection gets 503
    ``server.max_connections`` and is closed before its request is read.  Mind the process's open-files limit."""
    idle_trim_s: float = 30.0
    """After traffic, once nothing has been in flight this long, collect garbage and give freed heap back
    to the system (glibc ``malloc_trim``), so RSS returns near its pre-burst figure; 0 turns it off."""

    def validate(self, key: str) -> None:
        parse_hostport(self.listen, f"{key}.listen")
        parse_hostport(self.admin_listen, f"{key}.admin_listen")
        if self.listen == self.admin_listen:
            raise ConfigError(f"{key}.admin_listen", "must differ from server.listen")
        if self.max_body_bytes <= 0:
            raise ConfigError(f"{key}.max_body_bytes", "must be positive")
        if self.drain_s < 0:
            raise ConfigError(f"{key}.drain_s", "must be >= 0")
        if self.idle_trim_s < 0:
            raise ConfigError(f"{key}.idle_trim_s", "must be >= 0 (0: off)")
        if not 2 <= self.max_json_depth <= 500:
            raise ConfigError(f"{key}.max_json_depth", "must be between 2 and 500")
        for name in ("max_messages", "max_tools"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}", "must be positive")
        for name, low, high in (("max_url_bytes", 256, 1 << 20), ("max_header_bytes", 1024, 1 << 20), ("max_headers", 8, 1000), ("max_connections", 1, 1 << 20)):
            if not low <= getattr(self, name) <= high:
                raise ConfigError(f"{key}.{name}", f"must be between {low} and {high}")
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
            if not 0 < getattr(self, name) <= 86400:
                raise ConfigError(f"{key}.{name}", "must be positive (and at most 86400)")
        from llm_warden.proxy.routes import parse_route_spec

        for i, spec in enumerate(self.passthrough_routes):
            parse_route_spec(spec, f"{key}.passthrough_routes[{i}]")


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
    max_sse_event_bytes: int = 1024 * 1024
    """Largest single event of a streamed answer, in bytes (1 KiB .. 256 MiB).

    A larger event fails the stream (an error event, rule ``upstream.protocol``)
    instead of being buffered.  Providers that send a whole tool call in one
    event (Ollama) cap its arguments here, not at the 16 MiB streamed-arguments
    bound.
    """
    api: Literal["openai", "anthropic"] = "openai"
    """The provider's API: ``openai`` (chat completions at ``base_url``) or ``anthropic`` (the Messages API at
    ``base_url``, e.g. ``https://api.anthropic.com/v1``; the key goes as ``x-api-key``).  See docs/protocols.md."""
    anthropic_version: str = "2023-06-01"
    """The ``anthropic-version`` header sent to an Anthropic provider."""
    default_max_tokens: int = 4096
    """``max_tokens`` sent to an Anthropic provider (which requires it) when the client's request has none."""

    def validate(self, key: str) -> None:
        if not 1 <= self.default_max_tokens <= 2**31 - 1:
            raise ConfigError(f"{key}.default_max_tokens", "must be between 1 and 2147483647")
        if not self.anthropic_version or not self.anthropic_version.replace("-", "").isalnum():
            raise ConfigError(f"{key}.anthropic_version", "must be a version such as 2023-06-01")
        if not 1024 <= self.max_sse_event_bytes <= 256 * 1024 * 1024:
            raise ConfigError(f"{key}.max_sse_event_bytes", "must be between 1024 and 268435456")
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
    """``[auth]``: how callers are identified (see :mod:`proxy.auth` for what is checked)."""

    mode: Literal["jwt", "none"] = "jwt"
    """``jwt``: every request needs a valid bearer JWT; ``none``: every request runs as the dev principal (local trials only)."""
    algorithms: list[str] = field(default_factory=lambda: ["RS256"])
    """Accepted ``alg`` values, never read from the token; HS* cannot be mixed with asymmetric algorithms."""
    issuer: str = ""
    """Required ``iss`` claim (exact match); required in jwt mode."""
    audience: str = ""
    """Required ``aud`` claim (the string, or one entry of the list); required in jwt mode."""
    public_key_file: str = ""
    """PEM public key (RS*/PS*/ES*/EdDSA), relative to the config file; exactly one key source is set."""
    jwks_url: str = ""
    """JWKS endpoint; cached, refetched on an unknown ``kid`` at most every ``jwks_min_refresh_s``."""
    hs256_secret_env: str = ""
    """Environment variable holding an HS* secret of at least 32 bytes (redacted by value from logs and the audit log)."""
    tenant_claim: str = "tenant"
    """Claim holding the tenant: a non-empty printable string of at most ``max_claim_chars``."""
    subject_claim: str = "sub"
    """Claim holding the user or service id: a non-empty printable string of at most ``max_claim_chars``."""
    groups_claim: str = "groups"
    """Claim holding a list of group names (each non-empty, printable, at most ``max_claim_chars``)."""
    scopes_claim: str = "scope"
    """Claim holding the scopes: a space-separated string or a list of strings."""
    leeway_s: float = 30.0
    """Clock skew allowed on ``exp``, ``nbf`` and ``iat``."""
    max_token_bytes: int = 8192
    """Longest token accepted; a longer one is refused (401 ``auth.max_token_bytes``) before any decoding.

    The whole ``Authorization`` header line must also fit the HTTP
    server's header-line limit (``[server] max_header_bytes``).
    """
    max_claim_chars: int = 256
    """Longest tenant, subject, group name or scope (401 ``auth.max_claim_chars``): they become header values and log fields."""
    max_claim_items: int = 256
    """Most entries in the groups claim and in the scopes claim (401 ``auth.max_claim_items``)."""
    cache_size: int = 10000
    """Verified tokens kept (keyed by a hash of the token, never past ``exp`` nor, with ``jwks_url``, ``jwks_cache_s``); 0 = off."""
    jwks_cache_s: float = 300.0
    """JWKS cache lifetime."""
    jwks_min_refresh_s: float = 30.0
    """At most one JWKS refetch per this interval on unknown ``kid`` values."""
    dev_tenant: str = "dev"
    """Tenant of the dev principal (``mode = "none"``)."""
    dev_subject: str = "dev-user"
    """Subject of the dev principal (``mode = "none"``)."""
    dev_groups: list[str] = field(default_factory=list)
    """Groups of the dev principal (``mode = "none"``)."""

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
        if not 256 <= self.max_token_bytes <= 1 << 20:
            raise ConfigError(f"{key}.max_token_bytes", "must be between 256 and 1048576")
        if not 1 <= self.max_claim_chars <= 4096:
            raise ConfigError(f"{key}.max_claim_chars", "must be between 1 and 4096")
        if not 1 <= self.max_claim_items <= 10000:
            raise ConfigError(f"{key}.max_claim_items", "must be between 1 and 10000")
        if self.cache_size < 0:
            raise ConfigError(f"{key}.cache_size", "must be >= 0")


@dataclass
class AdminConfig:
    """``[admin]``: who may call the admin API."""

    token_env: str = "WARDEN_ADMIN_TOKEN"
    """Environment variable holding the bootstrap admin token (at least 24 characters; redacted by value from logs and the audit log)."""
    scope: str = "warden:admin"
    """Scope an admin JWT must carry."""
    console: bool = True
    """Serve the operator console at ``/console`` on the admin listener (sign-in with an admin JWT or the bootstrap token)."""
    console_session_ttl_s: float = 3600.0
    """How long a console session lasts after sign-in (never past the admin JWT's ``exp``); then the operator signs in again."""

    def validate(self, key: str) -> None:
        if not 1 <= self.console_session_ttl_s <= 7 * 86400:
            raise ConfigError(f"{key}.console_session_ttl_s", "must be between 1 and 604800 seconds")


@dataclass
class AuditConfig:
    """``[audit]``: the tamper-evident exchange log (see docs/audit.md).

    - ``enabled``: write the log at all.
    - ``backend``: ``sqlite`` (embedded, at ``path``) or ``postgres`` (the
      database of ``[database]``; one hash chain per running replica).
    - ``path``: the SQLite database (relative to the config file).
    - ``durability``: ``sync`` (a response waits for its record's commit; 503
      when the log cannot be written) or ``batch`` (queued, group-committed,
      backpressure when full; never dropped).
    - ``batch_max_records`` / ``batch_max_ms``: the largest group (records per
      frame to the writer process and per writer transaction), and how long
      the batch-mode writer task waits to fill one.
    - ``queue_max``: records waiting in the queue before callers wait (besides
      up to two groups in flight to the writer process).
    - ``fsync``: in ``sync`` durability, commit with ``synchronous=FULL`` so a
      committed record survives a power cut (one fsync per group commit).
      ``false`` uses ``NORMAL``: the response still waits for the commit and
      the record survives a crash or SIGKILL of Warden, not a power cut.
    - ``store_content``: ``full`` | ``redacted`` (PII removed too) | ``hashes``.
    - ``signing_key_file`` / ``signing_key_env``: the Ed25519 checkpoint key
      (PEM PKCS#8 or base64 of the 32-byte seed); when neither is set a key is
      generated next to the database (``<path>.ed25519``, mode 0600).
    - ``checkpoint_every``: sign a checkpoint every N records (and at stop).
    - ``checkpoint_file``: also append each checkpoint note to this file.
    - ``origin``: the log's name in checkpoints (default: generated once).
    - ``retention_days``: prune older records to a checkpoint (0 = keep all).
    - ``tool_result_max_bytes``: tool results are kept up to this size.
    - ``redact_patterns``: extra name -> regex redactions (always applied).
    - ``redact_pii``: PII kinds removed in ``redacted`` mode
      (``email``, ``phone``, ``card``, ``ssn``).
    """

    enabled: bool = True
    backend: Literal["sqlite", "postgres"] = "sqlite"
    """Where records go: ``sqlite`` (the file at ``path``) or ``postgres`` (``[database]``, shared by every replica)."""
    path: str = "warden-audit.db"
    durability: Literal["sync", "batch"] = "sync"
    fsync: bool = True
    batch_max_records: int = 256
    batch_max_ms: float = 5.0
    queue_max: int = 10000
    store_content: Literal["full", "redacted", "hashes"] = "redacted"
    signing_key_file: str = ""
    signing_key_env: str = ""
    checkpoint_every: int = 1000
    checkpoint_file: str = ""
    origin: str = ""
    retention_days: int = 0
    tool_result_max_bytes: int = 16384
    redact_patterns: dict[str, str] = field(default_factory=dict)
    redact_pii: list[str] = field(default_factory=lambda: ["email", "phone", "card"])

    def validate(self, key: str) -> None:
        for name in ("batch_max_records", "queue_max", "checkpoint_every", "tool_result_max_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}", "must be positive")
        if self.batch_max_ms < 0:
            raise ConfigError(f"{key}.batch_max_ms", "must be >= 0")
        if self.retention_days < 0:
            raise ConfigError(f"{key}.retention_days", "must be >= 0")
        if self.signing_key_file and self.signing_key_env:
            raise ConfigError(key, "set at most one of signing_key_file, signing_key_env")
        if self.origin and (not self.origin.isprintable() or "\n" in self.origin or " " in self.origin or "+" in self.origin):
            raise ConfigError(f"{key}.origin", "must be printable, without spaces or '+'")
        from llm_warden.proxy.audit.redact import Redactor

        Redactor(patterns=self.redact_patterns, pii=self.redact_pii)


@dataclass
class DatabaseConfig:
    """``[database]``: the PostgreSQL database shared by the parts that choose ``postgres`` (see docs/audit.md)."""

    dsn_env: str = "WARDEN_DATABASE_URL"
    """Environment variable holding the ``postgresql://`` URL (credentials never live in the file)."""
    pool_min: int = 1
    """Connections each Warden process keeps open to the database, at least."""
    pool_max: int = 10
    """Connections each Warden process opens to the database, at most (mind the server's ``max_connections`` across replicas)."""

    def validate(self, key: str) -> None:
        if not self.dsn_env or not self.dsn_env.replace("_", "a").isalnum() or self.dsn_env[0].isdigit():
            raise ConfigError(f"{key}.dsn_env", "must name an environment variable (letters, digits, '_')")
        if not 0 <= self.pool_min <= 1000:
            raise ConfigError(f"{key}.pool_min", "must be between 0 and 1000")
        if not 1 <= self.pool_max <= 1000:
            raise ConfigError(f"{key}.pool_max", "must be between 1 and 1000")
        if self.pool_min > self.pool_max:
            raise ConfigError(f"{key}.pool_min", "must not exceed pool_max")

    @property
    def dsn(self) -> str | None:
        """The URL from the environment, or ``None`` when the variable is unset or empty."""
        return os.environ.get(self.dsn_env) or None


@dataclass
class MetricsConfig:
    """``[metrics]``: Prometheus exposition on the admin listener (``GET /metrics``).

    Every label is bounded: a value outside the configured list (or, with no
    list, beyond the first ``max_label_values`` distinct values seen) is
    reported as ``other``.
    """

    tenant_label: bool = False
    """Add a ``tenant`` label to ``warden_requests_total`` (off: no per-tenant series)."""
    models: list[str] = field(default_factory=list)
    """Model names reported as themselves; others become ``other`` (empty: the first ``max_label_values`` seen)."""
    tenants: list[str] = field(default_factory=list)
    """With ``tenant_label``: tenants reported as themselves (empty: the first ``max_label_values`` seen)."""
    tools: list[str] = field(default_factory=list)
    """Tool names reported as themselves in ``warden_tool_calls_total`` (empty: the first ``max_label_values`` seen)."""
    max_label_values: int = 32
    """How many distinct values an open label (model, tenant, tool, retriever) may take before ``other``."""

    def validate(self, key: str) -> None:
        if not 1 <= self.max_label_values <= 1000:
            raise ConfigError(f"{key}.max_label_values", "must be between 1 and 1000")


@dataclass
class TracingConfig:
    """``[tracing]``: OpenTelemetry spans (GenAI semantic conventions) exported over OTLP/HTTP.

    Needs the ``otel`` extra (``pip install 'llm-warden[otel]'``); with
    ``enabled = false`` nothing of OpenTelemetry is imported.
    """

    enabled: bool = False
    """Emit one span per exchange (with child spans per upstream turn, retrieval and tool decision)."""
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    """The OTLP/HTTP traces endpoint of a collector (protobuf over HTTP)."""
    headers_env: str = ""
    """Environment variable holding extra exporter headers, ``key=value,key2=value2`` (e.g. a collector API key)."""
    service_name: str = "warden"
    """``service.name`` resource attribute."""
    sample_ratio: float = 1.0
    """Share of new traces recorded (0..1); an incoming ``traceparent`` keeps its own sampled flag."""
    capture_content: bool = False
    """Record prompts, answers, retrieval queries and tool arguments on spans (sensitive; off by default)."""
    content_max_chars: int = 8192
    """With ``capture_content``: cut each captured text at this many characters."""
    export_timeout_s: float = 10.0
    """Timeout of one OTLP export request (exports run on a background thread, never on the request path)."""

    def secret_values(self) -> list[str]:
        """Each exporter header value from ``headers_env`` (a collector API key is a secret on its own)."""
        raw = os.environ.get(self.headers_env, "") if self.headers_env else ""
        return [v.strip() for part in raw.split(",") for k, sep, v in [part.partition("=")] if sep and k.strip() and v.strip()]

    def validate(self, key: str) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ConfigError(f"{key}.sample_ratio", "must be between 0 and 1")
        if self.content_max_chars < 0:
            raise ConfigError(f"{key}.content_max_chars", "must be >= 0")
        if self.export_timeout_s <= 0:
            raise ConfigError(f"{key}.export_timeout_s", "must be positive")
        if not self.enabled:
            return
        if not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.endpoint", "must be an http:// or https:// OTLP/HTTP traces URL")
        if _missing("opentelemetry.sdk.trace") or _missing("opentelemetry.exporter.otlp.proto.http.trace_exporter"):
            raise ConfigError(f"{key}.enabled", "tracing needs the otel extra: pip install 'llm-warden[otel]'")


def _missing(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


@dataclass
class LoggingConfig:
    """``[logging]``: structured JSON logs on stdout, one line per event."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level written.  Request lines are ``info`` (``warning`` for 5xx), so ``warning`` keeps only failures."""
    access_log: bool = True
    """One JSON line per request (request id, trace id, tenant, route, model, status, latency, decisions, rule)."""
    include_subject: bool = False
    """Add the caller's subject (user or service id) to request lines (personal data: off by default)."""


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
    "database": DatabaseConfig,
    "metrics": MetricsConfig,
    "tracing": TracingConfig,
    "logging": LoggingConfig,
    "plugins": PluginsConfig,
    "mcp": McpConfig,
}


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    mcp: McpConfig = field(default_factory=McpConfig)
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
        from llm_warden.proxy.plugin import available_plugins

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
    from llm_warden.proxy.confload import convert

    return convert(tp, value, key)
