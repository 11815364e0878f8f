"""The checks of a tool call that depend only on the policy, whichever channel carries the call.

:func:`check_call` runs them in order (see :mod:`plugins.tools.judge` for the
whole list) and returns either the refusal or a :class:`Passed` call for the
stateful checks that follow (duplicate mutation, rate limit, approval).  The
judge of chat tool calls and ``warden policy test`` both call it, so a case
file is checked against exactly what the server enforces.

:class:`ToolPolicy` is the same policy as one object: a registry, the
``[policy]`` section and a clock, resolving a tool by its name (and an MCP
server's name) — what any channel needs to fence what it offers and judge
what is called.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_warden.plugins.tools.bounds import bounds_failure
from llm_warden.plugins.tools.canonical import NotCanonical, canonical_json
from llm_warden.plugins.tools.config import CompiledTool, PolicyConfig, ToolRegistry
from llm_warden.plugins.tools.policy import permission_failure, quote
from llm_warden.plugins.tools.rules import RuleVerdict
from llm_warden.plugins.tools.schemas import validator_failure
from llm_warden.plugins.tools.versions import Deprecation
from llm_warden.proxy.exchange import Decision, Principal, ToolCall
from llm_warden.proxy.tooling import loads_arguments

log = logging.getLogger("warden.tools")

ReadOnlyFor = Callable[[str | None], tuple[bool, str]]
"""``(tenant) -> (read_only, where it comes from)``, e.g. :meth:`~plugins.tools.policy.ModeState.read_only_for`."""

_ARGS_SHOWN = 300


def short(text: str, limit: int = _ARGS_SHOWN) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def describe_failure(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {short(text[0], 200) if text else ''}"


@dataclass(frozen=True, slots=True)
class Passed:
    """A call that passed every check of the policy alone."""

    tool: CompiledTool | None
    """``None``: an undeclared tool let through by ``unknown_tools = "allow"``."""
    args: dict[str, Any]
    canonical: str
    """The canonical JSON of ``args`` (see :mod:`plugins.tools.canonical`)."""
    allowed_by: str | None = None
    """The argument rule that allowed the call (``tools[1].rules.small_refund``), if the tool has rules."""
    deprecation: Deprecation | None = None
    """Set when the tool's version is deprecated (its sunset is still ahead)."""


def parse_arguments(call: ToolCall) -> tuple[dict[str, Any] | None, str | None]:
    """The call's arguments as an object, or why they are not one."""
    if isinstance(call.parsed, dict):
        return call.parsed, None
    if call.parse_error is not None:
        return None, call.parse_error
    raw = call.arguments.strip() if call.arguments else ""
    if not raw:
        return None, "the arguments are empty"
    return loads_arguments(raw)


def unvalidatable(rule: str, name: str, error: BaseException, max_depth: int) -> Decision:
    """A repair for arguments that could not be checked at all (the check failed, not a rule)."""
    if isinstance(error, NotCanonical):
        # Its messages are fixed texts that never quote the arguments.
        what = f"are not plain JSON ({error})"
    else:
        what = f"could not be checked ({type(error).__name__})"
    return Decision.repair(
        rule,
        f"the arguments for {quote(name)} {what}. "
        f"Call {quote(name)} again with plain JSON arguments that follow its schema: finite numbers "
        f"of ordinary size, at most {max_depth} levels of nesting.",
        error=type(error).__name__,
    )


def rule_refusal(name: str, verdict: RuleVerdict, tool: CompiledTool) -> Decision:
    """The denial of a call the argument rules refused."""
    if verdict.failed is not None:
        return Decision.deny(
            verdict.rule,
            f"the policy rule {verdict.name!r} of tool {quote(name)} could not be evaluated on these arguments, so the call "
            "is refused. It was NOT executed; tell the user it is not permitted.",
            error=verdict.failed,
        )
    if verdict.message:
        why = verdict.message
    elif verdict.name == "rules_default":
        assert tool.rules is not None
        allowing = ", ".join(repr(r.spec.name) for r in tool.rules.rules if r.spec.decision == "allow")
        why = f"no policy rule allows this call to {quote(name)} with these arguments" + (f" (allowing rules: {allowing})" if allowing else "")
    else:
        why = f"the policy rule {verdict.name!r} forbids this call to {quote(name)} with these arguments"
    return Decision.deny(verdict.rule, f"{why}. It was NOT executed. Do not retry it to get around the rule; tell the user it is not permitted.")


