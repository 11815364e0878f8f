"""The HTTP edge under slow clients: does the normal path keep its latency while slowloris connections are held?

    .venv/bin/python -m bench.edge [--slow 200] [--phase-s 12] [--concurrency 8]

Everything runs on loopback, each part in its own process: a fake provider,
``warden serve`` (audit off, one plugin), the load (a few keep-alive clients
sending chat completions back to back, in this process) and N slowloris
clients that open a connection, send the start of a request and then one
byte a second; when Warden answers (408 at ``header_timeout_s``) or refuses
(503 at ``max_connections``) they reconnect at once, as an attacker would.

Rows:

- ``baseline``: the normal load alone;
- ``+N slow``: the same load while N slow clients are held (default bounds);
- ``+N slow, bound``: ``max_connections`` set below N (the normal clients'
  pooled connections were open before the flood; new slow ones are refused);
- ``plain aiohttp`` / ``edge``: a trivial handler served by aiohttp's own
  AppRunner and by :class:`proxy.edge.Listener` (the edge's own per-request
  cost, no Warden).

Each phase lasts ``--phase-s`` seconds; the whole run takes about
``5 * phase_s + 15`` seconds.  Latencies are client-side, per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
ISS, AUD = "https://bench.issuer", "warden-bench"

FAKE = """
import asyncio, sys, uvloop
from tests.fakeprovider import FakeProvider
class _Sink(list):
    def append(self, x): pass
async def main():
    fp = FakeProvider()
    await fp.start(int(sys.argv[1]))
    fp.requests = _Sink()
    await asyncio.Event().wait()
uvloop.run(main())
"""

TRIVIAL = """
import asyncio, sys, uvloop
from aiohttp import web
from llm_warden.proxy.config import MetricsConfig, ServerConfig
from llm_warden.proxy.edge import start_listener
from llm_warden.proxy.metrics import Metrics
async def ok(request):
    await request.read()
    return web.json_response({"ok": True})
async def main():
    app = web.Application()
    app.router.add_post("/v1/chat/completions", ok)
    if sys.argv[2] == "edge":
        await start_listener(app, "data", ServerConfig(), Metrics(MetricsConfig()), "127.0.0.1", int(sys.argv[1]))
    else:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1])).start()
    await asyncio.Event().wait()
uvloop.run(main())
"""


SLOWLORIS = """
import asyncio, dataclasses, json, sys, time, uvloop
from bench.edge import Slow, slowloris
async def main():
    port, n, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    stats, until = Slow(), time.monotonic() + seconds
    await asyncio.gather(*(slowloris(port, until, stats) for _ in range(n)))
    print(json.dumps(dataclasses.asdict(stats)))
uvloop.run(main())
"""


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = int(s.getsockname()[1])
    s.close()
    return p


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 (kept open for the child)
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "BENCH_PROVIDER_KEY": "sk-bench"}, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, within_s: float = 30.0) -> None:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early; see {log}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}; see {log}")


@dataclass
class Slow:
    opened: int = 0
    got_408: int = 0
    got_503: int = 0
    closed_silently: int = 0
    connect_failed: int = 0
    held: int = 0


@dataclass
class Row:
    name: str
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    slow: Slow | None = None
    peak_open: int = 0
    refused_total: int = 0
    cpu_s: float | None = None


async def normal_load(url: str, token: str, session: aiohttp.ClientSession, concurrency: int, until: float, row: Row) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    headers = {"Authorization": f"Bearer {token}"}

    async def worker() -> None:
        while time.monotonic() < until:
            t = time.perf_counter()
            try:
                async with session.post(url, json=body, headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                row.latencies.append(time.perf_counter() - t)
            else:
                row.failures += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def slowloris(port: int, until: float, stats: Slow) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 4000
    while time.monotonic() < until:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats.connect_failed += 1
            await asyncio.sleep(1.0)
            continue
        stats.opened += 1
        stats.held += 1
        sent = 40
        try:
            w.write(head[:sent])
            while time.monotonic() < until:
                try:
                    data = await asyncio.wait_for(r.read(4096), 1.0)
                except TimeoutError:
                    w.write(head[sent : sent + 1])
                    sent += 1
                    continue
                if data.startswith(b"HTTP/1.1 408"):
                    stats.got_408 += 1
                elif data.startswith(b"HTTP/1.1 503"):
                    stats.got_503 += 1
                else:
                    stats.closed_silently += 1
                break
        except (ConnectionError, OSError):
            stats.closed_silently += 1
        finally:
            stats.held -= 1
            w.close()


async def scrape(admin: str, session: aiohttp.ClientSession) -> tuple[int, int]:
    async with session.get(f"{admin}/metrics") as r:
        text = await r.text()
    open_ = re.search(r'^warden_connections_open\{listener="data"\} (\S+)$', text, re.M)
    refused = re.search(r'^warden_connections_refused_total\{listener="data"\} (\S+)$', text, re.M)
    return int(float(open_.group(1))) if open_ else 0, int(float(refused.group(1))) if refused else 0


async def phase(name: str, url: str, admin: str | None, port: int, token: str, concurrency: int, slow_n: int, phase_s: float, pid: int) -> Row:
    row = Row(name)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as client, aiohttp.ClientSession() as probe:
        # Warm the pool: the normal clients' connections are open before any flood.
        await normal_load(url, token, client, concurrency, time.monotonic() + 1.0, Row("warmup"))
        until = time.monotonic() + phase_s
        # The slow clients run in a process of their own, so they do not share the load generator's event loop.
        flood = (
            await asyncio.create_subprocess_exec(sys.executable, "-c", SLOWLORIS, str(port), str(slow_n), str(phase_s), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE)
            if slow_n
            else None
        )
        if slow_n:
            await asyncio.sleep(1.0)  # the flood is in place before measuring
        sampler_stop = asyncio.Event()

        async def sampler() -> None:
            while not sampler_stop.is_set() and admin is not None:
                with contextlib.suppress(aiohttp.ClientError):
                    open_, refused = await scrape(admin, probe)
                    row.peak_open = max(row.peak_open, open_)
                    row.refused_total = refused
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sampler_stop.wait(), 0.5)

        sampling = asyncio.create_task(sampler())
        cpu0 = cpu_seconds(pid)
        await normal_load(url, token, client, concurrency, until, row)
        cpu1 = cpu_seconds(pid)
        if cpu0 is not None and cpu1 is not None:
            row.cpu_s = cpu1 - cpu0
        if flood is not None:
            out, _ = await flood.communicate()
            row.slow = Slow(**json.loads(out))
        sampler_stop.set()
        await sampling
        if admin is not None:
            with contextlib.suppress(aiohttp.ClientError):
                _, row.refused_total = await scrape(admin, probe)
    return row


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1] * 1000 if len(values) > 1 else values[0] * 1000


def config(port: int, aport: int, provider: int, pub: Path, max_connections: int) -> str:
    return f"""
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{aport}"
drain_s = 2
max_connections = {max_connections}

