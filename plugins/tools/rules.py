"""Argument-aware rules: allow or deny a call when its arguments match a JSON Schema.

A ``[[tools]]`` entry may carry ``[[tools.rules]]``, each with a ``name``, a
``when`` schema (Draft 2020-12, compiled at load) and a ``decision``
(``allow`` or ``deny``), optionally limited to principals in ``groups`` or
holding ``scopes``.  The rules are read **in order and the first that matches
decides**; when none matches, ``rules_default`` decides, and it is ``deny``
unless set (fail closed).  A rule that cannot be evaluated on some arguments
(the validator fails) denies the call: whether it matched is unknown.

The rules run after the arguments passed the tool's own schema, so ``when``
only has to say what distinguishes the case (``{ properties = { amount = {
maximum = 100 } } }``); like any JSON Schema, a keyword about a property
that is absent is satisfied, so name the property in ``required`` when its
absence must not match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema_rs

from llm_warden.plugins.tools.schemas import compile_schema, validator_failure
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.exchange import Principal

_RULE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_MESSAGE_CHARS = 500


@dataclass
class ArgumentRule:
    """One ``[[tools.rules]]`` entry."""

    name: str
    """Unique within its tool (letters, digits, ``_`` and ``-``); the rule of a
    decision it makes is ``tools[i].rules.<name>``."""
    decision: Literal["allow", "deny"]
    """What the rule decides when it matches."""
    when: dict[str, Any]
    """JSON Schema (Draft 2020-12): the rule matches when the arguments are valid against it."""
    groups: list[str] = field(default_factory=list)
    """If set, the rule applies only to principals in one of these groups."""
    scopes: list[str] = field(default_factory=list)
    """If set, the rule applies only to principals holding one of these scopes."""
    message: str = ""
    """Told to the model when this rule denies a call (default: a generic refusal naming the rule)."""

    def validate(self, key: str) -> None:
        if not _RULE_NAME.match(self.name):
            raise ConfigError(f"{key}.name", f"{self.name!r} is not a valid rule name (letters, digits, _ and -, at most 64)")
        if not isinstance(self.when, dict):
            raise ConfigError(f"{key}.when", "must be a table (a JSON Schema)")
        try:
            self._validator = compile_schema(self.when)
        except ValueError as e:
            raise ConfigError(f"{key}.when", f"rule {self.name!r}: invalid JSON Schema: {e}") from None
        for name in ("groups", "scopes"):
            if any(not v for v in getattr(self, name)):
                raise ConfigError(f"{key}.{name}", f"rule {self.name!r}: empty names are not allowed")
        if len(self.message) > MAX_MESSAGE_CHARS:
            raise ConfigError(f"{key}.message", f"rule {self.name!r}: at most {MAX_MESSAGE_CHARS} characters")

    def compiled(self, tool_key: str, index: int) -> CompiledRule:
        validator = getattr(self, "_validator", None)
        if validator is None:
            self.validate(f"{tool_key}.rules[{index}]")
            validator = self._validator
        return CompiledRule(
            rule=f"{tool_key}.rules.{self.name}",
            spec=self,
            validator=validator,
            groups=frozenset(self.groups),
            scopes=frozenset(self.scopes),
        )


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule's runtime form."""

    rule: str
    """The rule a decision names: ``tools[1].rules.small_refund``."""
    spec: ArgumentRule
    validator: jsonschema_rs.Draft202012Validator
    groups: frozenset[str]
    scopes: frozenset[str]

    def applies_to(self, principal: Principal | None) -> bool:
        """Whether the rule's ``groups``/``scopes`` admit the principal (a request without one matches no list)."""
        if self.groups and (principal is None or not principal.groups & self.groups):
            return False
        return not (self.scopes and (principal is None or not principal.scopes & self.scopes))

    def matches(self, args: dict[str, Any], principal: Principal | None) -> bool:
        """Whether this rule decides the call; the validator may raise (the caller fails closed)."""
        return self.applies_to(principal) and bool(self.validator.is_valid(args))


@dataclass(frozen=True, slots=True)
class RuleVerdict:
    """What the rules of a tool decided: the rule that decided, and whether it allows."""

    rule: str
    allow: bool
    name: str
    """The deciding rule's own name (``rules_default`` when none matched)."""
    message: str = ""
    failed: str | None = None
    """Set when a rule could not be evaluated (the verdict is then a denial)."""


@dataclass(frozen=True, slots=True)
class RuleSet:
    """A tool's rules in order, and what decides when none matches."""

    rules: tuple[CompiledRule, ...]
    default_allow: bool
    default_rule: str
    """``tools[i].rules_default``."""

    def decide(self, args: dict[str, Any], principal: Principal | None) -> RuleVerdict:
        """The first matching rule's verdict, else the default; never raises (a failing rule denies)."""
        for r in self.rules:
            try:
                hit = r.matches(args, principal)
            except BaseException as e:
                if not validator_failure(e):
                    raise
                return RuleVerdict(r.rule, False, r.spec.name, failed=type(e).__name__)
            if hit:
                return RuleVerdict(r.rule, r.spec.decision == "allow", r.spec.name, r.spec.message)
        return RuleVerdict(self.default_rule, self.default_allow, "rules_default")


def build_rule_set(rules: list[ArgumentRule], default: str | None, tool_key: str, tool_name: str) -> RuleSet | None:
    """Compile a tool's rules (``None`` when it has none); ``ConfigError`` for a set that cannot make sense."""
    if not rules:
        if default is not None:
            raise ConfigError(f"{tool_key}.rules_default", f"tool {tool_name!r}: rules_default needs [[tools.rules]]")
        return None
    seen: dict[str, int] = {}
    compiled = []
    for i, r in enumerate(rules):
        if r.name in seen:
            raise ConfigError(f"{tool_key}.rules[{i}].name", f"tool {tool_name!r}: rule {r.name!r} is already declared at rules[{seen[r.name]}]")
        seen[r.name] = i
        compiled.append(r.compiled(tool_key, i))
    default_allow = default == "allow"
    decisions = {r.decision for r in rules}
    if decisions == {"deny"} and not default_allow:
        raise ConfigError(
            f"{tool_key}.rules_default",
            f"tool {tool_name!r}: every rule denies and rules_default is \"deny\", so no call could ever pass; "
            "add an allow rule or set rules_default = \"allow\"",
        )
    if decisions == {"allow"} and default_allow:
        raise ConfigError(
            f"{tool_key}.rules_default",
            f"tool {tool_name!r}: every rule allows and rules_default is \"allow\", so the rules decide nothing; "
            "set rules_default = \"deny\" or add a deny rule",
        )
    return RuleSet(tuple(compiled), default_allow, f"{tool_key}.rules_default")
