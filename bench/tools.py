"""Tool-call fencing cost: a response with 8 parallel tool calls, judged by the
``tools`` plugin vs passed through unjudged — side by side, in one run.

    python bench/tools.py                    # defaults: 300 requests per cell, 3000 in-process iterations
    python bench/tools.py --requests 2000 --iterations 20000
    python bench/tools.py --rules 4 --requests 0   # each tool with 4 argument rules; in process only

Two measurements:

1. **in process** — the work Warden adds per response when the tools plugin
   is on: assembling the calls (from the message, or from the streamed deltas
   split the way the fake provider splits them), judging all 8 (unknown tool,
   permission, read-only, JSON, schema, argument rules with ``--rules N``,
   duplicates, rate limit) and, when streaming, re-emitting them as one delta.  The pass-through path does none
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

from llm_warden.plugins.tools import ToolsPlugin  # noqa: E402
from llm_warden.proxy import tooling  # noqa: E402
from llm_warden.proxy.app import Warden  # noqa: E402
from llm_warden.proxy.config import load_config  # noqa: E402
from llm_warden.proxy.exchange import Exchange, Principal, UpstreamTurn  # noqa: E402
from llm_warden.proxy.plugin import PluginChain, PluginContext  # noqa: E402
from llm_warden.proxy.testing import RunningWarden  # noqa: E402
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
OFFERED_NAMES = frozenset(t["name"] for t in TOOLS)


def with_rules(n: int) -> list[dict[str, Any]]:
    """TOOLS, each with ``n`` argument rules that are all evaluated: ``n - 1`` denials that do not match, then an allow that does."""
    if n <= 0:
        return TOOLS
    deny = [{"name": f"over_{k}", "decision": "deny", "when": {"properties": {"amount": {"exclusiveMinimum": 20000 + k}}}} for k in range(n - 1)]
    allow = {"name": "known_reason", "decision": "allow", "when": {"properties": {"reason": {"enum": ["duplicate", "fraud", "customer_request", "other"]}}}}
    return [{**t, "rules": [*deny, allow], "rules_default": "deny"} for t in TOOLS]
PRINCIPAL = Principal(tenant="acme", subject="alice", groups=frozenset({"billing"}))


def config(state_dir: str, tools_on: bool, upstream: str = "http://127.0.0.1:1/v1", rules: int = 0) -> Any:
    return load_config(
        {
            "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:1"},
            "upstream": {"base_url": upstream, "api_key_env": "", "max_retries": 0},
            "auth": {"mode": "none", "dev_groups": ["billing"]},
            "audit": {"enabled": False},
            "logging": {"access_log": False},
            "plugins": {"enabled": ["tools"] if tools_on else []},
            "policy": {"state_db": f"{state_dir}/state.db", "read_only": False, "mode_refresh_s": 0},
            "tools": with_rules(rules),
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


async def in_process(state_dir: str, iterations: int, rules: int) -> dict[str, list[float]]:
    cfg = config(state_dir, True, rules=rules)
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
            ex.tools_offered = OFFERED_NAMES  # what the pipeline sets after the request hooks
            calls = tooling.calls_from_message(message)
            decisions = await tooling.judge(chain, ex, calls, 0)
            t2 = time.perf_counter()
            assert all(d.kind == "allow" for d in decisions), decisions
            await plugin.on_complete(ex)
            ex = Exchange(request_id=f"s{n}", route="chat", method="POST", path="/v1/chat/completions", principal=PRINCIPAL, body=body)
            ex.turns.append(UpstreamTurn(index=0, body=b""))
            ex.tools_offered = OFFERED_NAMES
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


async def end_to_end(state_dir: str, requests: int, rules: int) -> dict[tuple[bool, bool], list[float]]:
    fake = FakeProvider()
    await fake.start()
    out: dict[tuple[bool, bool], list[float]] = {}
    wardens: dict[bool, RunningWarden] = {}
    try:
        for tools_on in (False, True):
            wardens[tools_on] = await RunningWarden.start(Warden(config(state_dir, tools_on, fake.base_url, rules), {"tools": ToolsPlugin}))
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
    ap.add_argument("--rules", type=int, default=0, help="argument rules per tool, all evaluated (0: none)")
    args = ap.parse_args()
    logging.getLogger("warden").setLevel(logging.ERROR)  # auth is off on purpose here; skip the warning
    with tempfile.TemporaryDirectory() as d:
        ip = await in_process(d, args.iterations, args.rules)
        e2e = await end_to_end(d, args.requests, args.rules) if args.requests > 0 else {}
    us = 1e6
    print(f"\ntools plugin, response with 8 parallel tool calls (4 read, 4 write; all allowed; {args.rules} argument rules per tool)\n")
    print(f"in process, {args.iterations} iterations (µs per response; the pass-through path does none of this work)\n")
    print("| work added by the tools plugin | p50 | p99 | mean |")
    print("|---|---|---|---|")
    for label, key in (("on_request (8 offered tools)", "request"), ("non-streamed: parse + judge 8 calls", "nonstream"), ("streamed: assemble deltas + judge + re-emit", "stream")):
        xs = ip[key]
        print(f"| {label} | {pct(xs, 0.5) * us:.1f} | {pct(xs, 0.99) * us:.1f} | {statistics.fmean(xs) * us:.1f} |")
    if not e2e:
        return
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
