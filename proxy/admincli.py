"""``warden admin ...``: the admin API of a running Warden from the command line.

Operators need no curl: approvals (list, show, approve, deny), the read-only
mode (get, set — globally or per tenant), documents (list, delete), the
retrieval debug search, the index status, limits usage per rule and a config reload.  Each command
sends one request to the admin listener (``--url``, else ``WARDEN_ADMIN_URL``,
else ``http://127.0.0.1:9090``) with a bearer token (``--token``, else
``WARDEN_ADMIN_TOKEN`` — the variable the quick start's bootstrap token lives
in; an admin JWT with the admin scope works too) and prints a table, or the
API's JSON with ``--json``.  A refusal exits non-zero with the API's own
message (1 for an API error, 2 when the request could not be sent).

The client is the standard library's: it speaks plain HTTP to a listener the
operator names, follows no redirects and sends the token to that URL only.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

DEFAULT_URL = "http://127.0.0.1:9090"
TIMEOUT_S = 30.0


class AdminError(Exception):
    """The admin API refused (``status`` > 0) or could not be reached (``status`` 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the token goes to the URL the operator named, nowhere else


class AdminClient:
    """A small synchronous client of the admin API."""

    def __init__(self, url: str, token: str, timeout_s: float = TIMEOUT_S) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise AdminError(f"the admin URL must be http(s)://host:port, not {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(_NoRedirect)

    def call(self, method: str, path: str, body: object = None, query: dict[str, str] | None = None) -> Any:
        """Send one request; the decoded JSON answer, or :class:`AdminError` with the API's message."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = orjson.dumps(body) if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise AdminError(_api_message(e.read(), e.code), e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise AdminError(f"cannot reach the admin API at {self.url}: {reason}") from None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise AdminError(f"the admin API at {self.url} did not answer JSON") from None


def _api_message(raw: bytes, status: int) -> str:
    try:
        error = orjson.loads(raw)["error"]
        message = error if isinstance(error, str) else error["message"]  # POST /admin/reload: {"result": "refused", "error": "..."}
        if isinstance(message, str):
            return f"{status}: {message}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    return f"{status}: the admin API answered without an error message"


# -- output -------------------------------------------------------------------


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        text = value
    else:
        text = orjson.dumps(value).decode()
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 60 else text[:57] + "..."


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; an empty table says so."""
    cells = [[_cell(c) for c in row] for row in rows]
    if not cells:
        return "(none)"
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _approvals_table(items: list[dict[str, Any]]) -> str:
    rows = []
    for a in items:
        who = a.get("principal") or {}
        rows.append([a.get("id"), a.get("status"), who.get("tenant"), who.get("subject"), a.get("tool"), a.get("arguments"),
                     _when(a.get("created")), (a.get("reviewer") or {}).get("subject")])
    return table(["id", "status", "tenant", "user", "tool", "arguments", "created", "reviewer"], rows)


def _mode_text(mode: dict[str, Any]) -> str:
    head = f"read-only: {'on' if mode.get('read_only') else 'off'} globally (set by {mode.get('source')}; config default {'on' if mode.get('config_default') else 'off'})"
    tenants = mode.get("tenants") or {}
    rows = [[t, "on" if v.get("read_only") else "off", _when(v.get("updated")), (v.get("actor") or {}).get("subject")] for t, v in tenants.items()]
    return head + ("\n" + table(["tenant", "read-only", "updated", "by"], rows) if rows else "\nno tenant overrides")


def _documents_table(data: dict[str, Any]) -> str:
    rows = [[d.get("id"), d.get("title"), d.get("chunks"), d.get("acl"), _when(d.get("indexed_at"))] for d in data.get("documents", [])]
    out = table(["id", "title", "chunks", "acl", "indexed"], rows)
    if data.get("next_after"):
        out += f"\nmore: --after {data['next_after']}"
    return out


def _search_text(data: dict[str, Any]) -> str:
    rows = [[f"[{h.get('citation')}]", h.get("doc_id"), h.get("title"), round(float(h.get("score", 0.0)), 4), "injected"] for h in data.get("injected", [])]
    rows += [["", h.get("doc_id"), h.get("title"), round(float(h.get("score", 0.0)), 4), f"excluded: {h.get('excluded_reason')}"]
             for h in data.get("excluded", [])]
    head = f"query {data.get('query')!r} for {data.get('user')} in {data.get('tenant')} (groups: {', '.join(data.get('groups', [])) or 'none'})"
    return head + "\n" + table(["cite", "document", "title", "score", "status"], rows)


def _limits_text(data: dict[str, Any]) -> str:
    rows = []
    for r in data.get("rules", []):
        for b in r.get("budgets", []):
            for k in b.get("keys", []):
                who = ":".join(str(k[f]) for f in ("tenant", "user", "model") if f in k)
                state = "EXHAUSTED" if k.get("exhausted") else "ok"
                rows.append([r.get("rule"), r.get("scope"), b.get("kind"), b.get("rate"), who, f"{k.get('used')}/{b.get('limit')}",
                             k.get("remaining"), state, _when(k.get("reset_at"))])
    return table(["rule", "scope", "budget", "rate", "key", "used", "remaining", "state", "full again"], rows)


# -- commands -----------------------------------------------------------------

Command = Callable[[AdminClient, argparse.Namespace], tuple[Any, str]]


def _approvals_list(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    data = c.call("GET", "/admin/approvals", query={"status": a.status, "limit": str(a.limit)})
    return data, _approvals_table(data.get("data", []))


def _approval_show(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    data = c.call("GET", f"/admin/approvals/{_seg(a.id)}")
    return data, _approvals_table([data])


def _decide(verdict: str) -> Command:
    def run(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
        data = c.call("POST", f"/admin/approvals/{_seg(a.id)}/{verdict}", {"comment": a.comment})
        return data, f"{data.get('id')}: {data.get('status')}\n" + _approvals_table([data])

    return run


def _mode_get(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    data = c.call("GET", "/admin/mode")
    return data, _mode_text(data)


def _mode_set(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    value = {"on": True, "off": False, "clear": None}[a.read_only]
    body: dict[str, Any] = {"read_only": value}
    if a.tenant:
        body["tenant"] = a.tenant
    data = c.call("PUT", "/admin/mode", body)
    return data, _mode_text(data)


def _documents_list(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    query = {"tenant": a.tenant, "limit": str(a.limit)}
    if a.after:
        query["after"] = a.after
    data = c.call("GET", "/admin/documents", query=query)
    return data, _documents_table(data)


def _documents_delete(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    data = c.call("DELETE", f"/admin/documents/{_seg(a.tenant)}/{_seg(a.id)}", query={"wait": "true"} if a.wait else None)
    return data, f"deleted {data.get('id')} from tenant {data.get('tenant')}"


def _search(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    body: dict[str, Any] = {"tenant": a.tenant, "user": a.user, "groups": a.group or [], "query": a.query}
    if a.top_k is not None:
        body["top_k"] = a.top_k
    data = c.call("POST", "/admin/search", body)
    return data, _search_text(data)


def _index_status(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    data = c.call("GET", "/admin/index/status")
    return data, orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()


def _reload(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    data = c.call("POST", "/admin/reload")
    return data, orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()


def _limits(c: AdminClient, a: argparse.Namespace) -> tuple[Any, str]:
    query = {k: v for k, v in (("tenant", a.tenant), ("user", a.user), ("rule", a.rule), ("top", str(a.top))) if v}
    data = c.call("GET", "/admin/limits", query=query)
    return data, _limits_text(data)


def _seg(value: str) -> str:
    """One path segment, %-encoded (an id with ``/`` or ``..`` stays one segment)."""
    return urllib.parse.quote(value, safe="")


def _run(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        token = args.token or os.environ.get("WARDEN_ADMIN_TOKEN", "")
        if not token:
            print("warden admin: no admin token: set WARDEN_ADMIN_TOKEN (or pass --token)", file=sys.stderr)
            return 2
        try:
            client = AdminClient(args.url or os.environ.get("WARDEN_ADMIN_URL") or DEFAULT_URL, token)
            data, text = command(client, args)
        except AdminError as e:
            print(f"warden admin: {e.message}", file=sys.stderr)
            return 1 if e.status else 2
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() if args.json else text)
        return 0

    return run


def _leaf(sub: argparse._SubParsersAction, name: str, help: str, command: Command) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    p.add_argument("--url", help=f"the admin listener (default: $WARDEN_ADMIN_URL, else {DEFAULT_URL})")
    p.add_argument("--token", help="admin token (default: $WARDEN_ADMIN_TOKEN; prefer the variable: arguments show in ps)")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer instead of a table")
    p.set_defaults(func=_run(command))
    return p


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``admin`` and its commands to ``warden``."""
    admin = sub.add_parser("admin", help="operate a running Warden through its admin API (approvals, mode, documents, search, limits, reload)")
    asub = admin.add_subparsers(dest="admin_command", required=True, metavar="AREA")

    ap = asub.add_parser("approvals", help="tool calls held for a human approval")
    apsub = ap.add_subparsers(dest="approvals_command", required=True, metavar="ACTION")
    p = _leaf(apsub, "list", "approvals by status, newest first", _approvals_list)
    p.add_argument("--status", default="pending", choices=["pending", "approved", "denied", "consumed", "expired", "all"], help="which approvals")
    p.add_argument("--limit", type=int, default=200, help="at most this many (1..1000)")
    p = _leaf(apsub, "show", "one approval", _approval_show)
    p.add_argument("id", help="the approval id")
    for verdict, text in (("approve", "grant a pending approval: the identical call may then pass once"), ("deny", "refuse a pending approval")):
        p = _leaf(apsub, verdict, text, _decide(verdict))
        p.add_argument("id", help="the approval id")
        p.add_argument("--comment", default="", help="recorded with the decision in the audit log")

    mp = asub.add_parser("mode", help="the read-only switch (write tools removed and refused while it is on)")
    msub = mp.add_subparsers(dest="mode_command", required=True, metavar="ACTION")
    _leaf(msub, "get", "the global mode and the tenants' overrides", _mode_get)
    p = _leaf(msub, "set", "turn read-only mode on or off, globally or for one tenant (clear: back to the global/config value)", _mode_set)
    p.add_argument("--read-only", required=True, choices=["on", "off", "clear"], help="the new setting")
    p.add_argument("--tenant", help="only this tenant (default: the global setting)")

    dp = asub.add_parser("documents", help="the retrieval store's documents")
    dsub = dp.add_subparsers(dest="documents_command", required=True, metavar="ACTION")
    p = _leaf(dsub, "list", "a tenant's documents, by id", _documents_list)
    p.add_argument("--tenant", required=True, help="the tenant")
    p.add_argument("--limit", type=int, default=100, help="at most this many (1..1000)")
    p.add_argument("--after", help="continue after this document id (printed as 'more:')")
    p = _leaf(dsub, "delete", "delete a document from the store and every index", _documents_delete)
    p.add_argument("tenant", help="the tenant")
    p.add_argument("id", help="the document id")
    p.add_argument("--wait", action="store_true", help="answer once this replica no longer serves it")

    p = _leaf(asub, "search", "what retrieval would inject for a principal, and why each candidate was left out", _search)
    p.add_argument("query", help="the question")
    p.add_argument("--tenant", required=True, help="the principal's tenant")
    p.add_argument("--user", required=True, help="the principal's subject")
    p.add_argument("--group", action="append", help="a group of the principal (repeatable)")
    p.add_argument("--top-k", type=int, help="chunks to inject (default: [retrieval] top_k)")

    p = _leaf(asub, "limits", "usage per limit rule: the busiest keys, remaining units, who is exhausted and until when", _limits)
    p.add_argument("--tenant", help="only this tenant's keys")
    p.add_argument("--user", help="only this user's keys (needs --tenant)")
    p.add_argument("--rule", help="only this rule (its name or index)")
    p.add_argument("--top", type=int, default=20, help="keys per budget, busiest first (1..200)")

    _leaf(asub, "index-status", "documents, chunks and engine lag of the retrieval index", _index_status)
    _leaf(asub, "reload", "reload the config file's plugin sections now (as SIGHUP does)", _reload)
