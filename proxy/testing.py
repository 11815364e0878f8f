"""Helpers to drive Warden and its plugins in tests and benchmarks.

- :func:`make_exchange` builds an Exchange as the data plane would, so a plugin
  hook can be called directly with no network.
- :class:`RunningWarden` runs a :class:`~proxy.app.Warden` on loopback ports
  (both listeners) inside the current event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.app import Warden
from proxy.exchange import Exchange, Principal


def make_exchange(
    body: dict[str, Any] | None = None,
    *,
    principal: Principal | None = None,
    route: str = "chat",
    headers: dict[str, str] | None = None,
    request_id: str = "req_test",
) -> Exchange:
    """An Exchange as the data plane builds it after auth and parsing."""
    ex = Exchange(request_id=request_id, route=route, method="POST", path="/v1/chat/completions")
    ex.principal = principal or Principal(tenant="acme", subject="alice", groups=frozenset({"staff"}), scopes=frozenset())
    ex.request_headers = {k.lower(): v for k, v in (headers or {}).items()}
    if body is not None:
        ex.raw_body = orjson.dumps(body)
        ex.body = body
        ex.model = body.get("model") if isinstance(body.get("model"), str) else None
        ex.stream = bool(body.get("stream"))
    ex.trace_id = "0" * 31 + "1"
    return ex


@dataclass
class RunningWarden:
    """A started Warden with its data and admin listeners on free loopback ports."""

    warden: Warden
    data_runner: web.AppRunner
    admin_runner: web.AppRunner
    base_url: str
    admin_url: str

    @classmethod
    async def start(cls, warden: Warden, drain_s: float = 5.0) -> RunningWarden:
        await warden.start()
        data = web.AppRunner(warden.data_app(), access_log=None, shutdown_timeout=drain_s)
        admin = web.AppRunner(warden.admin_app(), access_log=None, shutdown_timeout=1.0)
        await data.setup()
        await admin.setup()
        await web.TCPSite(data, "127.0.0.1", 0).start()
        await web.TCPSite(admin, "127.0.0.1", 0).start()
        dport = data.addresses[0][1]
        aport = admin.addresses[0][1]
        return cls(warden, data, admin, f"http://127.0.0.1:{dport}/v1", f"http://127.0.0.1:{aport}")

    async def stop(self) -> None:
        self.warden.draining = True
        await self.data_runner.cleanup()
        await self.warden.stop()
        await self.admin_runner.cleanup()
