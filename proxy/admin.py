"""The admin plane: a separate listener for probes, metrics and the admin API.

``/healthz`` (alive), ``/readyz`` (ready and not draining) and ``/metrics``
are open, so kubelets and Prometheus can reach them.  Everything under
``/admin/`` needs an admin: a JWT with the configured admin scope (verified
like any caller's token), or the bootstrap token from the environment variable
``[admin] token_env``.  Handlers get the admin with :func:`admin_principal`.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from llm_warden.proxy.errors import Forbidden, NotFound, Unauthorized, WardenError, error_body, internal_error
from llm_warden.proxy.exchange import Principal
from llm_warden.proxy.logs import add_secret

if TYPE_CHECKING:
    from llm_warden.proxy.app import Warden

log = logging.getLogger("warden.admin")
# A typed request key (aiohttp warns about plain string keys); handlers read it through admin_principal().
ADMIN_KEY: web.RequestKey[Principal] = web.RequestKey("warden.admin", Principal)


def admin_principal(request: web.Request) -> Principal:
    """The authenticated admin of this request."""
    return request[ADMIN_KEY]


ALL_TENANTS = "*"


def admin_tenant(request: web.Request) -> str | None:
    """The one tenant this admin may manage, or ``None`` for an admin of every tenant.

    The bootstrap token (and a token whose tenant claim is ``"*"``) manages
    every tenant; an admin JWT that names a tenant manages that tenant only.
    """
    tenant = admin_principal(request).tenant
    return None if tenant == ALL_TENANTS else tenant


def require_all_tenants(request: web.Request, what: str) -> None:
    """Refuse an action that affects every tenant unless the admin manages every tenant."""
    tenant = admin_tenant(request)
    if tenant is not None:
        raise Forbidden(f"{what} affects every tenant; this admin may manage tenant {tenant!r} only", rule="admin.tenant")


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def build_admin_app(w: Warden) -> web.Application:
    bootstrap = os.environ.get(w.config.admin.token_env, "") if w.config.admin.token_env else ""
    add_secret(bootstrap)
    if bootstrap and len(bootstrap) < 24:
        log.warning("the admin bootstrap token in %s is shorter than 24 characters; ignoring it", w.config.admin.token_env)
        bootstrap = ""

    async def authenticate(request: web.Request) -> Principal:
        return await authenticate_header(request.headers.get("Authorization", ""))

    async def authenticate_header(header: str) -> Principal:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("the admin API needs a bearer token", rule="admin.auth")
        # surrogateescape: an undecodable byte in the header compares unequal instead of raising.
        if bootstrap and hmac.compare_digest(token.encode("utf-8", "surrogateescape"), bootstrap.encode("utf-8", "surrogateescape")):
            return Principal(tenant="*", subject="bootstrap-admin", scopes=frozenset({w.config.admin.scope}))
        if w.auth.mode == "none":
            raise Unauthorized("admin token not accepted", rule="admin.token_env")
        principal = await w.auth.authenticate(header)
        if w.config.admin.scope not in principal.scopes:
            raise Forbidden(f"the admin API needs scope '{w.config.admin.scope}'", rule="admin.scope")
        return principal

    @web.middleware
    async def mw(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            if request.path.startswith("/admin/"):
                request[ADMIN_KEY] = await authenticate(request)
            return await handler(request)
        except WardenError as e:
            return web.Response(status=e.status, body=error_body(e), content_type="application/json", headers=e.headers)
        except web.HTTPException as e:
            if e.status == 404:
                err: WardenError = NotFound(f"no admin route for {request.method} {request.path}", rule="admin.routes")
            elif e.status == 405:
                err = WardenError(f"method {request.method} is not allowed on {request.path}", status=405, code="method_not_allowed")
            else:
                err = WardenError(e.reason or "refused", status=e.status, code="http_error")
            return web.Response(status=err.status, body=error_body(err), content_type="application/json")
        except Exception:
            log.exception("admin request %s %s failed", request.method, request.path)
            return web.Response(status=500, body=error_body(internal_error("admin")), content_type="application/json")

    app = web.Application(middlewares=[mw], client_max_size=w.config.server.max_body_bytes)

    async def healthz(request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if w.draining:
            return json_response({"status": "draining"}, status=503)
        if not w.ready:
            return json_response({"status": "starting"}, status=503)
        if w.audit is not None and not w.audit.healthy and w.config.audit.durability == "sync":
            return json_response({"status": "audit unavailable"}, status=503)
        for plugin in w.chain.plugins:
            reason = plugin.ready()
            if reason is not None:
                return json_response({"status": "not ready", "plugin": plugin.name, "reason": reason}, status=503)
        return json_response({"status": "ready"})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=w.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def reload(request: web.Request) -> web.Response:
        require_all_tenants(request, "reloading the configuration")
        result = await w.reload()
        return json_response(result, status=200 if result["result"] == "applied" else 400)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/reload", reload)
    if w.config.admin.console:
        from llm_warden.proxy.console import add_console

        add_console(app, w, authenticate_header)
    for method, path, handler in w.admin_routes:
        if not path.startswith("/admin/"):
            raise ValueError(f"admin route {method} {path} must be under /admin/ (only /admin/ routes are authenticated)")
        app.router.add_route(method, path, handler)
    return app
