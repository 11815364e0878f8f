"""Replay one upstream turn of a recorded exchange (optionally to another model) and show both answers side by side.

The request is rebuilt by :func:`proxy.audit.replay.plan_replay` exactly as
``warden replay`` does; the replay is recorded in the audit log
(``console.replay``) with the operator, since it sends recorded content to
the provider again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from llm_warden.proxy.admin import admin_tenant
from llm_warden.proxy.audit.replay import Answer, ReplayError, plan_replay, send, tool_call_changes
from llm_warden.proxy.console import error_page, html_response, path_quote, read_form, safe_id, session_of
from llm_warden.proxy.console.render import csrf_field, esc, page

if TYPE_CHECKING:
    from llm_warden.proxy.console import Console

MAX_MODEL = 128
MAX_TURNS = 100
REPLAY_TIMEOUT_S = 60.0


def replay_form(rid: str, csrf: str, turns: int = 1, chosen: int = 0) -> str:
    """The replay form; with more than one upstream turn, a choice of which turn's request to send again."""
    choice = ""
    if turns > 1:
        names = {0: " (first)", turns - 1: " (last)"}
        options = "".join(
            f'<option value="{i}"{" selected" if i == chosen else ""}>Turn {i}{names.get(i, "")}</option>'
            for i in range(min(turns, MAX_TURNS))
        )
        choice = f'<div><label for="rp-turn">Upstream turn</label><select id="rp-turn" name="turn">{options}</select></div>'
    return (
        '<section class="card"><h2 id="replay">Replay</h2>'
        '<p class="hint">Sends an upstream request of this exchange to the provider again (as recorded: redacted values stay '
        "redacted) and shows both answers side by side: the first turn's, or the turn you choose (a corrective turn's request "
        "carries the refused call and Warden's reason). The replay is recorded in the audit log.</p>"
        f'<form method="post" action="/console/audit/exchange/{path_quote(rid)}/replay" class="search" aria-labelledby="replay">{csrf}'
        + choice
        + '<div><label for="rp-model">Model (empty: the same)</label><input id="rp-model" name="model" maxlength="128"></div>'
        '<div><button type="submit">Replay</button></div></form></section>'
    )


def _column(title: str, a: Answer) -> str:
    if a.error is not None:
        body = f'<p class="error">Provider error {esc(a.status)}: {esc(a.error)}</p>'
    else:
        calls = "".join(f"<li><code>{esc(name)}({esc(args)})</code></li>" for name, args in a.tool_calls)
        body = (
            f"<pre>{esc(a.text or '(no text)')}</pre>" + (f"<ul>{calls}</ul>" if calls else "") + f"<p>Finish: {esc(a.finish_reason)}</p>"
        )
    return f'<section class="card"><h2>{esc(title)} ({esc(a.model or "?")})</h2>{body}</section>'


def routes(app: web.Application, console: Console) -> None:
    async def replay(request: web.Request) -> web.StreamResponse:
        session = session_of(request)
        rid = safe_id(request.match_info["request_id"])
        audit = console.w.audit
        if rid is None or audit is None:
            return error_page(404, "Replay", "No such exchange.", session)
        form = await read_form(request) or {}
        model = form.get("model", "").strip() or None
        if model is not None and (len(model) > MAX_MODEL or not model.isprintable()):
            return error_page(400, "Replay", f"The model must be printable text of at most {MAX_MODEL} characters.", session)
        turn_text = form.get("turn", "0").strip() or "0"
        if not turn_text.isdigit() or int(turn_text) >= MAX_TURNS:
            return error_page(400, "Replay", f"The turn must be a number from 0 to {MAX_TURNS - 1}.", session)
        turn = int(turn_text)
        rec = await audit.find(rid, admin_tenant(request))
        if rec is None:
            return error_page(404, "Replay", f"No exchange {rid} in the audit log (or not in your tenant).", session)
        upstream = console.w.config.upstream
        try:
            plan = plan_replay(rec, base_url=upstream.base_url, turn=turn, model=model)
        except ReplayError as e:
            return error_page(400, "Replay", f"This exchange cannot be replayed: {e}", session)
        try:
            new = await send(plan, upstream.api_key, timeout_s=REPLAY_TIMEOUT_S)
        except (aiohttp.ClientError, TimeoutError) as e:
            new = Answer(status=502, error=f"the provider could not be reached ({type(e).__name__})")
        await console.w.record_event(
            "console.replay",
            session.principal.summary(),
            {"request_id": rid, "turn": turn, "model": plan.body.get("model"), "status": new.status},
        )
        changes = tool_call_changes(plan.old, new)
        caveats = "".join(f"<li>{esc(c)}</li>" for c in plan.caveats)
        summary = (
            f"<p>Answer text: <strong>{'identical' if plan.old.text == new.text else 'differs'}</strong>; tool calls: "
            f"<strong>{'unchanged' if not changes else f'{len(changes)} changed'}</strong>.</p>"
            + (f"<pre>{esc(chr(10).join(changes))}</pre>" if changes else "")
            + (f'<h3>Not reproducible</h3><ul class="hint">{caveats}</ul>' if caveats else "")
        )
        body = (
            f'<p><a href="/console/audit/exchange/{path_quote(rid)}">← Exchange {esc(rid)}</a></p>'
            f'<section class="card">{summary}</section>'
            f'<div class="diff">{_column(f"Recorded, turn {turn}", plan.old)}{_column(f"Replay of turn {turn}", new)}</div>'
            + replay_form(rid, csrf_field(session), len(rec.get("turns") or []), turn)
        )
        return html_response(page(f"Replay of {rid}, turn {turn}", body, session, "audit"))

    app.router.add_post("/console/audit/exchange/{request_id}/replay", console.signed_in(replay))
