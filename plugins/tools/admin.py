"""Admin API of the tools plugin (mounted on the admin listener by the core).

The core authenticates the caller and stores the reviewer's ``Principal`` on
the request (read with ``proxy.admin.admin_principal``) before these handlers run.  Every state change
is recorded as an admin action in the audit log, with who made it.

- ``GET  /admin/mode`` — the read-only switch (global and per tenant)
- ``PUT  /admin/mode`` — ``{"read_only": true|false|null, "tenant": "acme"?}``
- ``GET  /admin/approvals?status=pending|approved|denied|consumed|expired|all``
- ``GET  /admin/approvals/{id}``
- ``POST /admin/approvals/{id}/approve`` and ``/deny`` — ``{"comment": "..."}``

An admin whose token names a tenant manages that tenant only: it sees and
decides that tenant's approvals (another tenant's approval is a 404), sees
the global mode and its own tenant's, and may set its own tenant's mode only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

import orjson
from aiohttp import web

from llm_warden.plugins.tools.store import LIST_STATUSES
from llm_warden.proxy.admin import admin_principal, admin_tenant, require_all_tenants
from llm_warden.proxy.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from llm_warden.proxy.exchange import Principal

if TYPE_CHECKING:
    from llm_warden.plugins.tools.plugin import ToolsPlugin

MAX_COMMENT = 2000


def _reviewer(request: web.Request) -> dict[str, Any]:
    """The authenticated admin (set by the core's admin middleware), as recorded."""
    try:
        principal = admin_principal(request)
    except KeyError:
        principal = None
    if not isinstance(principal, Principal):
        raise Unauthorized("admin identity missing", rule="admin.auth")
    return principal.summary()


def _same_person(reviewer: dict[str, Any], requester: dict[str, Any]) -> bool:
    """Whether the reviewer is the principal whose call is held (same tenant and subject)."""
    subject = reviewer.get("subject")
    return bool(subject) and subject == requester.get("subject") and reviewer.get("tenant") == requester.get("tenant")


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON", rule="admin.body") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", rule="admin.body")
    return data