def check_call(
    registry: ToolRegistry,
    policy: PolicyConfig,
    principal: Principal | None,
    call: ToolCall,
    read_only_for: ReadOnlyFor,
    now: float,
    server: str | None = None,
) -> Decision | Passed:
    """Checks 1–8 of a call (unknown, retired, permission, read-only, bounds, JSON, schema, argument rules).

    ``server`` names the MCP server whose tool is called (``None``: a chat
    function); an MCP tool without an entry is always unknown.

    Never raises for bad input: a validator that fails is a decision too.
    """
    name = call.name
    tool = registry.resolve(name, server)
    dep: Deprecation | None = None
    if tool is None:
        # An MCP server's tool list is not the operator's policy: its undeclared tools are refused whatever unknown_tools says.
        if policy.unknown_tools == "deny" or server:
            return Decision.deny(
                "policy.unknown_tools",
                f"there is no tool named {quote(name)} available to you. Do not call it again; use only the tools you were given.",
            )
    else:
        dep = tool.deprecation
        if dep is not None and dep.retired(now):
            return Decision.deny(f"{tool.key}.deprecated", dep.refusal(), deprecation=dep.details(now))
        denied = permission_failure(tool, principal)
        if denied is not None:
            rule, why = denied
            return Decision.deny(
                rule,
                f"you may not use tool {quote(name)} for this user: {why}. Do not call it again; tell the user it is not permitted.",
            )
    if tool is None or tool.spec.effect == "write":
        read_only, where = read_only_for(principal.tenant if principal is not None else None)
        if read_only:
            return Decision.deny(
                "policy.read_only",
                f"tool {quote(name)} is a write tool and read-only mode is on {where}. "
                "Nothing was changed. Do not call it again; tell the user that changes are currently disabled.",
            )
    bounds = bounds_failure(call.arguments or "", policy.max_argument_depth, policy.max_argument_bytes)
    if bounds is not None:
        return Decision.repair(bounds.rule, bounds.explain(quote(name)), limit=bounds.limit, found=bounds.actual)
    args, parse_error = parse_arguments(call)
    if args is None:
        return Decision.repair(
            "tool_call.json",
            f"arguments for {quote(name)} are not a valid JSON object ({short(parse_error or '', 200)}); "
            f"call {quote(name)} again with a single JSON object as its arguments.",
        )
    allowed_by: str | None = None
    if tool is not None:
        try:
            errors = tool.schema_errors(args)
        except BaseException as e:
            if not validator_failure(e):
                raise
            log.warning("schema validation of a %s call failed: %s", quote(name), describe_failure(e))
            return unvalidatable(f"{tool.key}.schema", name, e, policy.max_argument_depth)
        if errors:
            return Decision.repair(
                f"{tool.key}.schema",
                f"arguments invalid for {quote(name)}: " + "; ".join(errors) + f"; fix and call {quote(name)} again.",
                errors=errors,
            )
        if tool.rules is not None:
            verdict = tool.rules.decide(args, principal)
            if verdict.failed is not None:
                log.warning("rule %s of a %s call could not be evaluated (%s); the call is refused", verdict.rule, quote(name), verdict.failed)
            if not verdict.allow:
                return rule_refusal(name, verdict, tool)
            allowed_by = verdict.rule
    try:
        canonical = canonical_json(args)
    except NotCanonical as e:
        return unvalidatable("tool_call.json", name, e, policy.max_argument_depth)
    return Passed(tool, args, canonical, allowed_by, dep)


