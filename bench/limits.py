"""Benchmark: what the limits plugin adds per request, memory vs Redis vs limits off.

Each request matches 3 rules (tenant requests + tokens, user requests,
tenant+model requests: 4 buckets in one decision) and carries a small chat
body whose prompt is counted by the tokenizer.  Measured at the hooks, with no
network but Redis' own:

- added p50/p99: ``on_request`` (the decision, on the request path), one
  request at a time;
- decisions/s: ``on_request`` + ``on_complete`` (with token reconciliation),
  ``--concurrency`` requests in flight.

Run:  python bench/limits.py [--requests 5000] [--concurrency 32] [--redis-url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from llm_warden.plugins.ratelimit.config import LimitsConfig
from llm_warden.plugins.ratelimit.plugin import LimitsPlugin
from llm_warden.proxy.config import Config
from llm_warden.proxy.confload import load_dataclass
from llm_warden.proxy.exchange import Exchange, Principal, UpstreamTurn
from llm_warden.proxy.plugin import PluginContext

RULES = [
    {"scope": "tenant", "requests": "1000000/minute", "tokens": "1000000/second"},
    {"scope": "user", "requests": "1000000/minute"},
    {"scope": "tenant+model", "requests": "1000000/minute"},
]
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is GCRA?"}],
    "max_tokens": 64,
}
RAW = orjson.dumps(BODY)
USAGE = {"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50}


def exchange(i: int) -> Exchange:
    ex = Exchange(request_id=f"req_{i}", route="chat", method="POST", path="/v1/chat/completions")
    ex.principal = Principal(tenant=f"t{i % 10}", subject=f"u{i % 100}", groups=frozenset({"staff"}))
    ex.raw_body, ex.body, ex.model = RAW, BODY, "gpt-4o-mini"
    return ex


def complete(ex: Exchange) -> None:
    ex.turns.append(UpstreamTurn(index=0, body=RAW, status=200))
    ex.status, ex.usage = 200, USAGE


async def make(section: dict[str, Any] | None, tmp: Path) -> LimitsPlugin | None:
    if section is None:
        return None
    cfg = load_dataclass(LimitsConfig, {"idempotency_db": str(tmp / f"{uuid.uuid4().hex}.db"), **section}, "limits")
    p = LimitsPlugin(cfg)
    await p.start(PluginContext(config=Config(base_dir=tmp), section=cfg, services={}))
    return p


async def latency(p: LimitsPlugin | None, n: int) -> list[float]:
    out: list[float] = []
    for i in range(n):
        ex = exchange(i)
        t0 = time.perf_counter()
        if p is not None:
            await p.on_request(ex)
        t1 = time.perf_counter()
        out.append(t1 - t0)
        complete(ex)
        if p is not None:
            await p.on_complete(ex)
    return out


async def throughput(p: LimitsPlugin | None, n: int, concurrency: int) -> float:
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            ex = exchange(i)
            if p is not None:
                await p.on_request(ex)
            complete(ex)
            if p is not None:
                await p.on_complete(ex)
            else:
                await asyncio.sleep(0)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return n / (time.perf_counter() - t0)


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000, help="requests per measurement (default 5000)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()
    prefix = f"wbench:{uuid.uuid4().hex[:8]}:"
    configs: list[tuple[str, dict[str, Any] | None]] = [
        ("limits off", None),
        ("memory", {"backend": "memory", "rules": RULES}),
        ("redis", {"backend": "redis", "redis_url": args.redis_url, "key_prefix": prefix, "rules": RULES}),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, section in configs:
            p = await make(section, tmp)
            try:
                await latency(p, min(500, args.requests))  # warm up (script load, tokenizer, pools)
                lat = await latency(p, args.requests)
                rate = await throughput(p, args.requests, args.concurrency)
                if p is not None and not p.backend_up:
                    raise SystemExit(f"{name}: backend is down ({args.redis_url})")
            finally:
                if p is not None:
                    if p.redis is not None:
                        keys = [k async for k in p.redis.redis.scan_iter(match=f"{prefix}*", count=1000)]
                        if keys:
                            await p.redis.redis.delete(*keys)
                    await p.stop()
            rows.append((name, rate, pct(lat, 50) * 1e3, pct(lat, 99) * 1e3))
    base50, base99 = rows[0][2], rows[0][3]
    print(f"limits: 3 rules (4 buckets) per request, {args.requests} requests, concurrency {args.concurrency}")
    print(f"{'backend':<12} {'decisions/s':>12} {'p50 ms':>9} {'p99 ms':>9} {'added p50 ms':>13} {'added p99 ms':>13}")
    for name, rate, p50, p99 in rows:
        print(f"{name:<12} {rate:>12,.0f} {p50:>9.4f} {p99:>9.4f} {p50 - base50:>13.4f} {p99 - base99:>13.4f}")


if __name__ == "__main__":
    asyncio.run(main())
