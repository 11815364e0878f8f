"""The approvals inbox and the read-only switch: views over the tools plugin's admin API."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from llm_warden.proxy.admin import admin_tenant
from llm_warden.proxy.audit.record import Projector
from llm_warden.proxy.audit.redact import Redactor
from llm_warden.proxy.console import api_error, error_page, html_response, path_quote, read_form, safe_id, see_other, session_of
from llm_warden.proxy.console.render import SECURITY_HEADERS, csrf_field, duration, esc, page, pretty, when, who
from llm_warden.proxy.secrets import secret_values

if TYPE_CHECKING:
    from llm_warden.proxy.console import Console

MAX_COMMENT = 2000
CONTEXT_MESSAGES = 4
"""How many of the conversation's last messages the inbox shows beside a held call."""


def redactor_for(console: Console) -> Redactor:
    """The audit log's redactor (the store's own when there is one), so arguments read as they are recorded."""
    projector = getattr(console.w.audit, "projector", None)
    if isinstance(projector, Projector):
        return projector.redactor
    cfg = console.w.config
    return Projector.for_audit(cfg.audit, upstream_key=cfg.upstream.api_key, secrets=secret_values(cfg), provider=None).redactor


async def _held_context(console: Console, apr: dict[str, Any]) -> tuple[str | None, list[Any]]:
    """The rule that held the call and the conversation's last messages, from the exchange's audit record."""
    audit = console.w.audit
    rid = apr.get("request_id")
    tenant = (apr.get("principal") or {}).get("tenant")
    if audit is None or not isinstance(rid, str):
        return None, []
    try:
        rec = await audit.find(rid, tenant if isinstance(tenant, str) else None)
    except Exception:
        return None, []
    if rec is None:
        return None, []
    rule = next((c.get("rule") for c in rec.get("tool_calls") or [] if c.get("approval_id") == apr.get("id")), None)
    turns = rec.get("turns") or []
    request = turns[0].get("request") if turns and isinstance(turns[0], dict) else None
    messages = request.get("messages") if isinstance(request, dict) else None
    tail = (
        [m for m in messages if isinstance(m, dict) and m.get("role") != "system"][-CONTEXT_MESSAGES:] if isinstance(messages, list) else []
    )
    return rule if isinstance(rule, str) else None, tail


def _message(m: dict[str, Any]) -> str:
    content = m.get("content")
    text = content if isinstance(content, str) else orjson.dumps(content).decode() if content is not None else ""
    if m.get("tool_calls"):
        text += (
            " [tool calls: " + ", ".join(str((c.get("function") or {}).get("name")) for c in m["tool_calls"] if isinstance(c, dict)) + "]"
        )
    return f'<li><span class="role">{esc(m.get("role"))}</span> {esc(text[:600])}</li>'


