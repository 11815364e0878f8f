"""The audit explorer: search (keyset-paged, on the indexed columns) and one exchange's whole story."""

from __future__ import annotations

import calendar
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from llm_warden.proxy.admin import admin_tenant
from llm_warden.proxy.audit.base import ReaderQueries
from llm_warden.proxy.audit.feedback import submit_feedback
from llm_warden.proxy.console import error_page, html_response, path_quote, read_form, safe_id, see_other, session_of
from llm_warden.proxy.console.chain_status import chain_html
from llm_warden.proxy.console.render import csrf_field, esc, page, pretty, who
from llm_warden.proxy.console.replay_view import replay_form
from llm_warden.proxy.errors import WardenError

if TYPE_CHECKING:
    from llm_warden.proxy.console import Console

PAGE = 50
MODEL_SCAN = 1000
MODEL_BATCH = 250
"""Records read per page when filtering by model (the model is not an indexed column)."""
TEXT_FIELDS = ("request_id", "tenant", "user", "tool", "model", "kind")
MAX_FIELD = 256


class BadQuery(ValueError):
    pass


def _time(value: str, name: str) -> int | None:
    """``YYYY-MM-DDTHH:MM[:SS]`` (UTC) as microseconds since the epoch."""
    if not value:
        return None
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            return calendar.timegm(time.strptime(value, fmt)) * 1_000_000
        except ValueError:
            continue
    raise BadQuery(f"{name} must be a UTC time like 2026-12-07T14:30")


def parse_query(query: Any, own_tenant: str | None) -> dict[str, Any]:
    """The search filters of a query string; raises :class:`BadQuery` naming the field."""
    f: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        v = query.get(name, "").strip()
        if len(v) > MAX_FIELD or not v.isprintable():
            raise BadQuery(f"{name} must be printable text of at most {MAX_FIELD} characters")
        f[name] = v or None
    if own_tenant is not None:
        if f["tenant"] not in (None, own_tenant):
            raise BadQuery(f"this admin may search tenant {own_tenant!r} only")
        f["tenant"] = own_tenant
    status = query.get("status", "").strip()
    if status and (not (status.isascii() and status.isdigit()) or not 100 <= int(status) <= 599):
        raise BadQuery("status must be an HTTP status from 100 to 599")
    f["status"] = int(status) if status else None
    f["since"] = _time(query.get("since", "").strip(), "since")
    f["until"] = _time(query.get("until", "").strip(), "until")
    before = query.get("before", "").strip()
    if len(before) > 64:
        raise BadQuery("before is not a page cursor")
    f["before"] = before or None
    return f


def _model(rec: dict[str, Any]) -> str:
    m = rec.get("model")
    if isinstance(m, dict):
        return str(m.get("reported") or m.get("requested") or "")
    return ""


def _ts(rec: dict[str, Any]) -> str:
    return esc(str(rec.get("ts") or "")[:23].replace("T", " "))


