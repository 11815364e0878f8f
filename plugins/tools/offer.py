"""What the MCP gateway may show of a tool (``tools/list``): the same policy, permissions and mode as a call.

An MCP tool is governed by the ``[[tools]]`` entry with ``server = "crm"``
whose (versioned) function name is the tool's name; it is resolved through
:class:`~plugins.tools.check.ToolPolicy`, like every call.  A tool without
an entry is hidden whatever ``[policy] unknown_tools`` says (an upstream
server's tool list is not the operator's policy).
"""

from __future__ import annotations

from llm_warden.plugins.tools.check import ToolPolicy
from llm_warden.plugins.tools.policy import ModeState
from llm_warden.proxy.exchange import Principal, ToolOffer


def offer(policy: ToolPolicy, mode: ModeState, principal: Principal | None, name: str, server: str) -> ToolOffer:
    """Whether MCP server ``server``'s tool ``name`` may be shown to ``principal`` now, and as what."""
    read_only = mode.read_only_for(principal.tenant if principal is not None else None)
    failed = policy.offer_failure(name, principal, read_only, server)
    tool = policy.resolve(name, server)
    dep = None if tool is None else tool.deprecation
    # The note heads the description the caller's model reads, as in a chat request.
    deprecation = None if dep is None else {**dep.details(policy.clock()), "note": dep.model_note()}
    if failed is not None:
        return ToolOffer(name, False, failed[0], failed[1], deprecation=deprecation)
    assert tool is not None, "an MCP tool without an entry is never offered"
    return ToolOffer(
        name, True, tool.key, effect=tool.spec.effect, schema=tool.spec.schema, description=tool.spec.description, deprecation=deprecation
    )
