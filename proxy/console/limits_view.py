"""Limits: usage per rule — who is close to a budget, who is exhausted and until when (``GET /admin/limits``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from aiohttp import web

from llm_warden.proxy.admin import admin_tenant
from llm_warden.proxy.console import api_error, html_response, session_of
from llm_warden.proxy.console.render import duration, esc, page, when

if TYPE_CHECKING:
    from llm_warden.proxy.console import Console

FIELDS = ("tenant", "user", "model")


def _form(values: dict[str, str], own: str | None) -> str:
    ro = " readonly" if own is not None else ""
    return (
        '<form method="get" action="/console/limits" class="card search" aria-label="Whose usage">'
        f'<div><label for="l-tenant">Tenant</label><input id="l-tenant" name="tenant" value="{esc(values.get("tenant", ""))}"{ro}></div>'
        f'<div><label for="l-user">User</label><input id="l-user" name="user" value="{esc(values.get("user", ""))}"></div>'
        '<div><button type="submit">Show usage</button></div></form>'
    )


def _key_cells(scope_fields: list[str], row: dict[str, Any]) -> str:
    return "".join(f"<td>{esc(row.get(f))}</td>" for f in scope_fields)


def _budget(scope: str, b: dict[str, Any]) -> str:
    head = f"<h3>{esc(b.get('kind'))}: {esc(b.get('rate'))}</h3>"
    if b.get("hidden"):
        return head + f'<p class="hint">Keys not shown: {esc(b["hidden"])}.</p>'
    fields = [f for f in FIELDS if f in scope.split("+") or (f == "tenant" and scope in ("user", "user+model"))]
    rows = ""
    for k in b.get("keys") or []:
        if not isinstance(k, dict):
            continue
        state = '<strong class="bad">exhausted</strong>' if k.get("exhausted") else '<span class="ok">ok</span>'
        reset = f"{when(k.get('reset_at'))} (in {esc(duration(float(k.get('reset_s') or 0)))})" if k.get("reset_s") else "full now"
        nxt = f"in {esc(duration(float(k['retry_after_s'])))}" if k.get("retry_after_s") else "now"
        tr = '<tr class="exhausted">' if k.get("exhausted") else "<tr>"
        rows += (
            f"{tr}{_key_cells(fields, k)}"
            f"<td>{esc(k.get('used'))} / {esc(b.get('limit'))}</td><td>{esc(k.get('remaining'))}</td><td>{state}</td>"
            f"<td>{nxt}</td><td>{reset}</td></tr>"
        )
    if not rows:
        return head + '<p class="empty">No key in scope has used this budget: every bucket is full.</p>'
    cols = "".join(f'<th scope="col">{f.capitalize()}</th>' for f in fields)
    shown = len(b.get("keys") or [])
    note = f"{esc(shown)} of {esc(b.get('keys_found'))} keys, busiest first."
    if b.get("complete") is False:
        note += " The key walk stopped at its bound ([limits] admin_scan_keys): narrow it with a tenant or user."
    return (
        head + '<div class="scroll"><table class="usage"><thead><tr>'
        f'{cols}<th scope="col">Used</th><th scope="col">Remaining</th><th scope="col">State</th>'
        f'<th scope="col">Next unit</th><th scope="col">Full again</th></tr></thead><tbody>{rows}</tbody></table></div>'
        f'<p class="hint">{note}</p>'
    )


def _rule(r: dict[str, Any]) -> str:
    match = r.get("match")
    if not isinstance(match, dict):
        match = {}
    conds = "; ".join(f"{esc(k)} {esc(', '.join(v))}" for k, v in sorted(match.items()) if v)
    budgets = "".join(_budget(str(r.get("scope")), b) for b in r.get("budgets") or [] if isinstance(b, dict))
    return (
        f'<section class="card" data-rule="{esc(r.get("rule"))}"><h2>Rule {esc(r.get("rule"))}: per {esc(r.get("scope"))}</h2>'
        f"<p>Applies to {conds or 'every request'}.</p>{budgets}</section>"
    )


def routes(app: web.Application, console: Console) -> None:
    async def limits(request: web.Request) -> web.StreamResponse:
        session = session_of(request)
        own = admin_tenant(request)
        values = {k: request.query.get(k, "").strip() for k in ("tenant", "user")}
        if own is not None:
            values["tenant"] = own
        query = urlencode({k: v for k, v in values.items() if v})
        status, data = await console.api.call(request, "GET", "/admin/limits" + (f"?{query}" if query else ""))
        if status == 404:
            body = '<p class="flash warn">The limits plugin is not enabled on this Warden.</p>'
            return html_response(page("Limits", body, session, "limits"))
        if status != 200 or not isinstance(data, dict):
            err = f'<p class="error" role="alert">{esc(api_error(data))}</p>'
            return html_response(page("Limits", err + _form(values, own), session, "limits"), status=status if status >= 400 else 502)
        rules = "".join(_rule(r) for r in data.get("rules") or [] if isinstance(r, dict))
        intro = (
            f'<p class="hint">Backend {esc(data.get("backend"))}. Each budget is a GCRA bucket: <em>used</em> units refill steadily; '
            "<em>exhausted</em> means the next request is refused (429) until <em>next unit</em>.</p>"
        )
        return html_response(
            page("Limits", _form(values, own) + intro + (rules or '<p class="empty">No limit rules apply.</p>'), session, "limits")
        )

    app.router.add_get("/console/limits", console.signed_in(limits))
