"""The response phase: judge one complete tool call the model emitted.

Checks run cheapest and most final first, so a corrective turn is never spent
fixing the arguments of a call that would be refused anyway:

1. unknown tool (``policy.unknown_tools``)
2. permission (``tools[i].allow_tenants`` / ``allow_groups`` / ``allow_scopes``)
3. read-only mode for write tools (``policy.read_only``)
4. size and nesting depth of the raw arguments text (``tools.argument_bytes``,
   ``tools.argument_depth``; ``[policy] max_argument_bytes`` / ``max_argument_depth``),
   before anything parses or walks them
5. JSON syntax of the arguments (``tool_call.json``)
6. the registry schema, every error with its JSON path (``tools[i].schema``)
7. duplicate mutation: the same write call already has a result in the
   conversation, or appears twice in one response (``tools.duplicate``)
8. per-principal rate limit (``tools[i].rate_limit``)
9. human approval (``tools[i].approval`` / ``tools[i].approval_if``)

Every ``reason`` is written for the model to read and act on.  Arguments the
validator cannot handle, whatever the reason, are sent back for repair: a
hostile call never becomes a server error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from plugins.tools.bounds import bounds_failure
from plugins.tools.canonical import NotCanonical, call_key, canonical_json, fingerprint
from plugins.tools.config import CompiledTool, PolicyConfig, ToolRegistry
from plugins.tools.policy import ModeState, permission_failure, quote
from plugins.tools.store import StateBackendDown, ToolStore
from proxy.exchange import Decision, Exchange, ToolCall
from proxy.gcra import MemoryGCRA
from proxy.tooling import loads_arguments

log = logging.getLogger("warden.tools")

_ARGS_SHOWN = 300


@dataclass
class ExchangeState:
    """What the tools plugin remembers about one exchange across its turns."""

    executed: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Write calls with a result in the application's history (see ``scan_history``)."""

    turn: int = -1
    turn_allowed: dict[str, Decision] = field(default_factory=dict)
    """Calls allowed in the current turn, by ``call_key``."""
    earlier_allowed: dict[str, Decision] = field(default_factory=dict)
    """Calls allowed in an earlier turn of this exchange.  That turn was not
    relayed (a sibling call was refused and a corrective turn followed), so
    re-issuing the call does not charge the rate limit or an approval again."""

    def enter_turn(self, turn: int) -> None:
        if turn != self.turn:
            self.earlier_allowed.update(self.turn_allowed)
            self.turn_allowed = {}
            self.turn = turn


