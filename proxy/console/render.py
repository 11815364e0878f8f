"""HTML for the console: every value is escaped here; no inline script or style (the CSP forbids both)."""

from __future__ import annotations

import html
import time
from typing import Any

import orjson

from llm_warden.proxy.console.sessions import Session

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # not no-referrer: with it, browsers send "Origin: null" on form posts
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
NAV = (("approvals", "Approvals"), ("mode", "Read-only"), ("audit", "Audit"), ("retrieval", "Retrieval"), ("limits", "Limits"))


def esc(value: object) -> str:
    """``value`` as HTML text (quotes escaped too, so it is safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def pretty(value: Any) -> str:
    """A JSON value, indented, as escaped text for a ``<pre>``."""
    try:
        text = orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        text = repr(value)
    return esc(text)


def when(ts: float | None) -> str:
    """A UTC timestamp as ``<time>``."""
    if ts is None:
        return "—"
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    return f'<time datetime="{iso}">{time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))} UTC</time>'


def duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    if s >= 60:
        return f"{s // 60} min {s % 60} s"
    return f"{s} s"


def who(actor: Any) -> str:
    """A principal summary (``{"tenant", "subject", ...}``) as ``subject@tenant``."""
    if not isinstance(actor, dict):
        return "—"
    return esc(f"{actor.get('subject', '?')}@{actor.get('tenant', '?')}")


def csrf_field(session: Session) -> str:
    return f'<input type="hidden" name="csrf" value="{esc(session.csrf)}">'


def page(title: str, body: str, session: Session | None, active: str = "") -> str:
    """A whole page: header with navigation and the signed-in operator, flashed messages, then ``body``."""
    nav = ""
    if session is not None:
        current = ' aria-current="page"'
        links = "".join(f'<li><a href="/console/{key}"{current if key == active else ""}>{label}</a></li>' for key, label in NAV)
        tenant = session.principal.tenant
        scope = "every tenant" if tenant == "*" else f"tenant {esc(tenant)}"
        nav = (
            f'<nav aria-label="Console"><ul>{links}</ul></nav>'
            f'<div class="me"><span>{esc(session.principal.subject)} · {scope}</span>'
            f'<form method="post" action="/console/logout">{csrf_field(session)}<button type="submit">Sign out</button></form></div>'
        )
        flashes = "".join(f'<p class="flash {esc(kind)}" role="status">{esc(text)}</p>' for kind, text in session.flash)
        session.flash.clear()
    else:
        flashes = ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · Warden console</title>"
        '<link rel="stylesheet" href="/console/static/console.css">'
        '<script src="/console/static/console.js" defer></script>'
        "</head><body>"
        '<a class="skip" href="#main">Skip to content</a>'
        f'<header><span class="brand">Warden</span>{nav}</header>'
        f'<main id="main"><h1>{esc(title)}</h1>{flashes}{body}</main>'
        "</body></html>"
    )
