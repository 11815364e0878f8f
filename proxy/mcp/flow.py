"""The MCP flow: one caller message relayed to one upstream MCP server, governed.

The pipeline has already identified the request, authenticated the caller's
Warden JWT, routed ``/mcp/{server}``, parsed and classified the JSON-RPC
message (:mod:`proxy.protocols.mcp`) and run the request hooks.  Here:

- ``initialize`` opens a session: the upstream's (HTTP) or the supervised
  process's cached handshake (stdio); the caller gets a sealed id
  (:mod:`proxy.mcp.sessions`).  Every other message needs that session.
- ``tools/list``: every upstream tool is shown only if the policy offers it
  to this principal (the ``[[tools]]`` entry with ``server = "{server}"``
  and the tool's name, deny by default, write tools hidden in read-only mode,
  retired versions hidden) and its description and schema match their pinned
  digest; the policy's schema (what is enforced) replaces the upstream's; a
  deprecated version's description starts with its deprecation note.
- ``tools/call``: offered? pinned? a duplicate of a write that already
  succeeded in this session? then the tools judge (schema, argument rules,
  versions, permissions, read-only, rate limit, approvals), given a
  :class:`~proxy.exchange.ToolCall` that names the server.  A refusal is a
  ``tools/call`` result with ``isError`` that tells the agent why (and the
  approval id when held): nothing reaches the upstream.  An allowed call of a
  deprecated version is relayed and its result carries
  ``_meta["warden/deprecation"]``.
- Everything else on the allow-list is relayed as it is; responses stream
  back as JSON or SSE, server-initiated messages included.

The flow returns a reply; the pipeline records it and sends it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from llm_warden.proxy.errors import ServiceUnavailable, UpstreamError, UpstreamTimeout, WardenError
from llm_warden.proxy.exchange import Decision, Exchange, StateKey, ToolDecisionRecord, UpstreamTurn
from llm_warden.proxy.headers import safe_text
from llm_warden.proxy.mcp.jsonrpc import (
    CLIENT_NOTIFICATIONS,
    CLIENT_REQUESTS,
    HANDSHAKE_VERSIONS,
    McpRefusal,
    Message,
    classify,
    error_message,
    server_message_refusal,
    tool_error_result,
)
from llm_warden.proxy.mcp.pins import tool_digest
from llm_warden.proxy.mcp.sessions import Session
from llm_warden.proxy.pipeline import Incoming, JsonReply, Reply, StreamReply
from llm_warden.proxy.sse import SSEError, SSEParser
from llm_warden.proxy.tooling import parse_call

if TYPE_CHECKING:
    from llm_warden.proxy.app import Warden
    from llm_warden.proxy.mcp.config import McpServerConfig
    from llm_warden.proxy.mcp.gateway import McpGateway

SESSION_HEADER = "Mcp-Session-Id"
MAX_HIDDEN_RECORDED = 100
MAX_LIST_PAGES = 20
WriteKey = tuple[str, str, str]
WRITE_KEY: StateKey[WriteKey] = StateKey("mcp.write", tuple)
"""The duplicate-mutation key of an allowed write call (session, tool, arguments digest); never recorded."""
DEPRECATION: StateKey[dict[str, Any]] = StateKey("mcp.deprecation", dict)
"""The deprecation of the version an allowed call used, added to its result's ``_meta``."""
DEPRECATION_META = "warden/deprecation"


def _gateway(w: Warden) -> McpGateway:
    gw = w.mcp
    if gw is None:
        raise McpRefusal("the MCP gateway is not configured", rule="mcp.servers", status=404)
    return gw