def _short(text: str, limit: int = _ARGS_SHOWN) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _validator_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failure of the check itself, to be turned into a decision.

    Every ``Exception`` is; so is the ``PanicException`` a Rust extension
    (jsonschema-rs) raises when it panics, which derives from
    ``BaseException``.  Cancellation and interpreter exits are not.
    """
    return isinstance(error, Exception) or type(error).__name__ == "PanicException"


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {_short(text[0], 200) if text else ''}"


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


class ToolJudge:
    """Judges tool calls against the registry, the mode, limits and approvals."""

    def __init__(self, registry: ToolRegistry, policy: PolicyConfig, mode: ModeState, store: ToolStore | None) -> None:
        self.registry = registry
        self.policy = policy
        self.mode = mode
        self.store = store
        self.limiter = MemoryGCRA()
        self._approval_lock = asyncio.Lock()

    def is_write(self, name: str) -> bool:
        """Write tools, and undeclared ones (their effect is unknown: fail closed)."""
        tool = self.registry.get(name)
        return tool is None or tool.spec.effect == "write"

    async def judge(self, ex: Exchange, call: ToolCall, st: ExchangeState) -> Decision:
        """The verdict on one call; never raises for bad input."""
        st.enter_turn(ex.turns[-1].index if ex.turns else 0)
        name = call.name
        tool = self.registry.get(name)
        principal = ex.principal
        tenant = principal.tenant if principal is not None else None
        if tool is None:
            if self.policy.unknown_tools == "deny":
                return Decision.deny(
                    "policy.unknown_tools",
                    f"there is no tool named {quote(name)} available to you. "
                    "Do not call it again; use only the tools you were given.",
                )
        else:
            denied = permission_failure(tool, principal)
            if denied is not None:
                rule, why = denied
                return Decision.deny(
                    rule,
                    f"you may not use tool {quote(name)} for this user: {why}. "
                    "Do not call it again; tell the user it is not permitted.",
                )
        writes = tool is None or tool.spec.effect == "write"
        if writes:
            read_only, where = self.mode.read_only_for(tenant)
            if read_only:
                return Decision.deny(
                    "policy.read_only",
                    f"tool {quote(name)} is a write tool and read-only mode is on {where}. "
                    "Nothing was changed. Do not call it again; tell the user that changes are currently disabled.",
                )
        bounds = bounds_failure(call.arguments or "", self.policy.max_argument_depth, self.policy.max_argument_bytes)
        if bounds is not None:
            return Decision.repair(bounds.rule, bounds.explain(quote(name)), limit=bounds.limit, found=bounds.actual)
        args, parse_error = parse_arguments(call)
        if args is None:
            return Decision.repair(
                "tool_call.json",
                f"arguments for {quote(name)} are not a valid JSON object ({_short(parse_error or '', 200)}); "
                f"call {quote(name)} again with a single JSON object as its arguments.",
            )
        if tool is not None:
            try:
                errors = tool.schema_errors(args)
            except BaseException as e:
                if not _validator_failure(e):
                    raise
                log.warning("schema validation of a %s call failed: %s", quote(name), _describe(e))
                return self._unvalidatable(f"{tool.key}.schema", name, e)
            if errors:
                return Decision.repair(
                    f"{tool.key}.schema",
                    f"arguments invalid for {quote(name)}: " + "; ".join(errors) + f"; fix and call {quote(name)} again.",
                    errors=errors,
                )
        try:
            canonical = canonical_json(args)
        except NotCanonical as e:
            return self._unvalidatable("tool_call.json", name, e)
        key = call_key(name, canonical)
        if writes:
            done = st.executed.get(key)
            if done is not None:
                return Decision.deny(
                    "tools.duplicate",
                    f"this exact call {quote(name)} {_short(canonical)} was already executed earlier in this conversation "
                    f"(call id {done['call_id']}) and returned: {done['result']!r}. Do not repeat it; use that result.",
                    earlier_call_id=done["call_id"],
                )
            if key in st.turn_allowed:
                return Decision.deny(
                    "tools.duplicate",
                    f"you issued the same call {quote(name)} {_short(canonical)} twice in one response; "
                    "it may be executed only once.",
                )
        earlier = st.earlier_allowed.get(key)
        if earlier is not None:
            st.turn_allowed[key] = earlier
            return earlier
        if tool is None:
            decision = Decision.allow("policy.unknown_tools")
        else:
            decision = await self._judge_declared(ex, tool, args, canonical, tenant)
        if decision.kind == "allow":
            st.turn_allowed[key] = decision
        return decision

    def _unvalidatable(self, rule: str, name: str, error: BaseException) -> Decision:
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
            f"of ordinary size, at most {self.policy.max_argument_depth} levels of nesting.",
            error=type(error).__name__,
        )

    async def _judge_declared(self, ex: Exchange, tool: CompiledTool, args: dict[str, Any], canonical: str, tenant: str | None) -> Decision:
        name = tool.spec.name
        principal = ex.principal
        subject = principal.subject if principal is not None else ""
        if tool.rate is not None:
            res = self.limiter.check(f"tools\x00{name}\x00{tenant or ''}\x00{subject}", tool.rate)
            if not res.allowed:
                rule = f"{tool.key}.rate_limit"
                return Decision.deny(
                    rule,
                    f"tool {quote(name)} may be called at most {tool.rate} by this user and that limit is reached; "
                    f"it can be called again in {res.retry_after_s:.0f} s. Tell the user to try again later.",
                    retry_after_s=res.retry_after_s,
                )
        try:
            needs_approval = tool.needs_approval(args)
        except BaseException as e:
            if not _validator_failure(e):
                raise
            # Whether approval_if matches is unknown: a human decides (fail closed).
            log.warning("approval_if of tool %s failed on a call, approval required: %s", name, _describe(e))
            needs_approval = True
        if needs_approval:
            return await self._approval(ex, tool, canonical, tenant or "", subject)
        return Decision.allow(tool.key)

    async def _approval(self, ex: Exchange, tool: CompiledTool, canonical: str, tenant: str, subject: str) -> Decision:
        name = tool.spec.name
        rule = f"{tool.key}.approval_if" if tool.approval_validator is not None else f"{tool.key}.approval"
        if self.store is None:
            return Decision.deny(rule, f"tool {quote(name)} needs a human approval and no approval store is running; it was NOT executed.")
        fp = fingerprint(tenant, subject, name, canonical)
        principal = ex.principal.summary() if ex.principal is not None else {"tenant": tenant, "subject": subject}
        try:
            async with self._approval_lock:
                now = time.time()
                latest = await self.store.latest_for(fp)
                note = ""
                if latest is not None:
                    status = latest.effective_status(now)
                    if status == "approved" and await self.store.consume(latest.id, ex.request_id, now):
                        return Decision("allow", rule, approval_id=latest.id, details={"approval": "consumed"})
                    if status == "pending":
                        return Decision(
                            "hold",
                            rule,
                            f"Approval {latest.id} for {quote(name)} {_short(canonical)} is still pending with a human reviewer; "
                            "the call was NOT executed. Tell the user it is awaiting approval and do not call it again until "
                            "they say it was approved.",
                            approval_id=latest.id,
                            details={"approval": "pending"},
                        )
                    if status == "denied" and latest.expires > now:
                        comment = f" with the comment {latest.comment!r}" if latest.comment else ""
                        return Decision(
                            "deny",
                            rule,
                            f"a human reviewer denied approval {latest.id} for this call{comment}. It was NOT executed. "
                            "Do not retry it; tell the user it was denied.",
                            approval_id=latest.id,
                        )
                    if status == "expired":
                        note = f" (the earlier approval {latest.id} expired unused)"
                apr = await self.store.create(
                    fingerprint=fp,
                    principal=principal,
                    tool=name,
                    arguments=canonical,
                    request_id=ex.request_id,
                    ttl_s=self.policy.approval_ttl_s,
                    now=now,
                )
        except StateBackendDown:
            return Decision.deny(
                "policy.state_backend",
                f"tool {quote(name)} needs a human approval and the approval store is unreachable. "
                "It was NOT executed; tell the user to try again later.",
            )
        except Exception:
            log.exception("approval store failed for tool %s", name)
            return Decision.deny(
                "tools.approval_store",
                f"tool {quote(name)} needs a human approval and the approval could not be recorded. "
                "It was NOT executed; tell the user to try again later.",
            )
        return Decision(
            "hold",
            rule,
            f"Approval {apr.id} was requested from a human reviewer for {quote(name)} {_short(canonical)}{note}; "
            "the call was NOT executed. Tell the user it is pending approval (id "
            f"{apr.id}) and do not call it again until they say it was approved.",
            approval_id=apr.id,
            details={"approval": "requested", "fingerprint": fp, "expires": apr.expires},
        )
