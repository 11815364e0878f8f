"""Who may use a tool, and the runtime read-only switch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_warden.plugins.tools.config import CompiledTool
from llm_warden.plugins.tools.store import ModeSetting
from llm_warden.proxy.exchange import Principal


def quote(name: str, limit: int = 64) -> str:
    """A tool name as shown in messages: quoted, control characters escaped, bounded."""
    text = name if len(name) <= limit else name[:limit] + "..."
    return repr(text)


def permission_failure(tool: CompiledTool, principal: Principal | None) -> tuple[str, str] | None:
    """``(rule, explanation)`` when the principal may not use the tool, else ``None``.

    Each non-empty ``allow_*`` list is a requirement; within a list, any
    entry suffices.  A request without a principal matches no list.
    """
    spec = tool.spec
    if spec.allow_tenants and (principal is None or principal.tenant not in spec.allow_tenants):
        return f"{tool.key}.allow_tenants", f"tenant {principal.tenant if principal else '(none)'!r} is not among the tenants allowed"
    if spec.allow_groups and (principal is None or not principal.groups.intersection(spec.allow_groups)):
        return f"{tool.key}.allow_groups", f"it requires membership in one of the groups {', '.join(spec.allow_groups)}"
    if spec.allow_scopes and (principal is None or not principal.scopes.intersection(spec.allow_scopes)):
        return f"{tool.key}.allow_scopes", f"it requires one of the scopes {', '.join(spec.allow_scopes)}"
    return None


@dataclass
class ModeState:
    """Read-only mode as the hot path sees it (in memory; persisted by the store).

    The global setting is the default for every tenant that has no setting of
    its own; a tenant setting overrides it for that tenant.  With no persisted
    global setting, ``[policy] read_only`` is the global default.
    """

    config_default: bool
    global_setting: ModeSetting | None = None
    tenants: dict[str, ModeSetting] = field(default_factory=dict)
    loaded: bool = True
    """False while the stored mode was never read (state backend unreachable
    since start): every tenant is then read-only (fail closed)."""

    @property
    def global_read_only(self) -> bool:
        if not self.loaded:
            return True
        return self.config_default if self.global_setting is None else self.global_setting.read_only

    def read_only_for(self, tenant: str | None) -> tuple[bool, str]:
        """``(read_only, where it comes from)`` for a tenant."""
        if not self.loaded:
            return True, "globally (the state backend is unreachable and the stored mode was never loaded)"
        if tenant is not None:
            t = self.tenants.get(tenant)
            if t is not None:
                return t.read_only, f"for tenant {tenant!r}"
        if self.global_setting is None:
            return self.config_default, "globally (configured default)"
        return self.global_setting.read_only, "globally"

    def to_json(self) -> dict[str, Any]:
        """The mode as shown by ``GET /admin/mode``."""
        return {
            "read_only": self.global_read_only,
            "source": "unavailable" if not self.loaded else "config" if self.global_setting is None else "admin",
            "config_default": self.config_default,
            "updated": None if self.global_setting is None else self.global_setting.updated,
            "actor": None if self.global_setting is None else self.global_setting.actor,
            "tenants": {
                name: {"read_only": s.read_only, "updated": s.updated, "actor": s.actor} for name, s in sorted(self.tenants.items())
            },
        }
