"""The data plane's routes: canonical paths and an allow-list.

A request path must already be in canonical form — ASCII, no dot segments,
no percent-encoding, no empty segment, no backslash or control character —
or it is refused with 400 (rule ``request.path``) before it is routed:
HTTP clients and the upstream client normalise such paths differently, so a
path forwarded "as is" could reach another provider endpoint than the one
Warden routed on.  The upstream path is then built from the matched route,
never from the client's bytes.

Routes are an allow-list: the governed ones (``chat``, ``messages`` — the
Anthropic Messages API — and ``responses`` — the OpenAI Responses API —, both
served by the chat flow through their protocol adapters, ``embeddings``, ``models``, ``feedback``;
``messages.count_tokens`` only over a provider that speaks the Messages API) plus the pass-through routes an operator lists in
``[server] passthrough_routes`` and, for each configured MCP server
(``[[mcp.servers]]``), ``/mcp/{name}`` served by the MCP flow
(:mod:`proxy.mcp.flow`).  Every other path is refused with 404 (rule
``server.routes``); a known path with another method with 405.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llm_warden.proxy.errors import ConfigError

# RFC 3986 unreserved characters and the sub-delimiters an API path uses; no '%', no '/' inside a segment.
_SEGMENT = re.compile(r"^[A-Za-z0-9._~:@!$&'()*+,;=-]+$")
_PLACEHOLDER = re.compile(r"^\{([a-z_][a-z0-9_]{0,31})\}$")
# What a ``{name}`` placeholder may match: one id-like segment.
_PARAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$")
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
MAX_PATH_BYTES = 2048

UNGOVERNED = {
    "/v1/responses/input_tokens": "Warden cannot count tokens for the provider's model faithfully (an OpenAI-compatible upstream has no token-counting endpoint)",
    "/v1/responses/compact": "compaction runs on the provider's servers and returns encrypted items only it can read",
    "/v1/responses/": "Warden keeps no responses on any server: retrieving, deleting, cancelling a response or listing its input items needs provider-side state",
    "/v1/conversations": "the Conversations API keeps conversation state on the provider's servers; Warden is stateless toward the provider",
    "/v1/assistants": "the Assistants API is not governed by this Warden",
    "/v1/threads": "the Assistants API is not governed by this Warden",
    "/v1/realtime": "the Realtime API is not governed by this Warden",
    "/v1/messages/batches": "the Message Batches API is not governed by this Warden (its requests run on the provider's side, out of the tool fence)",
    "/v1/messages/count_tokens": "Warden cannot count tokens for the provider's model faithfully (an OpenAI-compatible upstream has no token-counting endpoint; an Anthropic upstream, [upstream] api = \"anthropic\", has)",
}
"""Provider APIs refused by name: they carry tool calls or state that Warden cannot fence.

