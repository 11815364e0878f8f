"""``[mcp]``: the MCP gateway's upstream servers, compiled once at load.

Each ``[[mcp.servers]]`` entry is one upstream MCP server, served to callers
at ``/mcp/{name}`` on the data plane: either a Streamable HTTP server
(``url``) or a local stdio server Warden starts and supervises (``command``,
``args``, ``env``).  Upstream credentials come from Warden's environment
(``headers_env``: header name → environment variable), never from the caller.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlparse

from llm_warden.proxy.errors import ConfigError

SERVER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_HEADER = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_FORBIDDEN_HEADERS = frozenset({"host", "content-length", "content-type", "accept", "mcp-session-id", "mcp-protocol-version", "transfer-encoding", "connection"})


@dataclass
class McpServerConfig:
    """One ``[[mcp.servers]]`` entry."""

    name: str
    """The server's name: its path ``/mcp/{name}`` and the prefix of its tools in ``[[tools]]`` (``name.tool``)."""
    url: str = ""
    """A Streamable HTTP upstream (``http://`` or ``https://``); exclusive with ``command``."""
    headers_env: dict[str, str] = field(default_factory=dict)
    """Headers sent upstream, each value read from the named environment variable at start (e.g. ``{Authorization = "MCP_CRM_TOKEN"}``)."""
    command: str = ""
    """A stdio upstream: the program Warden starts (and restarts with backoff after a crash); exclusive with ``url``."""
    args: list[str] = field(default_factory=list)
    """Arguments of ``command``."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment of ``command``: variable → the name of a variable of Warden's environment to copy (secrets never in the file)."""
    timeout_s: float = 300.0
    """Longest silence of the upstream while an answer is awaited: before it, or between the events of its
    stream (504 ``mcp.servers.timeout_s``); elicitations wait on a human, so keep it generous.  The server's
    own stream (GET) has no such bound."""
    relay_instructions: bool = False
    """Whether the server's ``instructions`` (from ``initialize``, text the model reads) reach the caller; off: dropped."""
    pins: dict[str, str] = field(default_factory=dict)
    """Tool name → ``sha256:<hex>`` digest of its accepted description and input schema (see docs/mcp.md)."""

    @property
    def transport(self) -> Literal["http", "stdio"]:
        return "stdio" if self.command else "http"

    def validate(self, key: str) -> None:
        if not SERVER_NAME.match(self.name):
            raise ConfigError(f"{key}.name", "must be 1 to 32 lowercase letters, digits, '_' or '-', starting with a letter")
        if bool(self.url) == bool(self.command):
            raise ConfigError(key, "needs exactly one of url (Streamable HTTP) or command (stdio)")
        if self.url:
            u = urlparse(self.url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ConfigError(f"{key}.url", "must be an http:// or https:// URL")
            if u.username or u.password:
                raise ConfigError(f"{key}.url", "must not carry credentials; use headers_env")
        elif self.args and any(not isinstance(a, str) for a in self.args):
            raise ConfigError(f"{key}.args", "must be strings")
        if self.headers_env and self.command:
            raise ConfigError(f"{key}.headers_env", "applies to url servers only (a stdio server gets env)")
        for h, var in self.headers_env.items():
            if not _HEADER.match(h) or h.lower() in _FORBIDDEN_HEADERS:
                raise ConfigError(f"{key}.headers_env.{h}", "is not a header Warden may set upstream")
            if not _ENV.match(var):
                raise ConfigError(f"{key}.headers_env.{h}", "must name an environment variable")
        for name, var in self.env.items():
            if not _ENV.match(name) or not _ENV.match(var):
                raise ConfigError(f"{key}.env.{name}", "must map a variable name to the name of a variable of Warden's environment")
        if not 0 < self.timeout_s <= 3600:
            raise ConfigError(f"{key}.timeout_s", "must be positive (and at most 3600)")
        for tool, digest in self.pins.items():
            if not _DIGEST.match(digest):
                raise ConfigError(f"{key}.pins.{tool}", "must be 'sha256:' and 64 lowercase hex digits")

    def secret_values(self) -> list[str]:
        """The upstream credentials this entry resolves (``headers_env`` and ``env`` values), for redaction by value;
        a header value's credential after its scheme too (``Bearer <token>`` → ``<token>``)."""
        out: list[str] = []
        for value in [*self.upstream_headers().values(), *(v for k, v in self.process_env().items() if k != "PATH")]:
            out.append(value)
            scheme, _, credential = value.partition(" ")
            if credential.strip() and scheme.isalpha():
                out.append(credential.strip())
        return out

    def upstream_headers(self) -> dict[str, str]:
        """The configured upstream headers, read from the environment now (missing variables are left out)."""
        out: dict[str, str] = {}
        for h, var in self.headers_env.items():
            value = os.environ.get(var)
            if value:
                out[h] = value
        return out

    def process_env(self) -> dict[str, str]:
        """The stdio server's environment: PATH and the configured variables copied from Warden's."""
        out = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        for name, var in self.env.items():
            value = os.environ.get(var)
            if value is not None:
                out[name] = value
        return out


@dataclass
class McpConfig:
    """``[mcp]``: the MCP gateway (off while ``servers`` is empty)."""

    servers: list[McpServerConfig] = field(default_factory=list)
    """The upstream MCP servers; each is served at ``/mcp/{name}``."""
    max_message_bytes: int = 1048576
    """Largest JSON-RPC message accepted from a caller (413 ``mcp.max_message_bytes``) and largest upstream event relayed."""
    session_key_env: str = ""
    """Environment variable holding a 32-byte key (64 hex digits) that seals session ids, so every replica
    can open them; empty: a random key per process (sessions then need sticky routing)."""
    unpinned: Literal["refuse", "accept_first"] = "refuse"
    """A tool with neither a config pin nor an accepted digest: ``refuse`` (hidden until an operator accepts
    it, the safe default) or ``accept_first`` (its first digest is accepted and audited)."""
    pin_db: str = "warden-mcp-pins.db"
    """SQLite file of operator-accepted digests (relative to the config file)."""
    duplicate_window_s: float = 600.0
    """A write tool call identical to one that succeeded in the same session this recently is refused
    (``mcp.duplicate``); 0 turns the guard off."""

    def validate(self, key: str) -> None:
        seen: set[str] = set()
        for i, s in enumerate(self.servers):
            if s.name in seen:
                raise ConfigError(f"{key}.servers[{i}].name", f"server {s.name!r} is declared twice")
            seen.add(s.name)
        if not 1024 <= self.max_message_bytes <= 64 * 1024 * 1024:
            raise ConfigError(f"{key}.max_message_bytes", "must be between 1024 and 64 MiB")
        if self.session_key_env and not _ENV.match(self.session_key_env):
            raise ConfigError(f"{key}.session_key_env", "must name an environment variable")
        if not self.pin_db:
            raise ConfigError(f"{key}.pin_db", "must name a file")
        if self.duplicate_window_s < 0:
            raise ConfigError(f"{key}.duplicate_window_s", "must be >= 0")

    def session_key(self) -> bytes | None:
        """The configured sealing key, or ``None`` for a random one; raises ``ConfigError`` when it is malformed."""
        if not self.session_key_env:
            return None
        raw = os.environ.get(self.session_key_env, "")
        try:
            key = bytes.fromhex(raw)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigError("mcp.session_key_env", f"${self.session_key_env} must hold 64 hex digits (a 32-byte key)")
        return key