def annotate(decision: Decision, passed: Passed | None, tool: CompiledTool | None, now: float) -> Decision:
    """The decision with what the audit record should know: the contract of a versioned tool,
    the argument rule that allowed the call (when another rule decided), and a deprecation."""
    if tool is None:
        return decision
    extra: dict[str, Any] = {}
    if tool.spec.version is not None:
        extra["contract"] = tool.contract
    if passed is not None and passed.allowed_by is not None and passed.allowed_by != decision.rule:
        extra["argument_rule"] = passed.allowed_by
    dep = tool.deprecation
    if dep is not None and (decision.details is None or "deprecation" not in decision.details):
        extra["deprecation"] = dep.details(now)
    if not extra:
        return decision
    return Decision(decision.kind, decision.rule, decision.reason, decision.approval_id, {**(decision.details or {}), **extra})


def offer_failure(
    registry: ToolRegistry,
    policy: PolicyConfig,
    name: str,
    principal: Principal | None,
    read_only: tuple[bool, str],
    now: float,
    server: str | None = None,
) -> tuple[str, str] | None:
    """``(rule, why)`` when ``name`` may not be offered to this principal now, else ``None``.

    The request phase removes such tools from ``tools``; an MCP ``tools/list``
    leaves them out.  ``read_only`` is ``(on, where)`` for the principal's tenant.
    """
    is_read_only, where = read_only
    tool = registry.resolve(name, server)
    if tool is None:
        if policy.unknown_tools == "deny" or server:
            return "policy.unknown_tools", "it is not declared in the tool registry"
        if is_read_only:
            return "policy.read_only", f"undeclared tools count as write tools and read-only mode is on {where}"
        return None
    dep = tool.deprecation
    if dep is not None and dep.retired(now):
        return f"{tool.key}.deprecated", dep.refusal()
    denied = permission_failure(tool, principal)
    if denied is not None:
        return denied
    if tool.spec.effect == "write" and is_read_only:
        return "policy.read_only", f"it is a write tool and read-only mode is on {where}"
    return None


class ToolPolicy:
    """The tool policy as one object: resolve a tool by name (and MCP server), fence offers, check calls.

    It holds no per-request state and does no I/O: duplicate mutations, rate
    limits and approvals are the judge's (:class:`~plugins.tools.judge.ToolJudge`).
    ``clock`` returns UTC seconds since the epoch (tests inject a fixed one).
    """

    def __init__(self, registry: ToolRegistry, policy: PolicyConfig, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.policy = policy
        self.clock = clock

    def resolve(self, name: str, server: str | None = None) -> CompiledTool | None:
        """The entry governing ``name`` (a chat function, or ``server``'s MCP tool)."""
        return self.registry.resolve(name, server)

    def offer_failure(self, name: str, principal: Principal | None, read_only: tuple[bool, str], server: str | None = None) -> tuple[str, str] | None:
        """See :func:`offer_failure`."""
        return offer_failure(self.registry, self.policy, name, principal, read_only, self.clock(), server)

    def check(self, principal: Principal | None, call: ToolCall, read_only_for: ReadOnlyFor, server: str | None = None) -> Decision | Passed:
        """See :func:`check_call`."""
        return check_call(self.registry, self.policy, principal, call, read_only_for, self.clock(), server)

    def verdict(self, principal: Principal | None, call: ToolCall, read_only_for: ReadOnlyFor, server: str | None = None) -> Decision:
        """The decision the policy alone gives: a refusal, ``hold`` when a human must approve, else ``allow``.

        What ``warden policy test`` compares; the judge adds duplicate
        mutation, rate limits and the approval store on top.
        """
        now = self.clock()
        checked = check_call(self.registry, self.policy, principal, call, read_only_for, now, server)
        tool = self.registry.resolve(call.name, server)
        if isinstance(checked, Decision):
            return annotate(checked, None, tool, now)
        if checked.tool is None:
            return Decision.allow("policy.unknown_tools")
        try:
            held = checked.tool.needs_approval(checked.args)
        except BaseException as e:
            if not validator_failure(e):
                raise
            held = True
        if held:
            rule = f"{checked.tool.key}.approval_if" if checked.tool.approval_validator is not None else f"{checked.tool.key}.approval"
            decision = Decision("hold", rule, f"tool {quote(call.name)} needs a human approval for this call.")
        else:
            decision = Decision.allow(checked.allowed_by or checked.tool.key)
        return annotate(decision, checked, checked.tool, now)