A key ending in ``/`` names only the paths below it (``/v1/responses`` itself is governed)."""


def path_error(path: str) -> str | None:
    """Why ``path`` (the raw path, without the query) is not canonical, or ``None``."""
    if len(path) > MAX_PATH_BYTES:
        return f"the path is longer than {MAX_PATH_BYTES} bytes"
    if not path.startswith("/"):
        return "the path must start with '/'"
    if path == "/":
        return None
    if not path.isascii():
        return "the path must be ASCII"
    segments = path[1:].split("/")
    for seg in segments:
        if seg == "":
            return "the path has an empty segment ('//' or a trailing '/')"
        if seg in (".", ".."):
            return "the path has a dot segment"
        if not _SEGMENT.match(seg):
            if "%" in seg:
                return "the path has percent-encoded characters"
            return "the path has characters outside the allowed set"
    return None


@dataclass(frozen=True, slots=True)
class Route:
    """One allowed route.

    ``flow`` names the core flow that serves it (``chat``, ``relay``,
    ``feedback``); ``name`` is the bounded route label used in metrics, traces
    and the audit record; ``protocol`` names the adapter that parses its
    requests and renders its replies and errors (:mod:`proxy.protocols`);
    ``parse_json`` says whether the body must be a JSON object.
    """

    method: str
    template: str
    name: str
    flow: str
    protocol: str
    parse_json: bool
    segments: tuple[str, ...] = field(default=())

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.segments, parts, strict=True):
            m = _PLACEHOLDER.match(want)
            if m is None:
                if want != got:
                    return None
            elif _PARAM.match(got):
                params[m.group(1)] = got
            else:
                return None
        return params

    def upstream_path(self, params: dict[str, str]) -> str:
        """The provider path (below the base URL's ``/v1``), built from the template and the matched parameters."""
        out = []
        for seg in self.segments[1:]:
            m = _PLACEHOLDER.match(seg)
            out.append(params[m.group(1)] if m else seg)
        return "/" + "/".join(out)


def _route(method: str, template: str, name: str, flow: str, protocol: str, parse_json: bool) -> Route:
    return Route(method, template, name, flow, protocol, parse_json, tuple(template[1:].split("/")))


def parse_route_spec(spec: str, key: str) -> Route:
    """A ``"METHOD /v1/path"`` pass-through route from config; raises ``ConfigError`` naming ``key``."""
    if not isinstance(spec, str):
        raise ConfigError(key, "must be a string 'METHOD /v1/path'")
    parts = spec.split()
    if len(parts) != 2:
        raise ConfigError(key, f"expected 'METHOD /v1/path', got {spec!r}")
    method, template = parts[0].upper(), parts[1]
    if method not in _METHODS:
        raise ConfigError(key, f"method must be one of {', '.join(sorted(_METHODS))}")
    if not template.startswith("/v1/"):
        raise ConfigError(key, "the path must start with /v1/")
    for seg in template[1:].split("/"):
        if not (_PLACEHOLDER.match(seg) or (_SEGMENT.match(seg) and seg not in (".", ".."))):
            raise ConfigError(key, f"segment {seg!r} is neither a plain path segment nor a {{name}} placeholder")
    plain = "/".join(s for s in template.split("/"))
    for governed in (r.template for r in CORE_ROUTES):
        if plain == governed:
            raise ConfigError(key, f"{governed} is a governed route; it cannot be a pass-through")
    if plain.startswith("/v1/messages/"):
        raise ConfigError(key, "paths under /v1/messages belong to the Anthropic Messages API; they cannot be a pass-through")
    reason = ungoverned_reason(plain)
    if reason is not None:
        raise ConfigError(key, f"{plain} cannot be a pass-through: {reason}")
    name = "passthrough " + method + " " + template
    return _route(method, template, name, "relay", "passthrough", False)


CORE_ROUTES: tuple[Route, ...] = (
    _route("POST", "/v1/chat/completions", "chat", "chat", "openai.chat", True),
    _route("POST", "/v1/messages", "messages", "chat", "anthropic.messages", True),
    _route("POST", "/v1/responses", "responses", "chat", "openai.responses", True),
    _route("POST", "/v1/embeddings", "embeddings", "relay", "openai.embeddings", True),
    _route("GET", "/v1/models", "models", "relay", "openai.models", False),
    _route("POST", "/v1/feedback", "feedback", "feedback", "warden.feedback", True),
)


NATIVE_ANTHROPIC_ROUTES: tuple[Route, ...] = (
    _route("POST", "/v1/messages/count_tokens", "messages.count_tokens", "count_tokens", "anthropic.count_tokens", True),
)
"""Routes governed only over a provider that speaks the Anthropic Messages API (``[upstream] api = "anthropic"``);
otherwise they stay refused by name (:data:`UNGOVERNED`)."""


def mcp_routes(server: str) -> tuple[Route, ...]:
    """The Streamable HTTP endpoint of one configured MCP server (``[[mcp.servers]]``): messages in
    (POST), the server's stream (GET), the end of a session (DELETE); one route name ``mcp {server}``."""
    template, name = f"/mcp/{server}", f"mcp {server}"
    return (
        _route("POST", template, name, "mcp", "mcp", True),
        _route("GET", template, name, "mcp", "mcp", False),
        _route("DELETE", template, name, "mcp", "mcp", False),
    )


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    params: dict[str, str]


class RouteTable:
    """The allow-list, compiled once per config: exact paths in a dict, templates scanned."""

    def __init__(self, extra: list[str], native_anthropic: bool = False, mcp_servers: tuple[str, ...] = ()) -> None:
        self.routes: list[Route] = list(CORE_ROUTES) + (list(NATIVE_ANTHROPIC_ROUTES) if native_anthropic else [])
        for i, spec in enumerate(extra):
            self.routes.append(parse_route_spec(spec, f"server.passthrough_routes[{i}]"))
        for server in mcp_servers:
            self.routes.extend(mcp_routes(server))
        self._exact: dict[str, dict[str, Route]] = {}
        self._templated: list[Route] = []
        for r in self.routes:
            if "{" in r.template:
                self._templated.append(r)
            else:
                self._exact.setdefault(r.template, {})[r.method] = r

    def lookup(self, method: str, path: str) -> Match | list[str] | None:
        """The route for ``method path``; the allowed methods when only the method differs; ``None`` for no route."""
        by_method = self._exact.get(path)
        if by_method is not None:
            r = by_method.get(method)
            return Match(r, {}) if r is not None else sorted(by_method)
        parts = path[1:].split("/")
        allowed: list[str] = []
        for r in self._templated:
            params = r.match(parts)
            if params is not None:
                if r.method == method:
                    return Match(r, params)
                allowed.append(r.method)
        return sorted(set(allowed)) or None


def ungoverned_reason(path: str) -> str | None:
    """Why a provider API under ``path`` is refused by name, or ``None``."""
    for prefix, why in UNGOVERNED.items():
        if path.startswith(prefix) if prefix.endswith("/") else (path == prefix or path.startswith(prefix + "/")):
            return why
    return None
