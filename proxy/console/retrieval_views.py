"""Retrieval: index status and freshness, a tenant's documents, and what a given principal would get injected."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from aiohttp import web

from llm_warden.proxy.admin import admin_tenant
from llm_warden.proxy.console import api_error, html_response, read_form, session_of
from llm_warden.proxy.console.render import csrf_field, esc, page, pretty

if TYPE_CHECKING:
    from llm_warden.proxy.console import Console

DOCS_PAGE = 50
MAX_QUERY = 2000


def _missing() -> str:
    return '<p class="flash warn">The retrieval plugin is not enabled on this Warden.</p>'


def _acl(acl: Any) -> str:
    if not isinstance(acl, dict):
        return "—"
    if acl.get("public"):
        parts = ["public in tenant"]
    else:
        parts = [f"users {', '.join(acl.get('allow_users') or []) or '—'}", f"groups {', '.join(acl.get('allow_groups') or []) or '—'}"]
    deny = (acl.get("deny_users") or []) + (acl.get("deny_groups") or [])
    if deny:
        parts.append(f"deny {', '.join(deny)}")
    return esc("; ".join(parts))


def _status_section(status: int, data: Any) -> str:
    if status == 403:
        return '<section class="card"><h2>Index status</h2><p class="hint">Counts over every tenant: an admin of every tenant sees them.</p></section>'
    if status != 200 or not isinstance(data, dict):
        return f'<section class="card"><h2>Index status</h2><p class="error">{esc(api_error(data))}</p></section>'
    engines = "".join(
        f"<tr><td>{esc(name)}</td><td>{esc(e.get('applied_seq'))}</td><td>{esc(e.get('lag'))}</td><td>{esc(e.get('count', '—'))}</td>"
        f"<td>{esc(e.get('updated_at') or '—')}</td></tr>"
        for name, e in (data.get("engines") or {}).items()
        if isinstance(e, dict)
    )
    facts = {k: v for k, v in data.items() if k != "engines"}
    return (
        '<section class="card"><h2>Index status</h2>'
        f"<p>Ready: <strong>{'yes' if data.get('ready') else 'no'}</strong>; caught up {esc(data.get('caught_up_s_ago'))} s ago; "
        f"last sync error: {esc(data.get('last_sync_error') or 'none')}.</p>"
        '<div class="scroll"><table><thead><tr><th scope="col">Engine</th><th scope="col">Applied change</th><th scope="col">Lag (changes)</th>'
        f'<th scope="col">Entries</th><th scope="col">Updated</th></tr></thead><tbody>{engines}</tbody></table></div>'
        f"<details><summary>All counters</summary><pre>{pretty(facts)}</pre></details></section>"
    )


def _search_form(session: Any, values: dict[str, str], own: str | None) -> str:
    def field(name: str, label: str, hint: str = "") -> str:
        ro = " readonly" if name == "tenant" and own is not None else ""
        return (
            f'<div><label for="s-{name}">{label}</label><input id="s-{name}" name="{name}" value="{esc(values.get(name, ""))}"{ro}>'
            + (f'<p class="hint">{hint}</p>' if hint else "")
            + "</div>"
        )

    return (
        '<form method="post" action="/console/retrieval/search" class="card search" aria-label="What would this principal get">'
        f"{csrf_field(session)}"
        + field("tenant", "Tenant")
        + field("user", "User")
        + field("groups", "Groups (comma-separated)")
        + field("query", "Question")
        + '<div><button type="submit">Show what would be injected</button></div></form>'
    )


def routes(app: web.Application, console: Console) -> None:
    async def overview(request: web.Request) -> web.StreamResponse:
        session = session_of(request)
        own = admin_tenant(request)
        tenant = own or request.query.get("tenant", "").strip()
        after = request.query.get("after", "")
        status, data = await console.api.call(request, "GET", "/admin/index/status")
        if status == 404:
            return html_response(page("Retrieval", _missing(), session, "retrieval"))
        body = _status_section(status, data)
        tenant_form = (
            '<form method="get" action="/console/retrieval" class="card search"><div><label for="d-tenant">Tenant</label>'
            f'<input id="d-tenant" name="tenant" value="{esc(tenant)}"{" readonly" if own else ""}></div>'
            '<div><button type="submit">List documents</button></div></form>'
        )
        docs_html = ""
        if tenant:
            q = urlencode({"tenant": tenant, "limit": str(DOCS_PAGE), **({"after": after} if after else {})})
            st, docs = await console.api.call(request, "GET", f"/admin/documents?{q}")
            if st != 200:
                docs_html = f'<p class="error" role="alert">{esc(api_error(docs))}</p>'
            else:
                rows = "".join(
                    f"<tr><td><code>{esc(d.get('id'))}</code></td><td>{esc(d.get('title'))}</td><td>{esc(d.get('source'))}</td>"
                    f"<td>{esc(d.get('updated_at'))}</td><td>{esc(d.get('indexed_at'))}</td><td>{esc(d.get('chunks'))}</td><td>{_acl(d.get('acl'))}</td></tr>"
                    for d in docs.get("documents", [])
                )
                more = ""
                if docs.get("next_after"):
                    more = f'<p class="pager"><a rel="next" href="/console/retrieval?{esc(urlencode({"tenant": tenant, "after": docs["next_after"]}))}">More documents →</a></p>'
                docs_html = f"<h2>Documents of {esc(tenant)}</h2>" + (
                    '<div class="scroll"><table><thead><tr><th scope="col">Id</th><th scope="col">Title</th><th scope="col">Source</th>'
                    '<th scope="col">Source updated</th><th scope="col">Indexed</th><th scope="col">Chunks</th><th scope="col">Who may read</th>'
                    f"</tr></thead><tbody>{rows}</tbody></table></div>{more}"
                    if rows
                    else '<p class="empty">No documents.</p>'
                )
        search = "<h2>What would this principal get?</h2>" + _search_form(session, {"tenant": tenant}, own)
        return html_response(page("Retrieval", body + search + tenant_form + docs_html, session, "retrieval"))

    async def search(request: web.Request) -> web.StreamResponse:
        session = session_of(request)
        own = admin_tenant(request)
        form = await read_form(request) or {}
        values = {k: form.get(k, "").strip() for k in ("tenant", "user", "groups", "query")}
        if own is not None:
            values["tenant"] = own
        if len(values["query"]) > MAX_QUERY:
            return html_response(
                page(
                    "Retrieval",
                    '<p class="error" role="alert">The question is too long.</p>' + _search_form(session, values, own),
                    session,
                    "retrieval",
                ),
                status=400,
            )
        groups = [g.strip() for g in values["groups"].split(",") if g.strip()]
        status, data = await console.api.call(
            request,
            "POST",
            "/admin/search",
            {"tenant": values["tenant"], "user": values["user"], "groups": groups, "query": values["query"]},
        )
        if status == 404:
            return html_response(page("Retrieval", _missing(), session, "retrieval"))
        if status != 200:
            err = f'<p class="error" role="alert">{esc(api_error(data))}</p>'
            return html_response(page("Retrieval", err + _search_form(session, values, own), session, "retrieval"), status=status)
        injected = "".join(
            f"<tr><td>{esc(h.get('citation'))}</td><td><code>{esc(h.get('doc_id'))}</code></td><td>{esc(h.get('title'))}</td>"
            f"<td>{esc(h.get('score'))}</td><td><pre>{esc(str(h.get('text') or '')[:800])}</pre></td></tr>"
            for h in data.get("injected", [])
        )
        excluded = "".join(
            f"<tr><td>{esc(h.get('rank'))}</td><td><code>{esc(h.get('doc_id'))}</code></td><td>{esc(h.get('excluded_reason'))}</td><td>{esc(h.get('score'))}</td></tr>"
            for h in data.get("excluded", [])
        )
        who_ = f"{values['user']}@{values['tenant']}" + (f" (groups {', '.join(groups)})" if groups else "")
        result = (
            f'<section class="card"><h2>Injected for {esc(who_)}</h2>'
            + (
                '<div class="scroll"><table><thead><tr><th scope="col">Cite</th><th scope="col">Document</th><th scope="col">Title</th>'
                f'<th scope="col">Score</th><th scope="col">Text</th></tr></thead><tbody>{injected}</tbody></table></div>'
                if injected
                else '<p class="empty">Nothing would be injected.</p>'
            )
            + "<h3>Excluded, and why</h3>"
            + (
                '<div class="scroll"><table><thead><tr><th scope="col">Rank</th><th scope="col">Document</th><th scope="col">Reason</th>'
                f'<th scope="col">Score</th></tr></thead><tbody>{excluded}</tbody></table></div>'
                if excluded
                else '<p class="empty">Nothing was excluded.</p>'
            )
            + '<p class="hint">acl: this principal may not read it (its text is never shown here); rank: below the top k; '
            "budget: over the context token budget; stale: the index is behind the store of record.</p>"
            f'<p class="hint">{esc(data.get("candidates"))} candidates, {esc(data.get("context_tokens"))} context tokens, mode {esc(data.get("mode"))}.</p></section>'
        )
        return html_response(page("Retrieval", result + _search_form(session, values, own), session, "retrieval"))

    app.router.add_get("/console/retrieval", console.signed_in(overview))
    app.router.add_post("/console/retrieval/search", console.signed_in(search))
