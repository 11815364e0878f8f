"""``[policy]`` and ``[[tools]]``: the tool registry, compiled once at load.

Each ``[[tools]]`` entry is validated into a :class:`ToolSpec`; its argument
schema, ``approval_if`` and the ``when`` of its rules are compiled with
``jsonschema-rs`` (Draft 2020-12) inside ``validate``, so an invalid schema
fails at start with a key such as ``tools[2].schema`` and the hot path only
runs compiled validators.  :class:`ToolRegistry` resolves a call's tool by
its name (and, for a tool served by an MCP server, the server's name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

import jsonschema_rs

from llm_warden.plugins.tools.bounds import MAX_BYTES_LIMIT, MAX_DEPTH_LIMIT
from llm_warden.plugins.tools.rules import ArgumentRule, RuleSet, build_rule_set
from llm_warden.plugins.tools.schemas import compile_schema
from llm_warden.plugins.tools.versions import Deprecation, Sunset, contract_id, default_function_name, parse_sunset
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.gcra import Rate, parse_rate

__all__ = ["CompiledTool", "PolicyConfig", "ToolRegistry", "ToolSpec", "compile_schema"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# MCP tool names may also hold "." and "/" (MCP SEP-986).
_MCP_NAME_RE = re.compile(r"^[A-Za-z0-9_./-]{1,128}$")
_SERVER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CONTRACT_RE = re.compile(r"^(?P<name>[A-Za-z0-9_./-]{1,128}?)(?:@(?P<version>[1-9][0-9]{0,5}))?$")
MAX_ERRORS_REPORTED = 20
MAX_ERROR_CHARS = 300


@dataclass
class CompiledTool:
    """A tool's runtime form: its spec, position and compiled validators."""

    index: int
    spec: ToolSpec
    validator: jsonschema_rs.Draft202012Validator
    approval_validator: jsonschema_rs.Draft202012Validator | None
    rate: Rate | None
    rules: RuleSet | None = None
    """The argument rules, in order (``None``: the tool has none)."""
    deprecation: Deprecation | None = None
    """Set when the entry is ``deprecated`` (the registry resolves its replacement)."""

    @property
    def key(self) -> str:
        """The config key of this tool, used as the rule prefix (``tools[0]``)."""
        return f"tools[{self.index}]"

    @property
    def function(self) -> str:
        """The name the model calls (``refund``, ``refund_v2``, or ``function_name``)."""
        return self.spec.function_name or default_function_name(self.spec.name, self.spec.version)

    @property
    def contract(self) -> str:
        """The contract id: ``refund@2``, or ``refund`` when unversioned."""
        return contract_id(self.spec.name, self.spec.version)

    @property
    def ref(self) -> str:
        """Where the tool lives: the function name, prefixed ``server/`` for an MCP server's tool."""
        return f"{self.spec.server}/{self.function}" if self.spec.server else self.function

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
    """One ``[[tools]]`` entry: a governed tool (one version of it, when versioned)."""

    name: str
    """The tool's name (``^[A-Za-z0-9_-]{1,64}$``; an MCP tool's may also hold ``.`` and ``/``).
    Unversioned, it is also the function name the model calls."""
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
    rules: list[ArgumentRule] = field(default_factory=list)
    """Argument-aware rules, read in order; the first that matches decides (see :mod:`plugins.tools.rules`)."""
    rules_default: Literal["allow", "deny"] | None = None
    """What decides when no rule matches: ``deny`` unless set (only with ``rules``)."""
    version: int | None = None
    """Contract version (1, 2, ...): versions of one tool are separate entries, side by side (``refund@2``)."""
    function_name: str = ""
    """The function name the version is offered and called under; default ``name``, or ``{name}_v{version}`` when versioned."""
    deprecated: Any = None
    """The version's sunset, ``"2027-01-31"`` (00:00 UTC) or an RFC 3339 time with offset: before it calls are
    allowed with a warning, from it on they are refused (rule ``tools[i].deprecated``)."""
    replacement: str = ""
    """The contract that replaces this one (``refund@2``); needs ``deprecated``."""
    server: str = ""
    """The MCP server whose tool this entry governs (empty: a function the application offers in chat)."""

    def validate(self, key: str) -> None:
        name_re = _MCP_NAME_RE if self.server else _NAME_RE
        if not name_re.match(self.name):
            raise ConfigError(f"{key}.name", f"{self.name!r} is not a valid tool name (letters, digits, _ and -, at most 64)")
        if self.server and not _SERVER_RE.match(self.server):
            raise ConfigError(f"{key}.server", f"{self.server!r} is not a valid server name (letters, digits, _ and -, at most 64)")
        if self.version is not None and not 1 <= self.version <= 999999:
            raise ConfigError(f"{key}.version", f"tool {self.name!r}: must be an integer from 1 to 999999")
        function = self.function_name or default_function_name(self.name, self.version)
        if not name_re.match(function):
            what = "function_name" if self.function_name else "version"
            raise ConfigError(
                f"{key}.{what}", f"tool {self.name!r}: {function!r} is not a valid function name (letters, digits, _ and -, at most 64); set function_name"
            )
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
        rule_set = build_rule_set(self.rules, self.rules_default, key, self.name)
        sunset: Sunset | None = None
        if self.deprecated is not None:
            try:
                sunset = parse_sunset(self.deprecated)
            except ValueError as e:
                raise ConfigError(f"{key}.deprecated", f"tool {self.name!r}: {e}") from None
        if self.replacement:
            if sunset is None:
                raise ConfigError(f"{key}.replacement", f"tool {self.name!r}: replacement needs deprecated (the date this version stops)")
            if not _CONTRACT_RE.match(self.replacement):
                raise ConfigError(f"{key}.replacement", f"tool {self.name!r}: {self.replacement!r} is not a contract such as \"refund@2\"")
        self._compiled = (validator, approval_validator, rate, rule_set, sunset)

    def compile(self, index: int) -> tuple[CompiledTool, Sunset | None]:
        """The runtime form (validators compiled in :meth:`validate`) and the sunset, if deprecated."""
        compiled = getattr(self, "_compiled", None)
        if compiled is None:
            self.validate(f"tools[{index}]")
            compiled = self._compiled
        validator, approval_validator, rate, rule_set, sunset = compiled
        return CompiledTool(index, self, validator, approval_validator, rate, rule_set), sunset


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
    self_approval: bool = False
    """Whether a reviewer may approve a call they asked for themselves (the
    same tenant and subject): off by default, so an approval always takes a
    second person (rule ``tools.approval.self``); denying one's own call is
    always allowed."""
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
    """Declared tools, compiled, resolved by name.

    Chat tools (no ``server``) are keyed by the function name the model calls;
    an MCP server's tools by server, then tool name.  Versions of one tool are
    separate entries with distinct function names (``refund_v1``,
    ``refund_v2``); ``contracts`` finds an entry by its contract id.
    """

    def __init__(self, specs: list[ToolSpec]) -> None:
        self.tools: dict[str, CompiledTool] = {}
        """Chat tools by function name."""
        self.servers: dict[str, dict[str, CompiledTool]] = {}
        """MCP tools by server name, then tool name."""
        self.contracts: dict[tuple[str, str], CompiledTool] = {}
        """Every entry by (server, contract id); server is ``""`` for chat tools."""
        sunsets: list[tuple[CompiledTool, Sunset]] = []
        for i, spec in enumerate(specs):
            tool, sunset = spec.compile(i)
            space = self.tools if not spec.server else self.servers.setdefault(spec.server, {})
            have = space.get(tool.function)
            if have is not None:
                key = "function_name" if spec.function_name else "name" if spec.version is None else "version"
                where = f" on server {spec.server!r}" if spec.server else ""
                raise ConfigError(
                    f"tools[{i}].{key}", f"tool {tool.function!r}{where} is already declared at tools[{have.index}] ({have.contract})"
                )
            space[tool.function] = tool
            contract = (spec.server, tool.contract)
            if contract in self.contracts:
                raise ConfigError(f"tools[{i}].version", f"contract {tool.contract!r} is already declared at tools[{self.contracts[contract].index}]")
            self.contracts[contract] = tool
            if sunset is not None:
                sunsets.append((tool, sunset))
        sunset_of = {id(tool): sunset for tool, sunset in sunsets}
        for tool, sunset in sunsets:
            tool.deprecation = self._deprecation(tool, sunset, sunset_of)

    def _deprecation(self, tool: CompiledTool, sunset: Sunset, sunset_of: dict[int, Sunset]) -> Deprecation:
        spec = tool.spec
        replacement: CompiledTool | None = None
        if spec.replacement:
            replacement = self.contracts.get((spec.server, spec.replacement))
            if replacement is None:
                raise ConfigError(f"{tool.key}.replacement", f"tool {spec.name!r}: no [[tools]] entry is the contract {spec.replacement!r}")
            if replacement is tool:
                raise ConfigError(f"{tool.key}.replacement", f"tool {spec.name!r}: a version cannot replace itself")
            ends = sunset_of.get(id(replacement))
            if ends is not None and ends.at <= sunset.at:
                raise ConfigError(
                    f"{tool.key}.replacement",
                    f"tool {spec.name!r}: the replacement {replacement.contract} is retired at {ends.text}, not after this version ({sunset.text})",
                )
        return Deprecation(
            contract=tool.contract,
            function=tool.function,
            tool=spec.name,
            version="" if spec.version is None else str(spec.version),
            sunset=sunset,
            replacement=None if replacement is None else replacement.contract,
            replacement_function=None if replacement is None else replacement.function,
        )

    def get(self, name: str) -> CompiledTool | None:
        """The chat tool the model calls ``name``."""
        return self.tools.get(name)

    def resolve(self, name: str, server: str | None = None) -> CompiledTool | None:
        """The entry governing a call to ``name``: a chat function (``server`` ``None``) or MCP server ``server``'s tool."""
        if not server:
            return self.tools.get(name)
        space = self.servers.get(server)
        return None if space is None else space.get(name)

    def contract(self, ref: str, server: str | None = None) -> CompiledTool | None:
        """The entry whose contract id is ``ref`` (``refund@2``, or ``refund`` for an unversioned one)."""
        return self.contracts.get((server or "", ref))

    def __len__(self) -> int:
        return len(self.tools) + sum(len(s) for s in self.servers.values())