async def run(w: Warden, req: Incoming, ex: Exchange) -> Reply:
    gw = _gateway(w)
    server = gw.servers[req.match.route.template.rsplit("/", 1)[1]]
    info: dict[str, Any] = {"server": server.name, "transport": server.transport}
    ex.mcp = info
    method = req.match.route.method
    try:
        version = req.headers.get("MCP-Protocol-Version")
        if version is not None and version not in HANDSHAKE_VERSIONS:
            raise McpRefusal("this gateway relays MCP protocol revisions 2024-11-05 to 2025-11-25", rule="mcp.protocol_version")
        if version is not None:
            info["protocol_version"] = version
        if method == "POST":
            if len(ex.raw_body) > gw.cfg.max_message_bytes:
                ex.body_refused = "mcp.max_message_bytes"
                raise McpRefusal(f"the message is {len(ex.raw_body)} bytes; the limit is {gw.cfg.max_message_bytes}", rule="mcp.max_message_bytes", status=413)
            assert ex.body is not None
            msg = classify(ex.body)
            info["method"] = msg.method or "response"
            info["kind"] = msg.kind
            if msg.id is not None:
                info["jsonrpc_id"] = msg.id
            _describe(msg, info)
            try:
                reply = await _post(w, gw, server, req, ex, msg, version, info)
            finally:
                if ex.stream is False:
                    _release_write(gw, ex)
        else:
            info["method"] = "stream" if method == "GET" else "session/end"
            session = _session(gw, server, req, ex, info)
            reply = await _get_or_delete(w, gw, server, req, ex, session, method, version)
    except WardenError as e:
        gw.requests.labels(server.name, _method_label(info), e.rule or "refused").inc()
        raise
    gw.requests.labels(server.name, _method_label(info), info.get("decision", "relayed")).inc()
    return reply


def _describe(msg: Message, info: dict[str, Any]) -> None:
    """What the record and the trace say of a request's target (bounded text; the tool is set by the judge)."""
    if msg.method == "prompts/get" and isinstance(msg.params.get("name"), str):
        info["prompt"] = safe_text(msg.params["name"], 128)
    elif msg.method in ("resources/read", "resources/subscribe", "resources/unsubscribe") and isinstance(msg.params.get("uri"), str):
        info["resource_uri"] = safe_text(msg.params["uri"], 512)


def _method_label(info: dict[str, Any]) -> str:
    m = info.get("method", "none")
    return m if m in CLIENT_REQUESTS or m in CLIENT_NOTIFICATIONS or m in ("response", "stream", "session/end") else "other"


def _session(gw: McpGateway, server: McpServerConfig, req: Incoming, ex: Exchange, info: dict[str, Any]) -> Session:
    value = req.headers.get(SESSION_HEADER)
    if not value:
        raise McpRefusal("this message needs the Mcp-Session-Id that initialize returned", rule="mcp.session", status=400)
    assert ex.principal is not None
    s = gw.sealer.open(value, server.name, ex.principal)
    if s is None:
        raise McpRefusal("the session is unknown, expired or belongs to someone else; start a new session with initialize", rule="mcp.session", status=404)
    info["session"] = hashlib.sha256(value.encode()).hexdigest()[:16]
    return s


def _turn(ex: Exchange, payload: Any, body: bytes) -> UpstreamTurn:
    turn = UpstreamTurn(index=len(ex.turns), body=body, started=time.perf_counter(), payload=payload)
    ex.turns.append(turn)
    return turn


async def _post(w: Warden, gw: McpGateway, server: McpServerConfig, req: Incoming, ex: Exchange, msg: Message, version: str | None, info: dict[str, Any]) -> Reply:
    assert ex.principal is not None and ex.body is not None
    if msg.method == "initialize":
        return await _initialize(w, gw, server, ex, msg, version, info)
    session = _session(gw, server, req, ex, info)
    if msg.method == "tools/call":
        refused = await _judge_call(w, gw, server, session, ex, msg, version, info)
        if refused is not None:
            ex.response_body = refused
            return JsonReply(200, orjson.dumps(refused), {"Content-Type": "application/json"})
    body = orjson.dumps(ex.body)
    stdio = gw.stdio.get(server.name)
    if stdio is not None:
        if msg.kind != "request":
            # On the pipe, requests carry Warden's ids: a caller's cancellation or progress names an id the
            # server never saw, and Warden answers the server's own requests itself. Only this one applies.
            if msg.method == "notifications/roots/list_changed":
                await stdio.notify(msg.method, msg.params)
            else:
                info["dropped"] = {"not forwarded to a stdio server": 1}
            return JsonReply(202, b"", {})
        assert msg.method is not None and msg.id is not None
        turn = _turn(ex, ex.body, body)
        try:
            answer = await stdio.request(msg.method, msg.params, session.generation)
        except WardenError as e:
            turn.error, turn.error_kind = e.message, "timeout" if e.status == 504 else "connection"
            raise
        finally:
            turn.duration_s = time.perf_counter() - turn.started
        turn.status = 200
        answer["id"] = msg.id
        turn.response = answer
        answer = await _transform(w, gw, server, ex, msg, answer, info)
        ex.response_body = answer
        return JsonReply(200, orjson.dumps(answer), {"Content-Type": "application/json"})
    return await _relay_http(w, gw, server, ex, msg, body, session.upstream_id, version, info)


