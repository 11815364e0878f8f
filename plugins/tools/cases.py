"""Declarative policy cases: who calls which tool with which arguments in which mode, and the verdict expected.

A case file (YAML, or JSON Lines with one case per line) is run by ``warden
policy test`` against the ``[policy]`` and ``[[tools]]`` of a config file, so
a change of the tool policy is reviewed like code: the cases that change
their verdict show in the diff, and CI fails when a verdict moves unexpectedly.

Each case is judged by :meth:`plugins.tools.check.ToolPolicy.verdict` — the
same checks the server runs (unknown tool, retired version, permission,
read-only mode, argument bounds, JSON, schema, argument rules) and whether a
human approval is needed (``hold``).  Duplicate mutations and rate limits
depend on the conversation and on time, and are not part of a case.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from llm_warden.plugins.tools.check import ToolPolicy
from llm_warden.plugins.tools.config import PolicyConfig, ToolRegistry, ToolSpec
from llm_warden.plugins.tools.versions import parse_sunset
from llm_warden.proxy.confload import convert, load_dataclass
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.exchange import Decision, Principal
from llm_warden.proxy.tooling import parse_call

DECISIONS = ("allow", "deny", "repair", "hold")
MODES = {"read-only": True, "read-write": False}
MAX_CASE_FILE_BYTES = 16 * 1024 * 1024
_CASE_KEYS = frozenset({"name", "principal", "tool", "server", "arguments", "mode", "now", "expect"})
_PRINCIPAL_KEYS = frozenset({"tenant", "user", "groups", "scopes"})
_EXPECT_KEYS = frozenset({"decision", "rule", "deprecated"})
_FILE_KEYS = frozenset({"policy", "principals", "defaults", "cases"})
_DEFAULT_KEYS = frozenset({"mode", "now", "principal"})


class CaseError(ValueError):
    """The case file (or one case of it) is invalid: the message says which and why."""


@dataclass(frozen=True, slots=True)
class Case:
    """One case, validated."""

    number: int
    """Its position in the file, from 1."""
    name: str
    principal: Principal | None
    tool: str
    """The tool as the case names it: a function name (``refund_v2``) or a contract (``refund@2``)."""
    server: str | None
    arguments: str
    """The arguments as JSON text, exactly as a model would emit them."""
    read_only: bool
    now: float | None
    """UTC seconds since the epoch the case is judged at (``None``: the real clock)."""
    decision: str
    rule: str | None = None
    deprecated: bool | None = None

    @property
    def label(self) -> str:
        return f"case {self.number} ({self.name!r})"


@dataclass(slots=True)
class CaseFile:
    """A parsed case file."""

    cases: list[Case]
    policy: Path | None = None
    """The policy file it names (relative to the case file), if any."""


@dataclass(slots=True)
class Outcome:
    """A case and what the policy decided."""

    case: Case
    decision: Decision
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def load_policy(path: Path) -> ToolPolicy:
    """The ``[policy]`` and ``[[tools]]`` of a TOML file (other sections are ignored); ``ConfigError`` naming the key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError("policy", f"cannot read {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("policy", f"{path} is not valid TOML: {e}") from None
    section = load_dataclass(PolicyConfig, data.get("policy", {}), "policy")
    specs = convert(list[ToolSpec], data.get("tools", []), "tools")
    return ToolPolicy(ToolRegistry(specs), section)


def _text(value: Any, what: str, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise CaseError(f"{where}: {what} must be a {'string' if empty else 'non-empty string'}")
    return value


def _names(value: Any, what: str, where: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CaseError(f"{where}: {what} must be a list of non-empty strings")
    return frozenset(value)


def _principal(value: Any, named: dict[str, Principal | None], where: str) -> Principal | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in named:
            known = ", ".join(sorted(named)) or "none"
            raise CaseError(f"{where}: principal {value!r} is not among the file's principals (known: {known})")
        return named[value]
    if not isinstance(value, dict):
        raise CaseError(f"{where}: principal must be a mapping {{tenant, user, groups, scopes}}, a name from 'principals', or null")
    unknown = set(value) - _PRINCIPAL_KEYS
    if unknown:
        raise CaseError(f"{where}: unknown principal key(s) {', '.join(sorted(map(str, unknown)))} (known: {', '.join(sorted(_PRINCIPAL_KEYS))})")
    return Principal(
        tenant=_text(value.get("tenant"), "principal.tenant", where),
        subject=_text(value.get("user"), "principal.user", where),
        groups=_names(value.get("groups"), "principal.groups", where),
        scopes=_names(value.get("scopes"), "principal.scopes", where),
    )


def _mode(value: Any, where: str) -> bool:
    if value not in MODES:
        raise CaseError(f"{where}: mode must be 'read-only' or 'read-write', got {_shown(value)}")
    return MODES[value]


def _now(value: Any, where: str) -> float:
    try:
        return parse_sunset(value).at
    except ValueError as e:
        raise CaseError(f"{where}: now: {e}") from None


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _arguments(value: Any, where: str) -> str:
    if value is None:
        return "{}"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        try:
            return orjson.dumps(value).decode()
        except (orjson.JSONEncodeError, TypeError) as e:
            raise CaseError(f"{where}: arguments cannot be written as JSON ({e})") from None
    raise CaseError(f"{where}: arguments must be a mapping, or a string holding the raw JSON text")


def _expect(value: Any, where: str) -> tuple[str, str | None, bool | None]:
    if isinstance(value, str):
        value = {"decision": value}
    if not isinstance(value, dict):
        raise CaseError(f"{where}: expect must be a decision ({', '.join(DECISIONS)}) or a mapping {{decision, rule, deprecated}}")
    unknown = set(value) - _EXPECT_KEYS
    if unknown:
        raise CaseError(f"{where}: unknown expect key(s) {', '.join(sorted(map(str, unknown)))} (known: {', '.join(sorted(_EXPECT_KEYS))})")
    decision = value.get("decision")
    if decision not in DECISIONS:
        raise CaseError(f"{where}: expect.decision must be one of {', '.join(DECISIONS)}, got {_shown(decision)}")
    rule = value.get("rule")
    if rule is not None:
        rule = _text(rule, "expect.rule", where)
    deprecated = value.get("deprecated")
    if deprecated is not None and not isinstance(deprecated, bool):
        raise CaseError(f"{where}: expect.deprecated must be true or false")
    return str(decision), rule, deprecated


def _case(number: int, raw: Any, named: dict[str, Principal | None], defaults: dict[str, Any]) -> Case:
    where = f"case {number}"
    if not isinstance(raw, dict):
        raise CaseError(f"{where}: a case must be a mapping")
    if isinstance(raw.get("name"), str) and raw["name"]:
        where = f"case {number} ({_shown(raw['name'])})"
    unknown = set(raw) - _CASE_KEYS
    if unknown:
        raise CaseError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} (known: {', '.join(sorted(_CASE_KEYS))})")
    for key in ("name", "tool", "expect"):
        if key not in raw:
            raise CaseError(f"{where}: '{key}' is missing")
    name = _text(raw["name"], "name", where)
    if "principal" in raw:
        principal = _principal(raw["principal"], named, where)
    elif "principal" in defaults:
        principal = _principal(defaults["principal"], named, where)
    else:
        raise CaseError(f"{where}: 'principal' is missing (null for a request without one)")
    server = raw.get("server")
    if server is not None:
        server = _text(server, "server", where)
    mode = raw.get("mode", defaults.get("mode"))
    now = raw.get("now", defaults.get("now"))
    decision, rule, deprecated = _expect(raw["expect"], where)
    return Case(
        number=number,
        name=name,
        principal=principal,
        tool=_text(raw["tool"], "tool", where),
        server=server,
        arguments=_arguments(raw.get("arguments"), where),
        read_only=_mode(mode, where) if mode is not None else defaults["read_only"],
        now=_now(now, where) if now is not None else None,
        decision=decision,
        rule=rule,
        deprecated=deprecated,
    )


def parse_cases(text: str, *, jsonl: bool, default_read_only: bool) -> CaseFile:
    """Validate a case file's text; raises :class:`CaseError` naming the case (or line) and the reason."""
    if jsonl:
        raw_cases: list[Any] = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw_cases.append(orjson.loads(line))
            except orjson.JSONDecodeError as e:
                raise CaseError(f"line {n}: not valid JSON ({e.msg})") from None
        top: dict[str, Any] = {"cases": raw_cases}
    else:
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise CaseError(f"the case file is not valid YAML{at}: {problem}") from None
        if not isinstance(loaded, dict):
            raise CaseError("the case file must be a mapping with a 'cases' list")
        top = loaded
    unknown = set(top) - _FILE_KEYS
    if unknown:
        raise CaseError(f"unknown top-level key(s) {', '.join(sorted(map(str, unknown)))} (known: {', '.join(sorted(_FILE_KEYS))})")
    named: dict[str, Principal | None] = {}
    principals = top.get("principals") or {}
    if not isinstance(principals, dict):
        raise CaseError("'principals' must be a mapping of names to principals")
    for pname, value in principals.items():
        named[str(pname)] = _principal(value, {}, f"principals.{pname}")
    defaults = top.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - _DEFAULT_KEYS:
        raise CaseError(f"'defaults' must be a mapping of {', '.join(sorted(_DEFAULT_KEYS))}")
    defaults = {**defaults, "read_only": _mode(defaults["mode"], "defaults") if "mode" in defaults else default_read_only}
    if "now" in defaults:
        _now(defaults["now"], "defaults")
    cases = top.get("cases")
    if not isinstance(cases, list) or not cases:
        raise CaseError("'cases' must be a non-empty list")
    parsed = [_case(i, raw, named, defaults) for i, raw in enumerate(cases, start=1)]
    seen: dict[str, int] = {}
    for c in parsed:
        if c.name in seen:
            raise CaseError(f"{c.label}: the name is already used by case {seen[c.name]}")
        seen[c.name] = c.number
    policy = top.get("policy")
    if policy is not None and not isinstance(policy, str):
        raise CaseError("'policy' must be the path of a config file")
    return CaseFile(parsed, Path(policy) if policy else None)


def read_cases(path: Path, default_read_only: bool) -> CaseFile:
    """Read and validate a case file (``.jsonl``: JSON Lines, otherwise YAML, which includes JSON)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CASE_FILE_BYTES + 1)
    except OSError as e:
        raise CaseError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_CASE_FILE_BYTES:
        raise CaseError(f"{path} is larger than {MAX_CASE_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CaseError(f"{path} is not UTF-8 text") from None
    out = parse_cases(text, jsonl=path.suffix.lower() == ".jsonl", default_read_only=default_read_only)
    if out.policy is not None and not out.policy.is_absolute():
        out.policy = path.parent / out.policy
    return out


def resolve_tool(policy: ToolPolicy, case: Case) -> str:
    """The function name a case's tool is called under (a contract id is mapped to its function)."""
    if "@" not in case.tool:
        return case.tool
    tool = policy.registry.contract(case.tool, case.server)
    if tool is None:
        known = sorted(c for (srv, c), _ in policy.registry.contracts.items() if srv == (case.server or ""))
        raise CaseError(f"{case.label}: tool {case.tool!r} is not a contract of the policy (known: {', '.join(known) or 'none'})")
    return tool.function


def run_case(policy: ToolPolicy, case: Case) -> Outcome:
    """Judge one case against the policy and compare the verdict with what the case expects."""
    function = resolve_tool(policy, case)
    call = parse_call("call_case", function, case.arguments, 0)
    at = case.now
    judged = ToolPolicy(policy.registry, policy.policy, (lambda: at) if at is not None else time.time)
    read_only = case.read_only
    decision = judged.verdict(case.principal, call, lambda _tenant: (read_only, "for this case"), case.server)
    out = Outcome(case, decision)
    if decision.kind != case.decision:
        out.problems.append(f"expected {case.decision}, got {decision.kind}")
    if case.rule is not None and decision.rule != case.rule:
        out.problems.append(f"expected rule {case.rule}, got {decision.rule}")
    if case.deprecated is not None:
        got = decision.details is not None and "deprecation" in decision.details
        if got != case.deprecated:
            out.problems.append("expected a deprecation warning, got none" if case.deprecated else "expected no deprecation warning, got one")
    return out
