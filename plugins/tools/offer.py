"""What the MCP gateway may show of a tool (``tools/list``): the same registry, permissions and mode as a call.

An MCP tool is governed by the ``[[tools]]`` entry named ``server.tool``
(e.g. ``crm.refund``); one without an entry is hidden whatever
``[policy] unknown_tools`` says (deny by default: an upstream server's tool
list is not the operator's policy).
"""

from __future__ import annotations

from plugins.tools.config import ToolRegistry
from plugins.tools.policy import ModeState, permission_failure
from proxy.exchange import Principal, ToolOffer


def offer(registry: ToolRegistry, mode: ModeState, principal: Principal | None, name: str) -> ToolOffer:
    tool = registry.get(name)
    if tool is None:
        return ToolOffer(name, False, "policy.unknown_tools", "it is not declared in the tool registry")
    denied = permission_failure(tool, principal)
    if denied is not None:
        return ToolOffer(name, False, denied[0], denied[1])
    if tool.spec.effect == "write":
        read_only, where = mode.read_only_for(principal.tenant if principal is not None else None)
        if read_only:
            return ToolOffer(name, False, "policy.read_only", f"it is a write tool and read-only mode is on {where}")
    return ToolOffer(name, True, tool.key, effect=tool.spec.effect, schema=tool.spec.schema, description=tool.spec.description)
