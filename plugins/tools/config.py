"""``[policy]`` and ``[[tools]]``: the tool registry, compiled once at load.

Each ``[[tools]]`` entry is validated into a :class:`ToolSpec`; its argument
schema (and ``approval_if``) is compiled with ``jsonschema-rs`` (Draft 2020-12)
inside ``validate``, so an invalid schema fails at start with a key such as
``tools[2].schema`` and the hot path only runs compiled validators.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

import jsonschema_rs

from plugins.tools.bounds import MAX_BYTES_LIMIT, MAX_DEPTH_LIMIT
from proxy.errors import ConfigError
from proxy.gcra import Rate, parse_rate

_NAME_RE = re.compile(r"^(?:[a-z][a-z0-9_-]{0,31}\.)?[A-Za-z0-9_-]{1,64}$")
"""A function name, or ``server.tool`` for a tool of the MCP server ``server`` (``[[mcp.servers]]``)."""
MAX_ERRORS_REPORTED = 20
MAX_ERROR_CHARS = 300


def _refuse_remote(uri: str) -> Any:
    raise ValueError(f"remote $ref {uri!r} is not allowed; inline the schema or use $defs")


def compile_schema(schema: dict[str, Any]) -> jsonschema_rs.Draft202012Validator:
    """Compile a Draft 2020-12 schema; formats are asserted, remote refs refused.

    Raises ``ValueError`` with the validator's message when the schema is invalid.
    """
    try:
        return jsonschema_rs.Draft202012Validator(schema, validate_formats=True, retriever=_refuse_remote)
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(first) from None


@dataclass
class CompiledTool:
    """A tool's runtime form: its spec, position and compiled validators."""

    index: int
    spec: ToolSpec
    validator: jsonschema_rs.Draft202012Validator
    approval_validator: jsonschema_rs.Draft202012Validator | None
    rate: Rate | None

    @property
    def key(self) -> str:
        """The config key of this tool, used as the rule prefix (``tools[0]``)."""
        return f"tools[{self.index}]"

    def schema_errors(self, args: Any) -> list[str]:
        """Every schema violation as ``/json/pointer: message`` (at most 20)."""
        out: list[str] = []
        for err in self.validator.iter_errors(args):
            path = "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in err.instance_path)
            message = err.message if len(err.message) <= MAX_ERROR_CHARS else err.message[:MAX_ERROR_CHARS] + "..."
            out.append(f"{path if len(path) <= MAX_ERROR_CHARS else path[:MAX_ERROR_CHARS] + '...'}: {message}")
            if len(out) >= MAX_ERRORS_REPORTED:
                out.append("(further errors omitted)")
                break
        return out

    def needs_approval(self, args: Any) -> bool:
        """Whether this call must wait for a human (``approval`` and ``approval_if``)."""
        if self.spec.approval != "required":
            return False
        return self.approval_validator is None or bool(self.approval_validator.is_valid(args))


@dataclass
class ToolSpec:
    """One ``[[tools]]`` entry: a governed tool."""

    name: str
    """The function name the model calls (``^[A-Za-z0-9_-]{1,64}$``), or ``server.tool`` for a tool of an MCP server."""
    effect: Literal["read", "write"]
    """``write`` tools are removed and refused while read-only mode is on."""
    schema: dict[str, Any]
    """JSON Schema (Draft 2020-12) of the arguments; an object schema.  This is
    the schema sent upstream and enforced, whatever the application sent."""
    approval: Literal["none", "required"] = "none"
    """``required``: calls are held until a human approves them."""
    approval_if: dict[str, Any] | None = None
    """Optional JSON Schema: approval is needed only when the arguments match it."""
    allow_groups: list[str] = field(default_factory=list)
    """If set, the principal must belong to one of these groups."""
    allow_scopes: list[str] = field(default_factory=list)
    """If set, the principal must hold one of these scopes."""
    allow_tenants: list[str] = field(default_factory=list)
    """If set, the principal's tenant must be one of these."""
    rate_limit: str = ""
    """Optional per-principal limit, e.g. ``"5/minute"``."""
    description: str = ""
    """If set, replaces the tool description sent upstream."""

    def validate(self, key: str) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"{key}.name", f"{self.name!r} is not a valid tool name (letters, digits, _ and -, at most 64)")
        if self.schema.get("type") != "object":
            raise ConfigError(f"{key}.schema", f"tool {self.name!r}: the arguments schema must have type = \"object\"")
        try:
            validator = compile_schema(self.schema)
        except ValueError as e:
            raise ConfigError(f"{key}.schema", f"tool {self.name!r}: invalid JSON Schema: {e}") from None
        approval_validator = None
        if self.approval_if is not None:
            if self.approval != "required":
                raise ConfigError(f"{key}.approval_if", f"tool {self.name!r}: approval_if needs approval = \"required\"")
            try:
                approval_validator = compile_schema(self.approval_if)
            except ValueError as e:
                raise ConfigError(f"{key}.approval_if", f"tool {self.name!r}: invalid JSON Schema: {e}") from None
        rate = None
        if self.rate_limit:
            try:
                rate = parse_rate(self.rate_limit)
            except ValueError as e:
                raise ConfigError(f"{key}.rate_limit", f"tool {self.name!r}: {e}") from None
        for name in ("allow_groups", "allow_scopes", "allow_tenants"):
            if any(not v for v in getattr(self, name)):
                raise ConfigError(f"{key}.{name}", f"tool {self.name!r}: empty names are not allowed")
        self._compiled = (validator, approval_validator, rate)

    def compile(self, index: int) -> CompiledTool:
        """The runtime form (validators compiled in :meth:`validate`)."""
        compiled = getattr(self, "_compiled", None)
        if compiled is None:
            self.validate(f"tools[{index}]")
            compiled = self._compiled
        validator, approval_validator, rate = compiled
        return CompiledTool(index, self, validator, approval_validator, rate)