[upstream]
base_url = "http://127.0.0.1:{provider}/v1"
api_key_env = "BENCH_PROVIDER_KEY"

[auth]
algorithms = ["RS256"]
issuer = "{ISS}"
audience = "{AUD}"
public_key_file = "{pub}"

[audit]
enabled = false

[logging]
access_log = false
level = "warning"

[plugins]
enabled = ["headers"]
"""


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slow", type=int, default=200, help="slowloris connections held (default 200)")
    ap.add_argument("--bound", type=int, default=128, help="max_connections of the bounded row (default 128, below --slow)")
    ap.add_argument("--phase-s", type=float, default=12.0, help="seconds per row (default 12; header_timeout_s is 10)")
    ap.add_argument("--concurrency", type=int, default=8, help="normal clients sending back to back (default 8)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="warden-bench-edge-"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = tmp / "pub.pem"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    now = int(time.time())
    token = jwt.encode({"iss": ISS, "aud": AUD, "sub": "bench", "tenant": "acme", "iat": now, "exp": now + 3600}, priv, algorithm="RS256")

    provider = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[Row] = []
    try:
        fake = spawn([sys.executable, "-c", FAKE, str(provider)], tmp / "fake.log")
        procs.append(fake)
        await wait_port(provider, fake, tmp / "fake.log")
        for name, bound, slow_n in (("baseline", 1024, 0), (f"+{args.slow} slow", 1024, args.slow), (f"+{args.slow} slow, bound {args.bound}", args.bound, args.slow)):
            port, aport = free_port(), free_port()
            cfg = tmp / f"config-{bound}.toml"
            cfg.write_text(config(port, aport, provider, pub, bound))
            log = tmp / f"warden-{len(procs)}.log"
            proc = spawn([sys.executable, "-m", "llm_warden.proxy", "serve", "--config", str(cfg)], log)
            procs.append(proc)
            await wait_port(port, proc, log)
            rows.append(await phase(name, f"http://127.0.0.1:{port}/v1/chat/completions", f"http://127.0.0.1:{aport}", port, token, args.concurrency, slow_n, args.phase_s, proc.pid))
            stop(proc)
        for kind in ("plain aiohttp", "edge"):
            port = free_port()
            log = tmp / f"trivial-{kind.replace(' ', '-')}.log"
            proc = spawn([sys.executable, "-c", TRIVIAL, str(port), "edge" if kind == "edge" else "plain"], log)
            procs.append(proc)
            await wait_port(port, proc, log)
            rows.append(await phase(f"trivial handler, {kind}", f"http://127.0.0.1:{port}/v1/chat/completions", None, port, token, args.concurrency, 0, args.phase_s / 2, proc.pid))
            stop(proc)
    finally:
        for p in procs:
            stop(p)

    print(f"\nloopback, {os.cpu_count()} CPUs, {args.concurrency} keep-alive clients back to back, {args.phase_s:g} s per Warden row; header_timeout_s = 10 (default)\n")
    print("| row | requests | req/s | p50 ms | p99 ms | max ms | failed | server CPU µs/req | slow conns opened | 408 to slow | 503 to slow | peak open (data) | refused total |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        n = len(r.latencies)
        dur = (args.phase_s - 1.0 if r.slow else args.phase_s) if r.name.startswith(("baseline", "+")) else args.phase_s / 2
        cpu = f"{r.cpu_s / n * 1e6:.0f}" if r.cpu_s is not None and n else "-"
        s = r.slow
        slow_cols = f"{s.opened} | {s.got_408} | {s.got_503}" if s else "- | - | -"
        print(
            f"| {r.name} | {n} | {n / dur:.0f} | {pct(r.latencies, 0.5):.2f} | {pct(r.latencies, 0.99):.2f} | {max(r.latencies, default=float('nan')) * 1000:.1f} | {r.failures} | {cpu} "
            f"| {slow_cols} | {r.peak_open or '-'} | {r.refused_total if s else '-'} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