def routes(app: web.Application, console: Console) -> None:
    redactor = redactor_for(console)

    async def _read(request: web.Request, path: str, title: str, active: str) -> tuple[Any, web.Response | None]:
        """A tools admin API read, or the page to answer instead (plugin not enabled, or the API refused)."""
        status, data = await console.api.call(request, "GET", path)
        if status == 404:
            note = f'<p class="flash warn">The tools plugin is not enabled on this Warden: there is no {esc(title.lower())} page.</p>'
            return None, html_response(page(title, note, session_of(request), active))
        if status != 200:
            return None, error_page(status, title, api_error(data), session_of(request))
        return data, None

    async def approvals(request: web.Request) -> web.StreamResponse:
        session = session_of(request)
        data, refusal = await _read(request, "/admin/approvals?status=pending&limit=200", "Approvals", "approvals")
        if refusal is not None:
            return refusal
        _, recent = await console.api.call(request, "GET", "/admin/approvals?status=all&limit=20")
        now = time.time()
        items = []
        for apr in data["data"]:
            rule, context = await _held_context(console, apr)
            args = redactor.value(apr.get("arguments"), {})
            aid = str(apr["id"])
            q = path_quote(aid)
            convo = (
                f'<ol class="context">{"".join(_message(m) for m in context)}</ol>'
                if context
                else '<p class="hint">No conversation in the audit log.</p>'
            )
            forms = "".join(
                f'<form method="post" action="/console/approvals/{q}/{verb}" class="decide">{csrf_field(session)}'
                f'<label for="c-{verb}-{esc(aid)}">Reason ({label.lower()})</label>'
                f'<input id="c-{verb}-{esc(aid)}" name="comment" maxlength="{MAX_COMMENT}" {"required" if verb == "deny" else ""}>'
                f'<button type="submit" class="{verb}">{label}</button></form>'
                for verb, label in (("approve", "Approve"), ("deny", "Deny"))
            )
            items.append(
                f'<article class="card approval" data-approval="{esc(aid)}" aria-labelledby="h-{esc(aid)}">'
                f'<h2 id="h-{esc(aid)}"><code>{esc(apr.get("tool"))}</code> for {who(apr.get("principal"))}</h2>'
                '<dl class="facts">'
                f"<dt>Approval</dt><dd><code>{esc(aid)}</code></dd>"
                f"<dt>Held by rule</dt><dd><code>{esc(rule or 'tools.approval')}</code></dd>"
                f'<dt>Request</dt><dd><a href="/console/audit/exchange/{path_quote(str(apr.get("request_id")))}">{esc(apr.get("request_id"))}</a></dd>'
                f"<dt>Requested</dt><dd>{when(apr.get('created'))}</dd>"
                f'<dt>Time left</dt><dd><span class="countdown" data-expires="{esc(apr.get("expires"))}">{duration(float(apr.get("expires") or now) - now)}</span></dd>'
                "</dl>"
                f"<h3>Arguments (redacted as in the audit log)</h3><pre>{pretty(args)}</pre>"
                f"<h3>Conversation</h3>{convo}"
                '<p class="hint">Approve: the identical call (same user, tool and arguments) passes once when the application '
                "sends the conversation again, within the approval's lifetime; the model was told it awaits approval. "
                "Deny: the model is told it was denied, with your reason.</p>"
                f'<div class="actions">{forms}</div><p class="stale" hidden>Decided elsewhere: reload the inbox.</p></article>'
            )
        pending = "".join(items) or '<p class="empty">Nothing is waiting for a decision.</p>'
        rows = "".join(
            f"<tr><td><code>{esc(a['id'])}</code></td><td>{esc(a['status'])}</td><td><code>{esc(a.get('tool'))}</code></td>"
            f"<td>{who(a.get('principal'))}</td><td>{who(a.get('reviewer'))}</td><td>{esc(a.get('comment'))}</td>"
            f"<td>{when(a.get('decided_at'))}</td><td>{esc(a.get('consumed_request_id') or '')}</td></tr>"
            for a in (recent or {}).get("data", [])
            if a.get("status") != "pending"
        )
        body = (
            f'<p class="live" data-poll="/console/approvals/state" aria-live="polite">{len(data["data"])} pending.</p>'
            f'<section aria-label="Pending approvals">{pending}</section>'
            '<h2>Recently decided</h2><div class="scroll"><table><thead><tr><th scope="col">Approval</th><th scope="col">Status</th>'
            '<th scope="col">Tool</th><th scope="col">For</th><th scope="col">Reviewer</th><th scope="col">Reason</th>'
            '<th scope="col">Decided</th><th scope="col">Used by request</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></div>"
        )
        return html_response(page("Approvals", body, session, "approvals"))

    async def approvals_state(request: web.Request) -> web.StreamResponse:
        status, data = await console.api.call(request, "GET", "/admin/approvals?status=pending&limit=200")
        pending = [a["id"] for a in data["data"]] if status == 200 else []
        resp = web.Response(body=orjson.dumps({"pending": pending}), content_type="application/json")
        resp.headers.update(SECURITY_HEADERS)
        return resp

    async def decide(request: web.Request) -> web.StreamResponse:
        session = session_of(request)
        aid = safe_id(request.match_info["id"])
        verb = request.match_info["verb"]
        if aid is None or verb not in ("approve", "deny"):
            return error_page(404, "Not found", "No such approval action.", session)
        form = await read_form(request) or {}
        comment = form.get("comment", "")
        if len(comment) > MAX_COMMENT:
            return error_page(400, "Bad request", f"The reason is longer than {MAX_COMMENT} characters.", session)
        status, data = await console.api.call(request, "POST", f"/admin/approvals/{path_quote(aid)}/{verb}", {"comment": comment})
        if status == 200:
            owner = data.get("principal") if isinstance(data.get("principal"), dict) else {}
            who_for = f"{owner.get('subject', '?')}@{owner.get('tenant', '?')}"  # plain text: the flash is escaped when shown
            if verb == "approve":
                session.flash.append(
                    (
                        "ok",
                        f"Approved {aid}. The identical {data.get('tool')} call by {who_for} will pass once when the application retries, until the approval expires.",
                    )
                )
            else:
                session.flash.append(("ok", f"Denied {aid}. The model will be told it was denied."))
        elif status == 409:
            session.flash.append(("error", f"Nothing changed: {api_error(data)} (someone decided it first)."))
        else:
            session.flash.append(("error", f"Nothing changed: {api_error(data)}"))
        return see_other("/console/approvals")

    async def mode(request: web.Request) -> web.StreamResponse:
        session = session_of(request)
        data, refusal = await _read(request, "/admin/mode", "Read-only mode", "mode")
        if refusal is not None:
            return refusal
        own = admin_tenant(request)

        def switch(target: str, label: str) -> str:
            buttons = "".join(
                f'<button type="submit" name="read_only" value="{v}" class="{v}">{t}</button>'
                for v, t in (("on", "Read-only on"), ("off", "Read-only off"), ("clear", "Clear (use the default)"))
            )
            return (
                f'<form method="post" action="/console/mode" class="switch" aria-label="{esc(label)}">{csrf_field(session)}'
                f'<input type="hidden" name="tenant" value="{esc(target)}">{buttons}</form>'
            )

        state = "ON" if data["read_only"] else "off"
        global_part = (
            f'<section class="card"><h2>Every tenant</h2><p class="state">Read-only is <strong>{state}</strong> '
            f"(source: {esc(data['source'])}; configured default: {esc(data['config_default'])}).</p>"
            f"<p>Last changed {when(data.get('updated'))} by {who(data.get('actor'))}.</p>"
            + (switch("", "Global read-only mode") if own is None else '<p class="hint">Only an admin of every tenant can change this.</p>')
            + "</section>"
        )
        tenants = dict(data.get("tenants") or {})
        if own is not None:
            tenants.setdefault(own, {"read_only": None, "updated": None, "actor": None})
        rows = "".join(
            f'<section class="card"><h2>Tenant {esc(name)}</h2><p class="state">Read-only is <strong>'
            f"{'ON' if t.get('read_only') else 'off' if t.get('read_only') is False else 'not set (follows the global mode)'}</strong>.</p>"
            f"<p>Last changed {when(t.get('updated'))} by {who(t.get('actor'))}.</p>{switch(name, f'Read-only mode of tenant {name}')}</section>"
            for name, t in sorted(tenants.items())
        )
        add = ""
        if own is None:
            add = (
                f'<form method="post" action="/console/mode" class="card">{csrf_field(session)}<h2>Set a tenant</h2>'
                '<label for="new-tenant">Tenant</label><input id="new-tenant" name="tenant" required maxlength="256">'
                '<button type="submit" name="read_only" value="on">Read-only on</button>'
                '<button type="submit" name="read_only" value="off">Read-only off</button></form>'
            )
        note = '<p class="hint">While read-only is on, write tools are removed from requests and any write call is refused.</p>'
        return html_response(page("Read-only mode", note + global_part + rows + add, session, "mode"))

    async def set_mode(request: web.Request) -> web.StreamResponse:
        session = session_of(request)
        form = await read_form(request) or {}
        value = {"on": True, "off": False, "clear": None}.get(form.get("read_only", ""), "invalid")
        if value == "invalid":
            return error_page(400, "Bad request", "read_only must be on, off or clear.", session)
        tenant = form.get("tenant", "") or None
        status, data = await console.api.call(request, "PUT", "/admin/mode", {"read_only": value, "tenant": tenant})
        target = f"tenant {tenant}" if tenant else "every tenant"
        if status == 200:
            session.flash.append(("ok", f"Read-only mode for {target}: {form.get('read_only')}."))
        else:
            session.flash.append(("error", f"Nothing changed: {api_error(data)}"))
        return see_other("/console/mode")

    app.router.add_get("/console/approvals", console.signed_in(approvals))
    app.router.add_get("/console/approvals/state", console.signed_in(approvals_state))
    app.router.add_post("/console/approvals/{id}/{verb}", console.signed_in(decide))
    app.router.add_get("/console/mode", console.signed_in(mode))
    app.router.add_post("/console/mode", console.signed_in(set_mode))
