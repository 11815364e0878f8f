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

from llm_warden.proxy.app import Warden
from llm_warden.proxy.edge import Listener
from llm_warden.proxy.exchange import Exchange, Principal


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
    """A started Warden with its data and admin listeners on free loopback ports.

    The listeners are the same :class:`~proxy.edge.Listener` objects
    ``warden serve`` runs (parser errors as JSON, header and body deadlines,
    connection bounds), so in-process tests see the production HTTP edge.
    """

    warden: Warden
    data: Listener
    admin: Listener
    base_url: str
    admin_url: str

    @classmethod
    async def start(cls, warden: Warden, drain_s: float = 5.0) -> RunningWarden:
        await warden.start()
        cfg = warden.config.server
        data = Listener(warden.data_app(), "data", cfg, warden.metrics, force_grace_s=drain_s)
        admin = Listener(warden.admin_app(), "admin", cfg, warden.metrics, force_grace_s=1.0)
        await data.start("127.0.0.1", 0)
        await admin.start("127.0.0.1", 0)
        return cls(warden, data, admin, f"http://127.0.0.1:{data.port}/v1", f"http://127.0.0.1:{admin.port}")

    async def stop(self) -> None:
        self.warden.draining = True
        await self.data.cleanup()
        await self.warden.stop()
        await self.admin.cleanup()
