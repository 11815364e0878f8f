"""MCP gateway overhead: the same MCP messages sent to an upstream MCP server directly and through Warden.

    python bench/mcp.py                      # defaults: 500 messages per cell, 3 interleaved rounds
    python bench/mcp.py --requests 2000 --json

Processes (all on loopback): a real MCP server built with the official SDK
(the test suite's, Streamable HTTP, stateful) and ``warden serve`` with JWT
auth (RS256), the ``tools`` plugin and the MCP gateway in front of it.  One
session each; the load generator sends ``tools/list`` and ``tools/call`` (a
read tool) one at a time (concurrency 1) and reports p50/p99 latency and the
latency Warden adds (pipeline, policy filter or judge, sealing, audit).
``--json`` makes the upstream answer with JSON instead of an SSE stream;
``--audit sync|batch|off`` sets Warden's audit durability.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.overhead import AUD, ISS, free_port, pct, spawn, wait_up  # noqa: E402

UPSTREAM = """
import sys, uvicorn
from tests.proxy.mcp.upstream_server import SideEffects, build_server
app = build_server(SideEffects()).streamable_http_app(json_response=sys.argv[2] == "json")
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}}


async def session(s: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> dict[str, str]:
    async with s.post(url, data=orjson.dumps(INIT), headers=headers) as r:
        await r.read()
        h = {**headers, "Mcp-Session-Id": r.headers["Mcp-Session-Id"], "MCP-Protocol-Version": "2025-11-25"}
    async with s.post(url, data=orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}), headers=h) as r:
        await r.read()
    return h


async def run(s: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict[str, object], n: int) -> list[float]:
    out = []
    for i in range(n):
        data = orjson.dumps({**body, "id": i + 1})
        t = time.perf_counter()
        async with s.post(url, data=data, headers=headers) as r:
            raw = await r.read()
            if r.status != 200 or b'"error"' in raw[:200] or b'"isError":true' in raw:
                raise RuntimeError(f"{url}: {r.status} {raw[:300]!r}")
        out.append(time.perf_counter() - t)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="the upstream answers with JSON, not SSE")
    ap.add_argument("--audit", choices=["sync", "batch", "off"], default="sync", help="Warden's audit durability (off: no audit log)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="warden-bench-mcp-"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp / "pub.pem").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    token = jwt.encode({"iss": ISS, "aud": AUD, "sub": "bench", "tenant": "acme", "exp": int(time.time()) + 3600}, priv, algorithm="RS256")
    uport, wport, aport = free_port(), free_port(), free_port()
    (tmp / "config.toml").write_text(
        f"""
[server]
listen = "127.0.0.1:{wport}"
admin_listen = "127.0.0.1:{aport}"
[auth]
algorithms = ["RS256"]
issuer = "{ISS}"
audience = "{AUD}"
public_key_file = "{tmp / 'pub.pem'}"
[audit]
enabled = {"false" if args.audit == "off" else "true"}
durability = "{"batch" if args.audit == "batch" else "sync"}"
path = "{tmp / 'audit.db'}"
[logging]
access_log = false
level = "warning"
[plugins]
enabled = ["tools"]
[policy]
read_only = false
state_db = "{tmp / 'state.db'}"
[mcp]
unpinned = "accept_first"
pin_db = "{tmp / 'pins.db'}"
[[mcp.servers]]
name = "crm"
url = "http://127.0.0.1:{uport}/mcp"
[[tools]]
server = "crm"
name = "lookup"
effect = "read"
schema = {{ type = "object", required = ["order_id"], additionalProperties = false, properties = {{ order_id = {{ type = "string" }} }} }}
"""
    )
    procs = [
        spawn([sys.executable, "-c", UPSTREAM, str(uport), "json" if args.json else "sse"]),
        spawn([sys.executable, "-m", "llm_warden.proxy", "serve", "--config", str(tmp / "config.toml")]),
    ]
    try:
        await wait_up(f"http://127.0.0.1:{aport}/readyz")
        await asyncio.sleep(0.5)
        direct_url, warden_url = f"http://127.0.0.1:{uport}/mcp", f"http://127.0.0.1:{wport}/mcp/crm"
        cells = {
            "tools/list": {"jsonrpc": "2.0", "method": "tools/list"},
            "tools/call": {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "lookup", "arguments": {"order_id": "o-1"}}},
        }
        async with aiohttp.ClientSession() as s:
            direct_h = await session(s, direct_url, HEADERS)
            warden_h = await session(s, warden_url, {**HEADERS, "Authorization": f"Bearer {token}"})
            print(f"upstream answers with {'JSON' if args.json else 'SSE'}; audit {args.audit}; {args.requests} messages per cell, concurrency 1, median of {args.rounds} rounds")
            print(f"{'message':<12} {'path':<8} {'p50 ms':>8} {'p99 ms':>8} {'added p50 ms':>13}")
            for label, body in cells.items():
                await run(s, direct_url, direct_h, body, 50)
                await run(s, warden_url, warden_h, body, 50)
                d_rounds, w_rounds = [], []
                for _ in range(args.rounds):
                    d_rounds.append(await run(s, direct_url, direct_h, body, args.requests))
                    w_rounds.append(await run(s, warden_url, warden_h, body, args.requests))
                d50 = statistics.median(pct(r, 0.5) for r in d_rounds) * 1000
                w50 = statistics.median(pct(r, 0.5) for r in w_rounds) * 1000
                d99 = statistics.median(pct(r, 0.99) for r in d_rounds) * 1000
                w99 = statistics.median(pct(r, 0.99) for r in w_rounds) * 1000
                print(f"{label:<12} {'direct':<8} {d50:>8.2f} {d99:>8.2f} {'':>13}")
                print(f"{label:<12} {'warden':<8} {w50:>8.2f} {w99:>8.2f} {w50 - d50:>13.2f}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
