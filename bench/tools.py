"""Tool-call fencing cost: a response with 8 parallel tool calls, judged by the
``tools`` plugin vs passed through unjudged — side by side, in one run.

    python bench/tools.py                    # defaults: 300 requests per cell, 3000 in-process iterations
    python bench/tools.py --requests 2000 --iterations 20000

Two measurements:

1. **in process** — the work Warden adds per response when the tools plugin
   is on: assembling the calls (from the message, or from the streamed deltas
   split the way the fake provider splits them), judging all 8 (unknown tool,
   permission, read-only, JSON, schema, duplicates, rate limit) and, when
   streaming, re-emitting them as one delta.  The pass-through path does none
   of this, so this *is* the added latency.
2. **end to end** — Warden (in this process, auth off) in front of the fake
   provider scripted to answer with the same 8 calls, with and without the
   tools plugin, non-streamed and streamed, concurrency 1.  The difference of
   the p50s is the added latency as a client sees it (noisier: it includes
   scheduling of three servers on one event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from plugins.tools import ToolsPlugin  # noqa: E402
from proxy import tooling  # noqa: E402
from proxy.app import Warden  # noqa: E402
from proxy.config import load_config  # noqa: E402
from proxy.exchange import Exchange, Principal, UpstreamTurn  # noqa: E402
from proxy.plugin import PluginChain, PluginContext  # noqa: E402
from proxy.testing import RunningWarden  # noqa: E402
from tests.fakeprovider import FakeProvider, Reply  # noqa: E402


def _schema(i: int) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["invoice_id", "amount", "reason"],
        "additionalProperties": False,
        "properties": {
            "invoice_id": {"type": "string", "minLength": 1, "maxLength": 64},
            "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 10000 + i},
            "reason": {"enum": ["duplicate", "fraud", "customer_request", "other"]},
        },
    }


TOOLS = [
    {"name": f"tool_{i}", "effect": "write" if i % 2 else "read", "allow_groups": ["billing"], "rate_limit": "1000000/second", "schema": _schema(i)}
    for i in range(8)
]
CALLS = [{"id": f"call_{i}", "name": f"tool_{i}", "arguments": orjson.dumps({"invoice_id": f"inv_{i}", "amount": 10 + i, "reason": "other"}).decode()} for i in range(8)]
OFFERED = [{"type": "function", "function": {"name": t["name"], "parameters": t["schema"]}} for t in TOOLS]
PRINCIPAL = Principal(tenant="acme", subject="alice", groups=frozenset({"billing"}))


def config(state_dir: str, tools_on: bool, upstream: str = "http://127.0.0.1:1/v1") -> Any:
    return load_config(
        {
            "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:1"},
            "upstream": {"base_url": upstream, "api_key_env": "", "max_retries": 0},
            "auth": {"mode": "none", "dev_groups": ["billing"]},
            "audit": {"enabled": False},
            "logging": {"access_log": False},
            "plugins": {"enabled": ["tools"] if tools_on else []},
            "policy": {"state_db": f"{state_dir}/state.db", "read_only": False, "mode_refresh_s": 0},
            "tools": TOOLS,
        },
        {"tools": ToolsPlugin},
    )


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def stream_deltas() -> list[list[dict[str, Any]]]:
    """The delta lists a provider streams for CALLS (name first, arguments in thirds)."""
    out: list[list[dict[str, Any]]] = []
    for i, c in enumerate(CALLS):
        out.append([{"index": i, "id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": ""}}])
        args = c["arguments"]
        step = max(1, len(args) // 3)
        for j in range(0, len(args), step):
            out.append([{"index": i, "function": {"arguments": args[j : j + step]}}])
    return out


async def in_process(state_dir: str, iterations: int) -> dict[str, list[float]]:
    cfg = config(state_dir, True)
    plugin = ToolsPlugin(cfg.plugin_sections["policy"])
    await plugin.start(PluginContext(config=cfg, section=cfg.plugin_sections["policy"], services={}))
    chain = PluginChain([plugin])
    message = {"role": "assistant", "content": None, "tool_calls": [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in CALLS]}
    deltas = stream_deltas()
    body = {"model": "m", "messages": [{"role": "user", "content": "refund"}], "tools": OFFERED}
    res: dict[str, list[float]] = {"request": [], "nonstream": [], "stream": []}
    try:
        for n in range(iterations):
            ex = Exchange(request_id=f"r{n}", route="chat", method="POST", path="/v1/chat/completions", principal=PRINCIPAL, body=body)
            ex.turns.append(UpstreamTurn(index=0, body=b""))
            t0 = time.perf_counter()
            await chain.run_request(ex)
            t1 = time.perf_counter()
            calls = tooling.calls_from_message(message)
            decisions = await tooling.judge(chain, ex, calls, 0)
            t2 = time.perf_counter()
            assert all(d.kind == "allow" for d in decisions), decisions
            await plugin.on_complete(ex)
            ex = Exchange(request_id=f"s{n}", route="chat", method="POST", path="/v1/chat/completions", principal=PRINCIPAL, body=body)
            ex.turns.append(UpstreamTurn(index=0, body=b""))
            t3 = time.perf_counter()
            sc = tooling.StreamedCalls()
            for d in deltas:
                sc.add(d)
            calls = sc.calls()
            decisions = await tooling.judge(chain, ex, calls, 0)
            orjson.dumps({"choices": [{"index": 0, "delta": {"tool_calls": tooling.tool_call_deltas(calls)}}]})
            t4 = time.perf_counter()
            assert all(d.kind == "allow" for d in decisions)
            await plugin.on_complete(ex)
            res["request"].append(t1 - t0)
            res["nonstream"].append(t2 - t1)
            res["stream"].append(t4 - t3)
    finally:
        await plugin.stop()
    return res


async def end_to_end(state_dir: str, requests: int) -> dict[tuple[bool, bool], list[float]]:
    fake = FakeProvider()
    await fake.start()
    out: dict[tuple[bool, bool], list[float]] = {}
    wardens: dict[bool, RunningWarden] = {}
    try:
        for tools_on in (False, True):
            wardens[tools_on] = await RunningWarden.start(Warden(config(state_dir, tools_on, fake.base_url), {"tools": ToolsPlugin}))
        async with aiohttp.ClientSession() as session:
            for stream in (False, True):
                body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "refund"}], "tools": OFFERED, "stream": stream})
                for tools_on in (False, True):
                    out[(stream, tools_on)] = []
                # interleave the two paths so drift hits both alike
                for i in range(requests + 20):
                    for tools_on in (False, True):
                        fake.push(Reply(content=None, tool_calls=CALLS))
                        fake.requests.clear()
                        t0 = time.perf_counter()
                        async with session.post(wardens[tools_on].base_url + "/chat/completions", data=body, headers={"Content-Type": "application/json"}) as r:
                            await r.read()
                            assert r.status == 200, await r.text()
                        if i >= 20:
                            out[(stream, tools_on)].append(time.perf_counter() - t0)
    finally:
        for rw in wardens.values():
            await rw.stop()
        await fake.stop()
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="end-to-end requests per cell")
    ap.add_argument("--iterations", type=int, default=3000, help="in-process iterations")
    args = ap.parse_args()
    logging.getLogger("warden").setLevel(logging.ERROR)  # auth is off on purpose here; skip the warning
    with tempfile.TemporaryDirectory() as d:
        ip = await in_process(d, args.iterations)
        e2e = await end_to_end(d, args.requests)
    us = 1e6
    print("\ntools plugin, response with 8 parallel tool calls (4 read, 4 write; all allowed)\n")
    print(f"in process, {args.iterations} iterations (µs per response; the pass-through path does none of this work)\n")
    print("| work added by the tools plugin | p50 | p99 | mean |")
    print("|---|---|---|---|")
    for label, key in (("on_request (8 offered tools)", "request"), ("non-streamed: parse + judge 8 calls", "nonstream"), ("streamed: assemble deltas + judge + re-emit", "stream")):
        xs = ip[key]
        print(f"| {label} | {pct(xs, 0.5) * us:.1f} | {pct(xs, 0.99) * us:.1f} | {statistics.fmean(xs) * us:.1f} |")
    print(f"\nend to end through Warden, {args.requests} requests per cell, concurrency 1 (ms)\n")
    print("| response | pass-through p50 / p99 | tools plugin p50 / p99 | added p50 |")
    print("|---|---|---|---|")
    for stream in (False, True):
        a, b = e2e[(stream, False)], e2e[(stream, True)]
        print(
            f"| {'streamed' if stream else 'non-streamed'} | {pct(a, 0.5) * 1e3:.3f} / {pct(a, 0.99) * 1e3:.3f} | "
            f"{pct(b, 0.5) * 1e3:.3f} / {pct(b, 0.99) * 1e3:.3f} | {(pct(b, 0.5) - pct(a, 0.5)) * 1e3:+.3f} |"
        )
    print("\ngoal: under 0.2 ms p50 added per response")


if __name__ == "__main__":
    asyncio.run(main())