def routes(app: web.Application, console: Console) -> None:
    async def search(request: web.Request) -> web.StreamResponse:
        session = session_of(request)
        own = admin_tenant(request)
        try:
            f = parse_query(request.query, own)
        except BadQuery as e:
            return html_response(
                page("Audit", _form({}, own) + f'<p class="error" role="alert">{esc(e)}</p>', session, "audit"), status=400
            )
        audit = console.w.audit
        if not isinstance(audit, ReaderQueries):
            return html_response(page("Audit", '<p class="flash warn">The audit log is not enabled on this Warden.</p>', session, "audit"))
        started = time.perf_counter()
        rows: list[dict[str, Any]] = []
        cursor = f["before"]
        scanned = 0
        size = PAGE if f["model"] is None else MODEL_BATCH
        try:
            while True:
                batch = await audit.search(
                    f["tenant"], f["user"], f["tool"], f["since"], f["until"], size, f["kind"],
                    request_id=f["request_id"], status=f["status"], before=cursor,
                )  # fmt: skip
                for rec in batch:
                    scanned += 1
                    cursor = rec["_cursor"]
                    if f["model"] is None or _model(rec) == f["model"]:
                        rows.append(rec)
                        if len(rows) == PAGE:
                            break
                if len(rows) == PAGE or len(batch) < size or f["model"] is None or scanned >= MODEL_SCAN:
                    break
        except ValueError:
            return html_response(
                page("Audit", _form(f, own) + '<p class="error" role="alert">That page cursor is not valid.</p>', session, "audit"),
                status=400,
            )
        more = len(rows) == PAGE or (f["model"] is not None and scanned >= MODEL_SCAN)
        took = (time.perf_counter() - started) * 1000
        body = _form(f, own) + _table(rows) + _pager(request, cursor if more else None, took, scanned)
        return html_response(page("Audit", body, session, "audit"))

    async def exchange(request: web.Request) -> web.StreamResponse:
        session = session_of(request)
        rid = safe_id(request.match_info["request_id"])
        audit = console.w.audit
        if rid is None or not isinstance(audit, ReaderQueries):
            return error_page(404, "Exchange", "No such exchange.", session)
        rec = await audit.find(rid, admin_tenant(request))
        if rec is None:
            return error_page(404, "Exchange", f"No exchange {rid} in the audit log (or not in your tenant).", session)
        related = [r for r in await audit.search(admin_tenant(request), limit=100, request_id=rid) if r.get("kind") != "exchange"]
        seq, origin = rec.get("_seq"), rec.get("_origin")
        proof = await audit.chain_proof(seq, origin if isinstance(origin, str) else None) if isinstance(seq, int) else None
        body = _exchange(rec, related, chain_html(proof)) + _feedback_form(rid, csrf_field(session)) + replay_form(rid, csrf_field(session), len(rec.get("turns") or []))
        return html_response(page(f"Exchange {rid}", body, session, "audit"))

    async def feedback(request: web.Request) -> web.StreamResponse:
        session = session_of(request)
        rid = safe_id(request.match_info["request_id"])
        audit = console.w.audit
        if rid is None or audit is None:
            return error_page(404, "Exchange", "No such exchange.", session)
        form = await read_form(request) or {}
        payload: dict[str, Any] = {"request_id": rid}
        rating = form.get("rating", "")
        if rating:
            if rating not in {"-1", "0", "1", "2", "3", "4", "5"}:
                return error_page(400, "Feedback", "rating must be an integer from -1 to 5.", session)
            payload["rating"] = int(rating)
        accepted = form.get("accepted_answer", "")
        if accepted:
            if accepted not in ("yes", "no"):
                return error_page(400, "Feedback", "accepted_answer must be yes or no.", session)
            payload["accepted_answer"] = accepted == "yes"
        for name in ("comment", "correction"):
            if form.get(name, "").strip():
                payload[name] = form[name]
        own = admin_tenant(request)
        tenant = own
        if tenant is None:
            rec = await audit.find(rid)
            owner = (rec or {}).get("principal") or {}
            tenant = owner.get("tenant") if isinstance(owner.get("tenant"), str) else ""
        try:
            result = await submit_feedback(audit, session.principal, payload, tenant=tenant)
        except WardenError as e:
            session.flash.append(("error", f"Feedback not recorded: {e.message} (rule {e.rule or e.code})."))
        else:
            session.flash.append(("ok", f"Feedback {result['id']} recorded."))
        return see_other(f"/console/audit/exchange/{path_quote(rid)}")

    app.router.add_get("/console/audit", console.signed_in(search))
    app.router.add_post("/console/audit/exchange/{request_id}/feedback", console.signed_in(feedback))
    app.router.add_get("/console/audit/exchange/{request_id}", console.signed_in(exchange))


