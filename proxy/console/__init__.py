"""The operator console: server-rendered pages on the admin listener at ``/console``.

Every page is HTML rendered here from data the admin API (or the audit store)
answers; the one script (``static/console.js``, progressive enhancement:
countdowns and a poll that marks approvals decided elsewhere) is served from
the package, as is the style sheet, under a Content-Security-Policy that
allows nothing else.  Sign-in takes what the admin API accepts (an admin JWT
or the bootstrap token) and checks it with the admin API's own
authentication; actions are then *calls to the admin API* made with the
operator's credential, so the console can do nothing the API would not let
the same operator do (tenant scoping, validation, the audit record with the
reviewer's identity).  See docs/console.md.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote

import aiohttp
import orjson
from aiohttp import web

from llm_warden.proxy.admin import ADMIN_KEY
from llm_warden.proxy.console.render import SECURITY_HEADERS, esc, page
from llm_warden.proxy.console.sessions import Session, Sessions
from llm_warden.proxy.errors import WardenError
from llm_warden.proxy.exchange import Principal

if TYPE_CHECKING:
    from llm_warden.proxy.app import Warden

COOKIE = "warden_console"
LOGIN_COOKIE = "warden_console_login"
MAX_FORM_BYTES = 64 * 1024
STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"console.css": "text/css", "console.js": "text/javascript"}
_SESSION_KEY: web.RequestKey[Session] = web.RequestKey("warden.console.session", Session)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Authenticate = Callable[[str], Awaitable[Principal]]


def html_response(body: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    resp = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
    resp.headers.update(SECURITY_HEADERS)
    if headers:
        resp.headers.update(headers)
    return resp


def see_other(location: str) -> web.Response:
    """A 303 to a console path (never to a URL taken from the request)."""
    resp = web.Response(status=303, headers={"Location": location})
    resp.headers.update(SECURITY_HEADERS)
    return resp


def error_page(status: int, title: str, message: str, session: Session | None) -> web.Response:
    return html_response(page(title, f'<p class="error" role="alert">{esc(message)}</p>', session), status=status)


def session_of(request: web.Request) -> Session:
    """The signed-in operator's session (set by :func:`signed_in`)."""
    return request[_SESSION_KEY]