@dataclass
class PolicyConfig:
    """``[policy]``: how tool calls are fenced."""

    read_only: bool = True
    """Default read-only mode (global) for a new deployment; the admin API
    changes it at runtime and the change is persisted in the state backend."""
    unknown_tools: Literal["deny", "allow"] = "deny"
    """``deny``: an undeclared tool is removed from requests and refused if
    called.  ``allow``: it passes unvalidated (treated as a write tool)."""
    max_corrections: int = 2
    """Corrective turns per exchange before the client gets an error."""
    approval_ttl_s: float = 3600.0
    """A pending approval expires this long after it was requested; an
    approved one must be used within this long after the approval."""
    state_backend: Literal["sqlite", "redis"] = "sqlite"
    """Where approvals and the read-only switch live: ``sqlite`` (``state_db``,
    one replica or several workers sharing the file) or ``redis`` (shared by
    every replica).  Cannot change on reload."""
    state_db: str = "warden-state.db"
    """SQLite file for approvals and the read-only switch (relative to the config file); ``state_backend = "sqlite"`` only."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis server for ``state_backend = "redis"``."""
    redis_key_prefix: str = "warden:tools:"
    """Prefix of every Redis key of the tool state (several deployments may share one Redis)."""
    tool_result_max_bytes: int = 16384
    """Tool results recorded for the audit log are cut to this many bytes."""
    mode_refresh_s: float = 1.0
    """How often the persisted mode and approvals count are re-read (other
    worker processes may change them); 0 disables."""
    max_argument_depth: int = 32
    """Deepest nesting of objects and arrays accepted in one call's arguments
    (``{"a": [1]}`` is 2 deep); deeper calls are sent back to the model to
    fix (rule ``tools.argument_depth``).  1 to 128."""
    max_argument_bytes: int = 65536
    """Largest arguments (UTF-8 bytes of the JSON text) accepted in one call;
    longer calls are sent back to the model to fix (rule
    ``tools.argument_bytes``).  16 to 16 MiB."""

    def validate(self, key: str) -> None:
        if not 0 <= self.max_corrections <= 10:
            raise ConfigError(f"{key}.max_corrections", "must be between 0 and 10")
        if self.approval_ttl_s <= 0:
            raise ConfigError(f"{key}.approval_ttl_s", "must be positive")
        if self.tool_result_max_bytes < 0:
            raise ConfigError(f"{key}.tool_result_max_bytes", "must be >= 0")
        if self.mode_refresh_s < 0:
            raise ConfigError(f"{key}.mode_refresh_s", "must be >= 0")
        if not 1 <= self.max_argument_depth <= MAX_DEPTH_LIMIT:
            raise ConfigError(f"{key}.max_argument_depth", f"must be between 1 and {MAX_DEPTH_LIMIT}")
        if not 16 <= self.max_argument_bytes <= MAX_BYTES_LIMIT:
            raise ConfigError(f"{key}.max_argument_bytes", f"must be between 16 and {MAX_BYTES_LIMIT}")
        if not self.state_db:
            raise ConfigError(f"{key}.state_db", "must name a file")
        if self.state_backend not in ("sqlite", "redis"):
            raise ConfigError(f"{key}.state_backend", 'must be "sqlite" or "redis"')
        if self.state_backend == "redis":
            u = urlparse(self.redis_url)
            if u.scheme not in ("redis", "rediss", "unix") or (u.scheme != "unix" and not u.hostname):
                raise ConfigError(f"{key}.redis_url", "must be a redis://, rediss:// or unix:// URL")
            if not self.redis_key_prefix or any(c.isspace() for c in self.redis_key_prefix):
                raise ConfigError(f"{key}.redis_key_prefix", "must be a non-empty prefix without whitespace")


class ToolRegistry:
    """Declared tools by name, compiled."""

    def __init__(self, specs: list[ToolSpec]) -> None:
        self.tools: dict[str, CompiledTool] = {}
        for i, spec in enumerate(specs):
            if spec.name in self.tools:
                first = self.tools[spec.name].index
                raise ConfigError(f"tools[{i}].name", f"tool {spec.name!r} is already declared at tools[{first}]")
            self.tools[spec.name] = spec.compile(i)

    def get(self, name: str) -> CompiledTool | None:
        return self.tools.get(name)

    def __len__(self) -> int:
        return len(self.tools)