async def _initialize(w: Warden, gw: McpGateway, server: McpServerConfig, ex: Exchange, msg: Message, version: str | None, info: dict[str, Any]) -> Reply:
    assert ex.principal is not None and ex.body is not None
    stdio = gw.stdio.get(server.name)
    if stdio is not None:
        if not stdio.ready or stdio.init_result is None:
            raise ServiceUnavailable(f"MCP stdio server {server.name!r} is (re)starting", rule="mcp.servers.command", headers={"Retry-After": "1"})
        # The handshake Warden made with the process: its version and capabilities are what the process speaks.
        answer = await _transform(w, gw, server, ex, msg, {"jsonrpc": "2.0", "id": msg.id, "result": dict(stdio.init_result)}, info)
        sealed = gw.sealer.seal(Session(server.name, ex.principal.tenant, ex.principal.subject, "", stdio.generation))
        ex.response_body = answer
        return JsonReply(200, orjson.dumps(answer), {"Content-Type": "application/json", SESSION_HEADER: sealed})
    body = orjson.dumps(ex.body)
    return await _relay_http(w, gw, server, ex, msg, body, None, version, info)


async def _relay_http(w: Warden, gw: McpGateway, server: McpServerConfig, ex: Exchange, msg: Message, body: bytes, upstream_sid: str | None, version: str | None, info: dict[str, Any]) -> Reply:
    assert ex.principal is not None
    turn, resp = await _open(gw, server, ex, "POST", body, ex.body, upstream_sid, version)
    headers: dict[str, str] = {}
    if msg.method == "initialize" and resp.status < 300:
        sid = resp.headers.get(SESSION_HEADER, "")
        if len(sid) > 1024 or not (sid.isascii() and sid.isprintable()):
            resp.release()
            raise UpstreamError("the MCP server answered initialize with a malformed session id", rule="mcp.upstream")
        headers[SESSION_HEADER] = gw.sealer.seal(Session(server.name, ex.principal.tenant, ex.principal.subject, sid, 0))
    ctype = resp.headers.get("Content-Type", "")
    if "text/event-stream" in ctype and resp.status < 300:
        ex.stream = True
        headers.update({"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        return StreamReply(resp.status, headers, _sse(w, gw, server, ex, msg, resp, turn, info), release=resp.release)
    try:
        raw = await _read(resp, gw.cfg.max_message_bytes)
    finally:
        turn.duration_s = time.perf_counter() - turn.started
        resp.release()
    if msg.kind != "request" and resp.status < 300:
        # A notification or the caller's response (its id is the server's request's) expects no answer: a body (say, a response naming another request's
        # id, which the caller's client would take for that request's answer) would pass around the filter.
        if raw:
            info["dropped"] = {NO_ANSWER_EXPECTED: 1}
        return JsonReply(202, b"", headers)
    if not raw:
        return JsonReply(resp.status, b"", headers)
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        turn.error, turn.error_kind = "not JSON", "malformed"
        if resp.status == 404:
            # The upstream ended the session: 404 tells the caller's client to start a new one.
            raise McpRefusal("the MCP server ended this session; start a new session with initialize", rule="mcp.session", status=404) from None
        raise UpstreamError(f"the MCP server answered {resp.status} with a body that is not JSON", rule="mcp.upstream") from None
    turn.response = answer
    if msg.id is not None and resp.status < 300:
        if not isinstance(answer, dict) or answer.get("id") != msg.id or "method" in answer or server_message_refusal(answer) is not None:
            turn.error, turn.error_kind = "not the response to the request", "malformed"
            raise UpstreamError("the MCP server answered with something other than the response to this request", rule="mcp.upstream")
        answer = await _transform(w, gw, server, ex, msg, answer, info)
    elif resp.status >= 300 and not _error_only(answer, msg.id if msg.kind == "request" else None):
        turn.error, turn.error_kind = "an error status without a JSON-RPC error", "malformed"
        raise UpstreamError(f"the MCP server answered {resp.status} with something other than a JSON-RPC error", rule="mcp.upstream")
    ex.response_body = answer
    headers["Content-Type"] = "application/json"
    return JsonReply(resp.status, orjson.dumps(answer), headers)


NO_ANSWER_EXPECTED = "an answer to a message that expects none"


def _error_only(answer: Any, req_id: str | int | None) -> bool:
    """Whether an upstream's answer with an error status is an error (of this request, or of none) and nothing else."""
    return isinstance(answer, dict) and "error" in answer and "result" not in answer and "method" not in answer and answer.get("id") in (req_id, None)


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


async def _open(
    gw: McpGateway, server: McpServerConfig, ex: Exchange, method: str, body: bytes | None, payload: Any, upstream_sid: str | None, version: str | None, last_event_id: str | None = None
) -> tuple[UpstreamTurn, aiohttp.ClientResponse]:
    """Open one upstream HTTP request as a turn of ``ex`` (a failure is kept on the turn); statuses checked."""
    turn = _turn(ex, payload, body or b"")
    try:
        resp = await gw.http[server.name].send(method, body, upstream_sid, version, ex.traceparent, last_event_id)
    except WardenError as e:
        turn.error, turn.error_kind = e.message, "timeout" if e.status == 504 else "connection"
        turn.duration_s = time.perf_counter() - turn.started
        raise
    turn.status = resp.status
    _check_status(resp)
    return turn, resp


def _check_status(resp: aiohttp.ClientResponse) -> None:
    """Upstream statuses that must not reach the caller as they are: a redirect (never followed) and a refusal
    of Warden's own credentials (the caller's client would take it for its own and start an auth flow)."""
    if 300 <= resp.status < 400:
        resp.release()
        raise UpstreamError(f"the MCP server answered {resp.status} (a redirect); Warden does not follow redirects", rule="mcp.servers.url")
    if resp.status in (401, 403):
        resp.release()
        raise UpstreamError(f"the MCP server refused Warden's credentials ({resp.status})", rule="mcp.servers.headers_env")


async def _read(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    out = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            out += chunk
            if len(out) > limit:
                raise UpstreamError(f"the MCP server's answer exceeds {limit} bytes", rule="mcp.max_message_bytes")
    except TimeoutError:
        raise UpstreamTimeout("the MCP server's answer stalled", rule="mcp.servers.timeout_s") from None
    except aiohttp.ClientError:
        raise UpstreamError("the MCP server's answer broke off", rule="mcp.upstream") from None
    return bytes(out)


def _event_id(raw: bytes) -> bytes | None:
    for line in raw.split(b"\n"):
        if line.startswith(b"id:"):
            return line[3:].strip()
    return None


async def _sse(w: Warden, gw: McpGateway, server: McpServerConfig, ex: Exchange, msg: Message | None, resp: aiohttp.ClientResponse, turn: UpstreamTurn, info: dict[str, Any]) -> AsyncIterator[bytes]:
    """The upstream's SSE stream, event by event.

    The response to the caller's request is governed before it is relayed;
    the server's own requests and notifications pass when their method is on
    the allow-list; every other message — a response to anything but this
    POST's request (on a GET stream: any response), a batch, data that is not
    JSON — is dropped and counted (``mcp.dropped`` in the record), so no
    answer reaches the caller around the filter.
    """
    parser = SSEParser(gw.cfg.max_message_bytes)
    events = 0
    dropped: dict[str, int] = {}
    answered = False
    try:
        async for chunk in resp.content.iter_any():
            for ev in parser.feed(chunk):
                events += 1
                data = ev.data
                if not data or not data.strip():
                    yield ev.raw  # a priming event (its id only) or a comment
                    continue
                try:
                    parsed = orjson.loads(data)
                except orjson.JSONDecodeError:
                    parsed = None
                why = server_message_refusal(parsed)
                if why is None and isinstance(parsed, dict) and "method" not in parsed:
                    if msg is None or msg.kind != "request" or answered or parsed.get("id") != msg.id:
                        why = "response to another request"
                    else:
                        answered = True
                        turn.response = parsed
                        answer = await _transform(w, gw, server, ex, msg, parsed, info)
                        ex.response_body = answer
                        eid = _event_id(ev.raw)
                        yield (b"id: " + eid + b"\n" if eid else b"") + b"event: message\ndata: " + orjson.dumps(answer) + b"\n\n"
                        continue
                if why is not None:
                    dropped[why] = dropped.get(why, 0) + 1
                    continue
                yield ev.raw
    except SSEError:
        turn.error, turn.error_kind = "an event exceeds max_message_bytes", "malformed"
        raise UpstreamError(f"the MCP server sent an event over {gw.cfg.max_message_bytes} bytes", rule="mcp.max_message_bytes") from None
    except TimeoutError:
        turn.error, turn.error_kind = "timeout", "timeout"
        raise UpstreamTimeout("the MCP server's stream stalled", rule="mcp.servers.timeout_s") from None
    except aiohttp.ClientError as e:
        turn.error, turn.error_kind = type(e).__name__, "connection"
        raise UpstreamError("the MCP server's stream broke off", rule="mcp.upstream") from None
    finally:
        _release_write(gw, ex)
        info["events"] = events
        if dropped:
            info["dropped"] = dropped
        turn.duration_s = time.perf_counter() - turn.started
        resp.release()


async def _get_or_delete(w: Warden, gw: McpGateway, server: McpServerConfig, req: Incoming, ex: Exchange, session: Session, method: str, version: str | None) -> Reply:
    if server.transport == "stdio":
        if method == "DELETE":
            return JsonReply(204, b"", {})
        raise McpRefusal("a stdio server has no stream of its own to open", rule="mcp.stream", status=405, headers={"Allow": "POST, DELETE"})
    last = req.headers.get("Last-Event-ID")
    if last is not None and (len(last) > 256 or not (last.isascii() and last.isprintable())):
        last = None
    turn, resp = await _open(gw, server, ex, method, None, None, session.upstream_id, version, last)
    if method == "GET" and resp.status == 200 and "text/event-stream" in resp.headers.get("Content-Type", ""):
        ex.stream = True
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        return StreamReply(200, headers, _sse(w, gw, server, ex, None, resp, turn, ex.mcp or {}), release=resp.release)
    try:
        raw = await _read(resp, gw.cfg.max_message_bytes)
    finally:
        turn.duration_s = time.perf_counter() - turn.started
        resp.release()
    if raw and not _error_only(_json_or_none(raw), None):
        # Only an error passes here: a result or a request outside the stream would escape the filter.
        (ex.mcp or {})["dropped"] = {"not a JSON-RPC error": 1}
        raw = b""
    headers = {"Content-Type": "application/json"} if raw else {}
    allow = resp.headers.get("Allow")
    if allow is not None:
        headers["Allow"] = safe_text(allow, 64)
    return JsonReply(resp.status, raw, headers)


# -- governance ---------------------------------------------------------------


async def _transform(w: Warden, gw: McpGateway, server: McpServerConfig, ex: Exchange, msg: Message, answer: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The upstream's response to the caller's request, as the caller may see it."""
    result = answer.get("result")
    if msg.method == "initialize" and isinstance(result, dict) and "instructions" in result and not server.relay_instructions:
        # Server instructions are text the model reads, from a party Warden does not trust (never pinned).
        info["instructions_dropped"] = True
        return {**answer, "result": {k: v for k, v in result.items() if k != "instructions"}}
    if msg.method == "tools/list" and isinstance(result, dict):
        return {**answer, "result": _filter_tools(w, gw, server, ex, result, info)}
    if msg.method == "tools/call":
        raw = orjson.dumps(result if result is not None else answer.get("error"))
        info["result"] = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw), "is_error": bool(isinstance(result, dict) and result.get("isError")) or "error" in answer}
        tool = info.get("tool")
        key = ex.slots.get(WRITE_KEY)
        if key is not None and isinstance(result, dict) and not info["result"]["is_error"]:
            gw.remember_write(key, ex.request_id)
        ex.tool_results.append({"tool_call_id": str(msg.id), "name": tool, "content": raw.decode()})
        deprecation = ex.slots.get(DEPRECATION)
        if deprecation is not None and isinstance(result, dict):
            # The caller learns that the version it used is going away, with the result it got.
            meta = result.get("_meta")
            return {**answer, "result": {**result, "_meta": {**(meta if isinstance(meta, dict) else {}), DEPRECATION_META: deprecation}}}
    return answer


def _filter_tools(w: Warden, gw: McpGateway, server: McpServerConfig, ex: Exchange, result: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    tools = result.get("tools")
    if not isinstance(tools, list):
        raise UpstreamError("the MCP server's tools/list result has no tools list", rule="mcp.upstream")
    shown: list[dict[str, Any]] = []
    hidden: dict[str, str] = {}
    for t in tools:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            continue
        name: str = t["name"]
        rule = _show(w, gw, server, ex, t, shown)
        if rule is not None:
            gw.hidden.labels(server.name, rule.split(".")[0] if rule.startswith("tools[") else rule).inc()
            if len(hidden) < MAX_HIDDEN_RECORDED:
                hidden[safe_text(name, 128)] = rule
    info["tools_shown"] = [t["name"] for t in shown]
    info["tools_hidden"] = hidden
    # Only the filtered tools and the page cursor: any other member (_meta, another array) is unpinned upstream text.
    cursor = result.get("nextCursor")
    return {"tools": shown, "nextCursor": cursor} if isinstance(cursor, str) else {"tools": shown}


def _show(w: Warden, gw: McpGateway, server: McpServerConfig, ex: Exchange, t: dict[str, Any], shown: list[dict[str, Any]]) -> str | None:
    """Append ``t`` (as the caller may see it) to ``shown``, or return the rule that hides it."""
    name: str = t["name"]
    offer = w.chain.offer_tool(ex, name, server.name)
    if offer is None:
        return "mcp.ungoverned"
    if not offer.allowed:
        return offer.rule
    pin = _pin_status(w, gw, server, name, tool_digest(t))
    if pin is not None:
        return pin
    # Only what is pinned or the policy's own reaches the caller: the name, the description (pinned, or the
    # policy's), the policy's schema; the upstream's title, annotations, output schema, icons and _meta do not.
    out: dict[str, Any] = {"name": name, "inputSchema": offer.schema if offer.schema is not None else t.get("inputSchema")}
    description = offer.description or t.get("description")
    if offer.deprecation is not None:
        note = str(offer.deprecation.get("note", ""))
        description = f"{note} {description}" if isinstance(description, str) and description else note
        out["_meta"] = {DEPRECATION_META: {k: v for k, v in offer.deprecation.items() if k != "note"}}
    if isinstance(description, str):
        out["description"] = description
    shown.append(out)
    return None


def _pin_status(w: Warden, gw: McpGateway, server: McpServerConfig, tool: str, digest: str) -> str | None:
    """``None`` when ``digest`` is accepted for the tool, else the rule that refuses it (first sightings recorded)."""
    gw.pins.seen[(server.name, tool)] = digest
    status = gw.pins.status(server.name, tool, digest, server.pins.get(tool))
    if status == "accepted":
        return None
    if status == "unpinned" and gw.cfg.unpinned == "accept_first":
        gw.pins.accepted[(server.name, tool)] = digest
        _note_change(w, gw, server.name, tool, digest, "mcp_pin_first_use")
        return None
    _note_change(w, gw, server.name, tool, digest, "mcp_pin_changed" if status == "changed" else "mcp_pin_unaccepted")
    return "mcp.pin" if status == "changed" else "mcp.pin.unaccepted"


def _note_change(w: Warden, gw: McpGateway, server: str, tool: str, digest: str, kind: str) -> None:
    """Audit a digest that is new to this replica once (an operator reviews it in ``GET /admin/mcp/pins``)."""
    key = (server, tool, digest)
    if key in gw.reported_changes or len(gw.reported_changes) > 10000:
        return
    gw.reported_changes.add(key)
    task = asyncio.get_running_loop().create_task(w.record_event(kind, {"subject": "warden"}, {"server": server, "tool": tool, "digest": digest}))
    gw.background.add(task)
    task.add_done_callback(gw.background.discard)


async def _judge_call(w: Warden, gw: McpGateway, server: McpServerConfig, session: Session, ex: Exchange, msg: Message, version: str | None, info: dict[str, Any]) -> dict[str, Any] | None:
    """Judge a ``tools/call``; the result to answer with when it is refused, ``None`` to relay it."""
    req_id = msg.id
    assert req_id is not None
    name = msg.params.get("name")
    args = msg.params.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise McpRefusal("tools/call needs params.name", rule="mcp.jsonrpc", rpc_code=-32602)
    offer = w.chain.offer_tool(ex, name, server.name)
    governed = offer is not None and offer.rule != "policy.unknown_tools"
    info["tool"] = safe_text(name, 128)
    info["governed"] = governed
    label = name if governed else "(undeclared)"

    def refuse(kind: str, rule: str, reason: str, approval_id: str | None = None, deprecation: Any = None) -> dict[str, Any]:
        info["decision"], info["rule"] = kind, rule
        gw.tool_calls.labels(server.name, label, kind).inc()
        meta: dict[str, Any] = {"decision": kind, "rule": rule, "request_id": ex.request_id}
        if isinstance(deprecation, dict):
            meta["deprecation"] = info["deprecation"] = deprecation
        text = f"Warden refused this call to {name!r}: {reason} (rule: {rule})"
        if approval_id is not None:
            meta["approval_id"] = approval_id
            text = f"{reason} (rule: {rule}; approval id: {approval_id}). Call the tool again with the same arguments once it is approved."
        return tool_error_result(req_id, text, meta)

    if offer is None:
        return refuse("deny", "mcp.ungoverned", "no tool policy governs MCP tools here; nothing was executed")
    call = parse_call(str(msg.id), name, orjson.dumps(args).decode() if isinstance(args, dict) else "", 0)
    call.server = server.name
    if not offer.allowed:
        # The policy's own refusal (undeclared, retired, not permitted, read-only), recorded as the judge's would be.
        deprecation = None if offer.deprecation is None else {k: v for k, v in offer.deprecation.items() if k != "note"}
        details = None if deprecation is None else {"deprecation": deprecation}
        ex.tool_decisions.append(ToolDecisionRecord(turn=0, call=call, decision=Decision("deny", offer.rule, offer.reason, details=details)))
        return refuse("deny", offer.rule, f"{offer.reason.rstrip('.')}; nothing was executed", deprecation=deprecation)
    info["effect"] = offer.effect
    digest = gw.pins.seen.get((server.name, name))
    if digest is None:
        digest = await _current_digest(gw, server, session, name, version)
    pin = _pin_status(w, gw, server, name, digest) if digest is not None else "mcp.pin.unknown"
    if pin is not None:
        why = {
            "mcp.pin": "its description or input schema changed since an operator accepted it; it stays disabled until they accept the change",
            "mcp.pin.unaccepted": "its description and input schema have not been accepted by an operator yet",
            "mcp.pin.unknown": "the server does not list it",
        }[pin]
        return refuse("deny", pin, why)
    if not isinstance(args, dict):
        return refuse("repair", "mcp.arguments", "arguments must be a JSON object; call the tool again with an object")
    canonical = _arguments_digest(args)
    if offer.effect == "write" and gw.cfg.duplicate_window_s > 0:
        key = (session.upstream_id + "\x00" + str(session.generation) + "\x00" + session.tenant + "\x00" + session.subject, f"{server.name}/{name}", canonical)
        earlier = gw.earlier_write(key)
        if earlier is not None:
            return refuse("deny", "tools.duplicate", f"this exact write call already succeeded in this session (request {earlier}); it is not executed twice. Use that result")
        if gw.reserve_write(key, server.timeout_s):
            ex.slots[WRITE_KEY] = key
        else:
            return refuse("deny", "tools.duplicate", "this exact write call is being executed in this session right now; it is not executed twice. Wait for its result")
    decision = await w.chain.judge_tool_call(ex, call)
    if decision.kind != "allow":
        _release_write(gw, ex)
    ex.tool_decisions.append(ToolDecisionRecord(turn=0, call=call, decision=decision))
    deprecation = (decision.details or {}).get("deprecation")
    if decision.kind == "allow":
        info["decision"], info["rule"] = "allow", decision.rule
        gw.tool_calls.labels(server.name, label, "allow").inc()
        if isinstance(deprecation, dict):
            ex.slots[DEPRECATION] = info["deprecation"] = deprecation
        return None
    return refuse(decision.kind, decision.rule, decision.reason, decision.approval_id if decision.kind == "hold" else None, deprecation)


def _plain_number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and abs(value) < 2**63 else value


def _arguments_digest(args: dict[str, Any]) -> str:
    """The duplicate-mutation digest of a call's arguments: sorted keys, and an integral number written as an integer,
    so ``250``, ``250.0`` and ``2.5e2`` (which the tool's schema and the upstream take alike) are one call."""
    plain = json.loads(orjson.dumps(args), parse_float=_plain_number)
    return hashlib.sha256(orjson.dumps(plain, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _release_write(gw: McpGateway, ex: Exchange) -> None:
    """The call of ``ex`` is answered (or refused, or failed): an identical call is judged on its own again."""
    key = ex.slots.get(WRITE_KEY)
    if key is not None:
        gw.writes_in_flight.pop(key, None)


async def _current_digest(gw: McpGateway, server: McpServerConfig, session: Session, name: str, version: str | None) -> str | None:
    """The digest of ``name`` as the upstream lists it now (this replica had not seen its list: ask, in the caller's session)."""
    cursor: str | None = None
    # Unique: two calls in one session list side by side, and a server routes each answer by its request's id.
    nonce = secrets.token_hex(8)
    for page in range(MAX_LIST_PAGES):
        params: dict[str, Any] = {"cursor": cursor} if cursor else {}
        msg = {"jsonrpc": "2.0", "id": f"warden-list-{nonce}-{page}", "method": "tools/list", "params": params}
        stdio = gw.stdio.get(server.name)
        if stdio is not None:
            answer: Any = await stdio.request("tools/list", params, session.generation)
        else:
            answer = await _http_call(gw, server, msg, session.upstream_id, version)
        result = answer.get("result") if isinstance(answer, dict) else None
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return None
        for t in result["tools"]:
            if isinstance(t, dict) and isinstance(t.get("name"), str):
                gw.pins.seen[(server.name, t["name"])] = tool_digest(t)
        if (server.name, name) in gw.pins.seen:
            return gw.pins.seen[(server.name, name)]
        cursor = result.get("nextCursor")
        if not isinstance(cursor, str):
            return None
    return None


async def _http_call(gw: McpGateway, server: McpServerConfig, msg: dict[str, Any], upstream_sid: str, version: str | None) -> Any:
    """One request of Warden's own to an HTTP upstream, its response read from JSON or SSE."""
    resp = await gw.http[server.name].send("POST", orjson.dumps(msg), upstream_sid, version, None)
    try:
        if resp.status >= 300:
            return None
        if "text/event-stream" in resp.headers.get("Content-Type", ""):
            parser = SSEParser(gw.cfg.max_message_bytes)
            async for chunk in resp.content.iter_any():
                for ev in parser.feed(chunk):
                    try:
                        parsed = orjson.loads(ev.data or b"")
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(parsed, dict) and parsed.get("id") == msg["id"]:
                        return parsed
            return None
        return orjson.loads(await _read(resp, gw.cfg.max_message_bytes))
    except (orjson.JSONDecodeError, SSEError, aiohttp.ClientError, TimeoutError):
        return None
    finally:
        resp.release()


__all__ = ["run", "error_message"]