def _visible(request: web.Request, tenant: str) -> bool:
    """Whether this admin manages ``tenant`` (another tenant's approval is answered like a missing one)."""
    own = admin_tenant(request)
    return own is None or own == tenant


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class ToolsAdmin:
    """Handlers bound to a running :class:`ToolsPlugin`."""

    def __init__(self, plugin: ToolsPlugin) -> None:
        self.plugin = plugin

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", "/admin/mode", self.get_mode),
            ("PUT", "/admin/mode", self.put_mode),
            ("GET", "/admin/approvals", self.list_approvals),
            ("GET", "/admin/approvals/{id}", self.get_approval),
            ("POST", "/admin/approvals/{id}/approve", self.approve),
            ("POST", "/admin/approvals/{id}/deny", self.deny),
        ]

    async def get_mode(self, request: web.Request) -> web.StreamResponse:
        """The current read-only mode."""
        _reviewer(request)
        return _json(self._mode_view(request))

    def _mode_view(self, request: web.Request) -> dict[str, Any]:
        """The mode as this admin may see it (a tenant admin: the global setting and its own tenant)."""
        view = self.plugin.mode.to_json()
        tenant = admin_tenant(request)
        if tenant is not None:
            view["tenants"] = {k: v for k, v in view["tenants"].items() if k == tenant}
        return view

    async def put_mode(self, request: web.Request) -> web.StreamResponse:
        """Set (or, with ``read_only: null``, clear) the global or a tenant's read-only mode."""
        actor = _reviewer(request)
        data = await _json_object(request)
        unknown = set(data) - {"read_only", "tenant"}
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}", rule="admin.mode")
        if "read_only" not in data:
            raise BadRequest("'read_only' is required (true, false, or null to clear)", param="read_only", rule="admin.mode")
        read_only = data["read_only"]
        if read_only is not None and not isinstance(read_only, bool):
            raise BadRequest("'read_only' must be true, false or null", param="read_only", rule="admin.mode")
        tenant = data.get("tenant")
        if tenant is not None and (not isinstance(tenant, str) or not tenant or len(tenant) > 256):
            raise BadRequest("'tenant' must be a non-empty string", param="tenant", rule="admin.mode")
        own = admin_tenant(request)
        if own is not None and tenant != own:
            if tenant is None:
                require_all_tenants(request, "the global read-only mode")
            raise Forbidden(f"this admin may manage tenant {own!r} only", param="tenant", rule="admin.tenant")
        before = self.plugin.mode.read_only_for(tenant)[0]
        await self.plugin.set_mode(tenant, read_only, actor)
        after = self.plugin.mode.read_only_for(tenant)[0]
        await self.plugin.record_admin_action(
            "tools.mode",
            actor,
            {"tenant": tenant, "read_only": read_only, "effective_before": before, "effective_after": after},
        )
        return _json(self._mode_view(request))

    async def list_approvals(self, request: web.Request) -> web.StreamResponse:
        """Approvals by status (default ``pending``), newest first."""
        _reviewer(request)
        status = request.query.get("status", "pending")
        if status not in LIST_STATUSES:
            raise BadRequest(f"status must be one of {', '.join(LIST_STATUSES)}", param="status", rule="admin.approvals")
        limit_text = request.query.get("limit", "200")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= 1000:
            raise BadRequest("limit must be an integer from 1 to 1000", param="limit", rule="admin.approvals")
        now = time.time()
        items = await self.plugin.store_required().list(status, int(limit_text), now, tenant=admin_tenant(request))
        return _json({"object": "list", "data": [a.to_json(now) for a in items]})

    async def get_approval(self, request: web.Request) -> web.StreamResponse:
        """One approval."""
        _reviewer(request)
        apr = await self.plugin.store_required().get(request.match_info["id"])
        if apr is None or not _visible(request, apr.tenant):
            raise NotFound(f"approval {request.match_info['id']!r} not found", rule="admin.approvals")
        return _json(apr.to_json(time.time()))

    async def approve(self, request: web.Request) -> web.StreamResponse:
        """Grant a pending approval: the identical call may then pass once, within the TTL."""
        return await self._decide(request, "approved")

    async def deny(self, request: web.Request) -> web.StreamResponse:
        """Refuse a pending approval; the model is told when it retries."""
        return await self._decide(request, "denied")

    async def _decide(self, request: web.Request, verdict: Literal["approved", "denied"]) -> web.StreamResponse:
        actor = _reviewer(request)
        data = await _json_object(request)
        unknown = set(data) - {"comment"}
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}", rule="admin.approvals")
        comment = data.get("comment", "")
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
            raise BadRequest(f"'comment' must be a string of at most {MAX_COMMENT} characters", param="comment", rule="admin.approvals")
        approval_id = request.match_info["id"]
        store = self.plugin.store_required()
        current = await store.get(approval_id)
        if current is None or not _visible(request, current.tenant):
            raise NotFound(f"approval {approval_id!r} not found", rule="admin.approvals")
        if verdict == "approved" and not self.plugin.policy.self_approval and _same_person(actor, current.principal):
            raise Forbidden(
                "a call cannot be approved by the person who asked for it ([policy] self_approval = false)", rule="tools.approval.self"
            )
        ok = await store.decide(approval_id, verdict, actor, comment, self.plugin.policy.approval_ttl_s)
        now = time.time()
        apr = await store.get(approval_id)
        if apr is None:
            raise NotFound(f"approval {approval_id!r} not found", rule="admin.approvals")
        if not ok:
            raise Conflict(
                f"approval {approval_id} is {apr.effective_status(now)}; only a pending approval can be decided", rule="admin.approvals"
            )
        await self.plugin.refresh_pending()
        await self.plugin.record_admin_action(
            f"tools.approval.{'approve' if verdict == 'approved' else 'deny'}",
            actor,
            {
                "approval_id": apr.id,
                "tool": apr.tool,
                "arguments": apr.arguments,
                "fingerprint": apr.fingerprint,
                "principal": apr.principal,
                "request_id": apr.request_id,
                "comment": comment,
                "expires": apr.expires,
            },
        )
        return _json(apr.to_json(now))