def _form(f: dict[str, Any], own: str | None) -> str:
    def field(name: str, label: str, kind: str = "text", readonly: bool = False) -> str:
        v = f.get(name)
        if name in ("since", "until") and isinstance(v, int):
            v = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(v / 1_000_000))
        ro = " readonly" if readonly else ""
        return (
            f'<div><label for="f-{name}">{label}</label><input id="f-{name}" name="{name}" type="{kind}" value="{esc(v or "")}"{ro}></div>'
        )

    return (
        '<form method="get" action="/console/audit" class="card search" role="search">'
        + field("request_id", "Request id")
        + field("tenant", "Tenant", readonly=own is not None)
        + field("user", "User")
        + field("tool", "Tool")
        + field("model", "Model")
        + field("status", "Status", "number")
        + field("kind", "Kind (exchange, tools.mode, …)")
        + field("since", "Since (UTC)", "datetime-local")
        + field("until", "Until (UTC)", "datetime-local")
        + '<div><button type="submit">Search</button></div></form>'
    )


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="empty">No records match.</p>'
    out = []
    for r in rows:
        rid = r.get("request_id")
        link = (
            f'<a href="/console/audit/exchange/{path_quote(str(rid))}">{esc(rid)}</a>'
            if r.get("kind") == "exchange" and rid
            else esc(rid or "—")
        )
        tools = ", ".join(str(c.get("name")) for c in r.get("tool_calls") or [] if isinstance(c, dict))
        lat = (r.get("latency_us") or {}).get("total") if isinstance(r.get("latency_us"), dict) else None
        actor = r.get("principal") if r.get("kind") == "exchange" else r.get("actor")
        out.append(
            f"<tr><td>{_ts(r)}</td><td>{esc(r.get('kind'))}</td><td>{link}</td><td>{who(actor)}</td><td>{esc(_model(r))}</td>"
            f"<td>{esc(r.get('status') if r.get('status') is not None else '')}</td><td>{esc(tools)}</td>"
            f"<td>{'' if lat is None else f'{lat / 1000:.1f} ms'}</td></tr>"
        )
    return (
        '<div class="scroll"><table><thead><tr><th scope="col">Time (UTC)</th><th scope="col">Kind</th><th scope="col">Request</th>'
        '<th scope="col">Principal</th><th scope="col">Model</th><th scope="col">Status</th><th scope="col">Tool calls</th>'
        f'<th scope="col">Latency</th></tr></thead><tbody>{"".join(out)}</tbody></table></div>'
    )


def _pager(request: web.Request, cursor: str | None, took_ms: float, scanned: int) -> str:
    note = f'<p class="hint">{scanned} records read in {took_ms:.1f} ms.</p>'
    if cursor is None:
        return note
    q = {k: v for k, v in request.query.items() if k != "before" and v}
    q["before"] = cursor
    return f'<p class="pager"><a href="/console/audit?{esc(urlencode(q))}" rel="next">Older records →</a></p>{note}'


