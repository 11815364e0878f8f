"""Sign-in and sign-out: an admin credential exchanged for a server-side session."""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING

from aiohttp import web

from llm_warden.proxy.console import (
    COOKIE,
    LOGIN_COOKIE,
    html_response,
    new_token,
    read_form,
    same_origin,
    see_other,
    session_of,
    set_session_cookie,
)
from llm_warden.proxy.console.render import esc, page
from llm_warden.proxy.errors import WardenError

if TYPE_CHECKING:
    from llm_warden.proxy.console import Console

MAX_CREDENTIAL = 16 * 1024


def _login_form(token: str, message: str = "", kind: str = "error") -> str:
    note = f'<p class="flash {kind}" role="alert">{esc(message)}</p>' if message else ""
    return (
        f"{note}"
        '<form method="post" action="/console/login" class="card signin">'
        f'<input type="hidden" name="login_csrf" value="{esc(token)}">'
        '<label for="token">Admin token</label>'
        '<p class="hint" id="token-hint">An admin JWT (with the admin scope) or the bootstrap token. '
        "It stays on the server; your browser keeps only a session cookie.</p>"
        '<input id="token" name="token" type="password" autocomplete="off" required aria-describedby="token-hint">'
        '<button type="submit">Sign in</button></form>'
    )


def _login_page(request: web.Request, message: str = "", status: int = 200, kind: str = "error") -> web.Response:
    token = new_token()
    resp = html_response(page("Sign in", _login_form(token, message, kind), None), status=status)
    resp.set_cookie(LOGIN_COOKIE, token, path="/console/login", httponly=True, secure=request.secure, samesite="Strict", max_age=3600)
    return resp


def routes(app: web.Application, console: Console) -> None:
    async def login_form(request: web.Request) -> web.StreamResponse:
        if console.sessions.get(request.cookies.get(COOKIE)) is not None:
            return see_other("/console/approvals")
        if request.query.get("expired") == "1":
            return _login_page(request, "Your session has expired; sign in again.", kind="warn")
        return _login_page(request)

    async def login(request: web.Request) -> web.StreamResponse:
        if not same_origin(request):
            return _login_page(request, "The sign-in came from another site (rule console.origin).", status=403)
        form = await read_form(request)
        if form is None:
            return _login_page(request, "The form could not be read (rule console.form).", status=400)
        expected = request.cookies.get(LOGIN_COOKIE, "")
        given = form.get("login_csrf", "")
        if not expected or not hmac.compare_digest(expected.encode("utf-8", "surrogateescape"), given.encode("utf-8", "surrogateescape")):
            return _login_page(request, "The sign-in form expired; try again (rule console.csrf).", status=403)
        credential = form.get("token", "").strip()
        if not credential or len(credential) > MAX_CREDENTIAL:
            return _login_page(request, "Enter an admin token.", status=400)
        header = f"Bearer {credential}"
        try:
            principal = await console.authenticate(header)
        except WardenError as e:
            return _login_page(request, f"Sign-in refused: {e.message} (rule {e.rule or e.code}).", status=e.status)
        exp = principal.claims.get("exp") if principal.claims else None
        console.sessions.drop(request.cookies.get(COOKIE))  # the session the browser presented (perhaps planted) ends here
        sid, session = console.sessions.create(principal, header, float(exp) if isinstance(exp, (int, float)) else None)
        await console.w.record_event("console.sign_in", principal.summary(), {"expires": session.expires})
        resp = see_other("/console/approvals")
        set_session_cookie(resp, request, sid, int(session.expires - time.time()))
        resp.del_cookie(LOGIN_COOKIE, path="/console/login")
        return resp

    async def logout(request: web.Request) -> web.StreamResponse:
        console.sessions.drop(request.cookies.get(COOKIE))
        await console.w.record_event("console.sign_out", session_of(request).principal.summary(), {})
        resp = see_other("/console/login")
        resp.del_cookie(COOKIE, path="/console")
        return resp

    app.router.add_get("/console/login", login_form)
    app.router.add_post("/console/login", login)
    app.router.add_post("/console/logout", console.signed_in(logout))
