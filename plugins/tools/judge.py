"""The response phase: judge one complete tool call the model emitted.

Checks run cheapest and most final first, so a corrective turn is never spent
fixing the arguments of a call that would be refused anyway:

1. unknown tool (``policy.unknown_tools``)
2. a retired version: its ``deprecated`` sunset has passed (``tools[i].deprecated``)
3. permission (``tools[i].allow_tenants`` / ``allow_groups`` / ``allow_scopes``)
4. read-only mode for write tools (``policy.read_only``)
5. size and nesting depth of the raw arguments text (``tools.argument_bytes``,
   ``tools.argument_depth``; ``[policy] max_argument_bytes`` / ``max_argument_depth``),
   before anything parses or walks them
6. JSON syntax of the arguments (``tool_call.json``)
7. the registry schema, every error with its JSON path (``tools[i].schema``)
8. argument rules, first match wins (``tools[i].rules.<name>`` / ``tools[i].rules_default``)
9. duplicate mutation: the same write call already has a result in the
   conversation, or appears twice in one response (``tools.duplicate``)
10. per-principal rate limit (``tools[i].rate_limit``)
11. human approval (``tools[i].approval`` / ``tools[i].approval_if``)

Checks 1–8 depend on the policy alone (:func:`plugins.tools.check.check_call`,
shared with ``warden policy test``); 9–11 on state.  Every ``reason`` is
written for the model to read and act on.  Arguments the validator cannot
handle, whatever the reason, are sent back for repair: a hostile call never
becomes a server error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm_warden.plugins.tools.canonical import call_key, fingerprint
from llm_warden.plugins.tools.check import Passed, annotate, check_call, describe_failure, short
from llm_warden.plugins.tools.config import CompiledTool, PolicyConfig, ToolRegistry
from llm_warden.plugins.tools.policy import ModeState, quote
from llm_warden.plugins.tools.schemas import validator_failure
from llm_warden.plugins.tools.store import StateBackendDown, ToolStore
from llm_warden.proxy.exchange import Decision, Exchange, ToolCall
from llm_warden.proxy.gcra import MemoryGCRA

log = logging.getLogger("warden.tools")


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

    deprecated_offered: list[str] = field(default_factory=list)
    """``x-warden-deprecation`` entries of the deprecated versions the request offered."""

    def enter_turn(self, turn: int) -> None:
        if turn != self.turn:
            self.earlier_allowed.update(self.turn_allowed)
            self.turn_allowed = {}
            self.turn = turn


class ToolJudge:
    """Judges tool calls against the registry, the mode, limits and approvals."""

    def __init__(
        self, registry: ToolRegistry, policy: PolicyConfig, mode: ModeState, store: ToolStore | None, clock: Callable[[], float] = time.time
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.mode = mode
        self.store = store
        self.clock = clock
        """UTC seconds since the epoch: when deprecated versions retire (tests inject a fixed clock)."""
        self.limiter = MemoryGCRA()
        self._approval_lock = asyncio.Lock()

    def is_write(self, name: str) -> bool:
        """Write tools, and undeclared ones (their effect is unknown: fail closed)."""
        tool = self.registry.get(name)
        return tool is None or tool.spec.effect == "write"

    async def judge(self, ex: Exchange, call: ToolCall, st: ExchangeState, server: str | None = None) -> Decision:
        """The verdict on one call; never raises for bad input.

        ``server`` names the MCP server that serves the tool (``None``: a chat function).
        """
        st.enter_turn(ex.turns[-1].index if ex.turns else 0)
        now = self.clock()
        checked = check_call(self.registry, self.policy, ex.principal, call, self.mode.read_only_for, now, server)
        if isinstance(checked, Decision):
            return annotate(checked, None, self.registry.resolve(call.name, server), now)
        decision = await self._judge_passed(ex, call, checked, st)
        return annotate(decision, checked, checked.tool, now)

    async def _judge_passed(self, ex: Exchange, call: ToolCall, checked: Passed, st: ExchangeState) -> Decision:
        """Checks 9–11 of a call the policy alone lets through."""
        tool, canonical = checked.tool, checked.canonical
        name = call.name
        key = call_key(tool.ref if tool is not None else name, canonical)
        if tool is None or tool.spec.effect == "write":
            done = st.executed.get(key)
            if done is not None:
                return Decision.deny(
                    "tools.duplicate",
                    f"this exact call {quote(name)} {short(canonical)} was already executed earlier in this conversation "
                    f"(call id {done['call_id']}) and returned: {done['result']!r}. Do not repeat it; use that result.",
                    earlier_call_id=done["call_id"],
                )
            if key in st.turn_allowed:
                return Decision.deny(
                    "tools.duplicate",
                    f"you issued the same call {quote(name)} {short(canonical)} twice in one response; "
                    "it may be executed only once.",
                )
        earlier = st.earlier_allowed.get(key)
        if earlier is not None:
            st.turn_allowed[key] = earlier
            return earlier
        principal = ex.principal
        tenant = principal.tenant if principal is not None else None
        if tool is None:
            decision = Decision.allow("policy.unknown_tools")
        else:
            decision = await self._judge_declared(ex, tool, checked, tenant)
        if decision.kind == "allow":
            st.turn_allowed[key] = decision
        return decision

    async def _judge_declared(self, ex: Exchange, tool: CompiledTool, checked: Passed, tenant: str | None) -> Decision:
        name = tool.function
        args, canonical = checked.args, checked.canonical
        principal = ex.principal
        subject = principal.subject if principal is not None else ""
        if tool.rate is not None:
            res = self.limiter.check(f"tools\x00{tool.ref}\x00{tenant or ''}\x00{subject}", tool.rate)
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
            if not validator_failure(e):
                raise
            # Whether approval_if matches is unknown: a human decides (fail closed).
            log.warning("approval_if of tool %s failed on a call, approval required: %s", name, describe_failure(e))
            needs_approval = True
        if needs_approval:
            return await self._approval(ex, tool, canonical, tenant or "", subject)
        return Decision.allow(checked.allowed_by or tool.key)

    async def _approval(self, ex: Exchange, tool: CompiledTool, canonical: str, tenant: str, subject: str) -> Decision:
        name = tool.function
        rule = f"{tool.key}.approval_if" if tool.approval_validator is not None else f"{tool.key}.approval"
        if self.store is None:
            return Decision.deny(rule, f"tool {quote(name)} needs a human approval and no approval store is running; it was NOT executed.")
        fp = fingerprint(tenant, subject, tool.ref, canonical)
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
                            f"Approval {latest.id} for {quote(name)} {short(canonical)} is still pending with a human reviewer; "
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
                    tool=tool.ref,
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
            f"Approval {apr.id} was requested from a human reviewer for {quote(name)} {short(canonical)}{note}; "
            "the call was NOT executed. Tell the user it is pending approval (id "
            f"{apr.id}) and do not call it again until they say it was approved.",
            approval_id=apr.id,
            details={"approval": "requested", "fingerprint": fp, "expires": apr.expires},
        )