def _json_text(value: Any) -> Any:
    """Tool-call arguments are recorded as the model's text: shown parsed when they are JSON."""
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _dl(pairs: list[tuple[str, Any]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def _exchange(rec: dict[str, Any], related: list[dict[str, Any]], chain: str) -> str:
    model = rec.get("model") or {}
    lat = rec.get("latency_us") or {}
    err = rec.get("error")
    summary = _dl(
        [
            ("Time", _ts(rec) + " UTC"),
            ("Principal", who(rec.get("principal"))),
            ("Route", esc(f"{rec.get('method')} {rec.get('path')} ({rec.get('protocol')})")),
            ("Status", esc(rec.get("status"))),
            ("Error", esc(f"{err.get('rule')}: {err.get('message')}") if isinstance(err, dict) else "—"),
            ("Model", esc(f"requested {model.get('requested')}, reported {model.get('reported')} ({rec.get('provider')})")),
            ("Parameters", f"<code>{pretty(rec.get('params'))}</code>"),
            ("Latency", esc(", ".join(f"{k} {v / 1000:.1f} ms" for k, v in lat.items() if isinstance(v, (int, float))))),
            (
                "Timings",
                esc(", ".join(f"{k} {v / 1000:.1f} ms" for k, v in (rec.get("timings_us") or {}).items() if isinstance(v, (int, float)))),
            ),
            (
                "Usage",
                esc(
                    ", ".join(f"{k.removesuffix('_tokens')} {v}" for k, v in (rec.get("usage") or {}).items() if isinstance(v, int)) or "—"
                ),
            ),
            ("Trace", f"<code>{esc(rec.get('trace_id'))}</code>"),
        ]
    )
    turns = rec.get("turns") or []
    first = turns[0].get("request") if turns and isinstance(turns[0], dict) else None
    messages = first.get("messages") if isinstance(first, dict) else None
    prompt = (
        "".join(
            f'<li><span class="role">{esc(m.get("role"))}</span><pre>{esc(m.get("content") if isinstance(m.get("content"), str) else m.get("content"))}</pre></li>'
            for m in messages
            if isinstance(m, dict)
        )
        if isinstance(messages, list)
        else ""
    )
    retrieved = "".join(
        f"<tr><td><code>{esc(c.get('doc_id'))}</code></td><td>{esc(c.get('title'))}</td><td>{esc(c.get('score'))}</td>"
        f"<td>{'injected' if c.get('injected') else 'excluded: ' + esc(c.get('excluded_reason'))}</td><td>{esc(c.get('citation'))}</td></tr>"
        for c in rec.get("retrieved") or []
        if isinstance(c, dict)
    )
    calls = "".join(
        f"<tr><td>{esc(c.get('turn'))}</td><td><code>{esc(c.get('name'))}</code></td><td>{esc(c.get('decision'))}</td>"
        f"<td><code>{esc(c.get('rule'))}</code></td><td>{esc(c.get('reason'))}</td><td><pre>{pretty(_json_text(c.get('arguments')))}</pre></td></tr>"
        for c in rec.get("tool_calls") or []
        if isinstance(c, dict)
    )
    turn_rows = "".join(
        f"<details><summary>Turn {esc(t.get('index'))}: {esc(t.get('reason'))}, status {esc(t.get('status'))}, "
        f"{(t.get('duration_us') or 0) / 1000:.1f} ms</summary><h4>Sent</h4><pre>{pretty(t.get('request'))}</pre>"
        f"<h4>Received</h4><pre>{pretty(t.get('response'))}</pre></details>"
        for t in turns
        if isinstance(t, dict)
    )
    response = rec.get("response") or {}
    rel = "".join(
        f"<tr><td>{_ts(r)}</td><td>{esc(r.get('kind'))}</td><td>{who(r.get('actor'))}</td><td><pre>{pretty(r.get('data'))}</pre></td></tr>"
        for r in related
    )

    def table(head: tuple[str, ...], body: str, empty: str) -> str:
        if not body:
            return f'<p class="empty">{empty}</p>'
        ths = "".join(f'<th scope="col">{h}</th>' for h in head)
        return f'<div class="scroll"><table><thead><tr>{ths}</tr></thead><tbody>{body}</tbody></table></div>'

    return (
        f'<section class="card"><h2>Summary</h2>{summary}</section>'
        f'<section class="card"><h2>Audit chain</h2>{chain}</section>'
        f'<section class="card"><h2>Prompt</h2><ol class="context">{prompt}</ol></section>'
        f'<section class="card"><h2>Injected context</h2><p>{esc(rec.get("retrieval") or "")}</p>'
        + table(("Document", "Title", "Score", "ACL / injection", "Citation"), retrieved, "No retrieved context.")
        + f"<h3>Citations</h3><pre>{pretty(rec.get('citations'))}</pre></section>"
        f'<section class="card"><h2>Tool calls</h2>'
        + table(("Turn", "Tool", "Decision", "Rule", "Reason", "Arguments"), calls, "No tool calls.")
        + f"<h3>Tools withheld</h3><pre>{pretty(rec.get('tools_withheld'))}</pre></section>"
        f'<section class="card"><h2>Upstream turns</h2>{turn_rows or "<p class=empty>No upstream turn.</p>"}</section>'
        f'<section class="card"><h2>Answer</h2><pre>{esc(response.get("text"))}</pre><p>Finish: {esc(response.get("finish_reasons"))}</p></section>'
        f'<section class="card"><h2>Limits and plugins</h2><pre>{pretty(rec.get("plugins"))}</pre></section>'
        f'<section class="card"><h2>Related records</h2>'
        + table(("Time", "Kind", "Actor", "Data"), rel, "No approvals, feedback or other records name this request.")
        + "</section>"
    )


def _feedback_form(rid: str, csrf: str) -> str:
    """Record a reviewer's verdict (``feedback`` records, which evaluation exports); at least one field."""
    ratings = "".join(
        f'<option value="{v}">{label}</option>'
        for v, label in (("", "—"), ("1", "👍 1"), ("0", "0"), ("-1", "👎 -1"), ("2", "2"), ("3", "3"), ("4", "4"), ("5", "5"))
    )
    return (
        '<section class="card"><h2 id="review">Review this answer</h2>'
        f'<form method="post" action="/console/audit/exchange/{path_quote(rid)}/feedback" class="search" aria-labelledby="review">'
        f"{csrf}"
        f'<div><label for="fb-rating">Rating</label><select id="fb-rating" name="rating">{ratings}</select></div>'
        '<div><label for="fb-accepted">Accepted answer</label><select id="fb-accepted" name="accepted_answer">'
        '<option value="">—</option><option value="yes">yes</option><option value="no">no</option></select></div>'
        '<div><label for="fb-comment">Comment</label><input id="fb-comment" name="comment" maxlength="4000"></div>'
        '<div><label for="fb-correction">Correct answer (override)</label><textarea id="fb-correction" name="correction" rows="3" maxlength="32000"></textarea></div>'
        '<div><button type="submit">Record feedback</button></div></form></section>'
    )