class AdminApi:
    """The admin API, called in-process over loopback with the operator's own credential."""

    def __init__(self) -> None:
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def call(self, request: web.Request, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """``(status, decoded JSON)`` of one admin API call on the listener that served ``request``."""
        sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
        if not isinstance(sock, tuple) or len(sock) < 2:
            raise WardenError(
                "the console cannot reach the admin API on this listener", status=500, code="console_unavailable", rule="console.admin_api"
            )
        host = str(sock[0])
        url = f"http://{'[' + host + ']' if ':' in host else host}:{int(sock[1])}{path}"
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        data = orjson.dumps(body) if body is not None else None
        headers = {"Authorization": session_of(request).credential}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._http.request(method, url, data=data, headers=headers) as resp:
                raw = await resp.read()
                try:
                    return resp.status, orjson.loads(raw) if raw else None
                except orjson.JSONDecodeError:
                    return resp.status, None
        except (aiohttp.ClientError, TimeoutError):
            raise WardenError(
                "the admin API did not answer the console", status=502, code="console_unavailable", rule="console.admin_api"
            ) from None


def api_error(data: Any) -> str:
    """The message of an admin API error body."""
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message") or "refused")
    return "the admin API refused the request"


class Console:
    """The console's state on one admin listener: sessions, the admin API client, the Warden it serves."""

    def __init__(self, w: Warden, authenticate: Authenticate, sessions: Sessions | None = None) -> None:
        self.w = w
        self.authenticate = authenticate
        self.sessions = sessions or Sessions(w.config.admin.console_session_ttl_s)
        self.api = AdminApi()

    def signed_in(self, handler: Handler) -> Handler:
        """Require a live session; a POST must also carry the session's CSRF token and no foreign Origin."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            sid = request.cookies.get(COOKIE)
            session = self.sessions.get(sid)
            if session is None:
                if request.method != "GET":
                    return error_page(401, "Signed out", "Your session has expired or you are not signed in; sign in again.", None)
                resp = see_other("/console/login?expired=1" if sid else "/console/login")
                if sid:
                    resp.del_cookie(COOKIE, path="/console")
                return resp
            request[_SESSION_KEY] = session
            request[ADMIN_KEY] = session.principal
            if request.method == "POST":
                refusal = await self._check_post(request, session)
                if refusal is not None:
                    return refusal
            try:
                return await handler(request)
            except WardenError as e:
                return error_page(e.status, "Error", f"{e.message} (rule {e.rule or e.code}).", session)

        return wrapped

    async def _check_post(self, request: web.Request, session: Session) -> web.Response | None:
        if not same_origin(request):
            return error_page(403, "Refused", "The request came from another site (rule console.origin).", session)
        form = await read_form(request)
        if form is None:
            return error_page(400, "Bad request", "The form could not be read (rule console.form).", session)
        token = form.get("csrf", "")
        if not token or not session.csrf_ok(token):
            return error_page(
                403, "Refused", "The form's CSRF token is missing or wrong; reload the page and try again (rule console.csrf).", session
            )
        return None


_FORM_KEY: web.RequestKey[dict[str, str]] = web.RequestKey("warden.console.form", dict)


async def read_form(request: web.Request) -> dict[str, str] | None:
    """The url-encoded form of a POST (read once, bounded), or ``None`` when it is not one."""
    if _FORM_KEY in request:
        return request[_FORM_KEY]
    if request.content_type != "application/x-www-form-urlencoded":
        return None
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        return None
    try:
        raw = await request.read()
    except (aiohttp.ClientPayloadError, web.HTTPRequestEntityTooLarge, ValueError):
        return None
    if len(raw) > MAX_FORM_BYTES:
        return None
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=32, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None
    form = dict(pairs)
    request[_FORM_KEY] = form
    return form


def same_origin(request: web.Request) -> bool:
    """No ``Origin`` (older browsers, curl) or one naming this host; ``Sec-Fetch-Site`` cross-site is refused."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin in (f"http://{request.host}", f"https://{request.host}")


def set_session_cookie(resp: web.StreamResponse, request: web.Request, sid: str, max_age: int) -> None:
    resp.set_cookie(COOKIE, sid, path="/console", httponly=True, secure=request.secure, samesite="Strict", max_age=max(1, max_age))


_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")


def safe_id(value: str) -> str | None:
    """``value`` when it is a plain identifier (approval and request ids), else ``None``."""
    return value if _ID.fullmatch(value) else None


def path_quote(value: str) -> str:
    return quote(value, safe="")


def add_console(app: web.Application, w: Warden, authenticate: Authenticate, sessions: Sessions | None = None) -> Console:
    """Register ``/console`` routes on the admin app."""
    from llm_warden.proxy.console import audit_views, inbox, limits_view, replay_view, retrieval_views, signin

    console = Console(w, authenticate, sessions)
    app[CONSOLE_KEY] = console

    async def close(_app: web.Application) -> None:
        await console.api.close()

    app.on_cleanup.append(close)

    async def static(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            return error_page(404, "Not found", "No such file.", None)
        resp = web.Response(body=(STATIC_DIR / name).read_bytes(), content_type=STATIC_FILES[name])
        resp.headers.update(SECURITY_HEADERS)
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    async def root(request: web.Request) -> web.StreamResponse:
        return see_other("/console/approvals")

    app.router.add_get("/console", root)
    app.router.add_get("/console/", root)
    app.router.add_get("/console/static/{name}", static)
    signin.routes(app, console)
    inbox.routes(app, console)
    audit_views.routes(app, console)
    retrieval_views.routes(app, console)
    replay_view.routes(app, console)
    limits_view.routes(app, console)
    return console


def new_token() -> str:
    return secrets.token_urlsafe(32)


CONSOLE_KEY: web.AppKey[Console] = web.AppKey("warden.console", Console)
