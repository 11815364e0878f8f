"""Proxy overhead: the same load direct to a provider, through a minimal floor proxy,
and through Warden — side by side, in one run.

    python bench/overhead.py                      # defaults: 2000 requests per cell
    python bench/overhead.py --requests 5000 --stream

Processes (all on loopback): the fake provider; the *floor* — a minimal aiohttp
pass-through that checks a cached JWT, parses the body with orjson and runs on
uvloop (REFERENCE.md: the least any Python proxy of this stack can add); and
``warden serve`` with JWT auth (RS256) on.  The load generator keeps one
keep-alive connection per worker.  Reported: p50/p99 latency, requests/s,
and the latency added over the direct path, at concurrency 1 and 16.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
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

ISS, AUD = "https://bench.issuer", "warden-bench"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return int(p)


FAKE = """
import asyncio, sys, uvloop
from tests.fakeprovider import FakeProvider
async def main():
    fp = FakeProvider()
    await fp.start(int(sys.argv[1]))
    fp.requests = _Sink()
    await asyncio.Event().wait()
class _Sink(list):
    def append(self, x): pass
uvloop.run(main())
"""

FLOOR = """
import hashlib, sys, time, jwt, orjson, uvloop, aiohttp
from aiohttp import web
port, upstream, pub = int(sys.argv[1]), sys.argv[2], open(sys.argv[3]).read()
cache = {}
async def start(app):
    app["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
async def stop(app):
    await app["s"].close()
async def chat(request):
    auth = request.headers.get("Authorization", "")[7:]
    key = hashlib.blake2b(auth.encode(), digest_size=20).digest()
    hit = cache.get(key)
    if hit is None or hit < time.time():
        claims = jwt.decode(auth, pub, algorithms=["RS256"], audience="__AUD__", issuer="__ISS__")
        cache[key] = claims["exp"]
    raw = await request.read()
    body = orjson.loads(raw)
    async with request.app["s"].post(upstream + "/chat/completions", data=raw, headers={"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}) as r:
        out = await r.read()
        return web.Response(body=out, status=r.status, content_type="application/json")
app = web.Application()
app.on_startup.append(start)
app.on_cleanup.append(stop)
app.router.add_post("/v1/chat/completions", chat)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
""".replace("__AUD__", AUD).replace("__ISS__", ISS)


def spawn(code_or_args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(code_or_args, cwd=ROOT, env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def wait_up(url: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


async def load(url: str, token: str, body: bytes, n: int, concurrency: int, stream: bool) -> tuple[list[float], float]:
    lat: list[float] = []
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    per = n // concurrency

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in range(per):
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url}: status {r.status}")
            lat.append(time.perf_counter() - t0)

    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(concurrency)]
    try:
        for s in sessions:  # warm-up: connection, token cache, code paths
            for _ in range(20):
                async with s.post(url, data=body, headers=headers) as r:
                    await r.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(s) for s in sessions))
        wall = time.perf_counter() - t0
    finally:
        for s in sessions:
            await s.close()
    return lat, wall


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--stream", action="store_true", help="also measure a streamed completion")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell; the median round is reported")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="warden-bench-"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp / "pub.pem").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    now = int(time.time())
    token = jwt.encode({"iss": ISS, "aud": AUD, "sub": "bench", "tenant": "bench", "groups": ["g"], "exp": now + 7200}, priv, algorithm="RS256")

    fport, lport, wport, aport = free_port(), free_port(), free_port(), free_port()
    (tmp / "config.toml").write_text(
        f"""
[server]
listen = "127.0.0.1:{wport}"
admin_listen = "127.0.0.1:{aport}"
[upstream]
base_url = "http://127.0.0.1:{fport}/v1"
api_key_env = "BENCH_PROVIDER_KEY"
[auth]
algorithms = ["RS256"]
issuer = "{ISS}"
audience = "{AUD}"
public_key_file = "{tmp / 'pub.pem'}"
[audit]
enabled = false
[logging]
access_log = false
level = "warning"
[plugins]
enabled = ["headers"]
"""
    )
    procs = [
        spawn([sys.executable, "-c", FAKE, str(fport)]),
        spawn([sys.executable, "-c", FLOOR, str(lport), f"http://127.0.0.1:{fport}/v1", str(tmp / "pub.pem")]),
        spawn([sys.executable, "-m", "proxy", "serve", "--config", str(tmp / "config.toml")], env={"BENCH_PROVIDER_KEY": "sk-bench"}),
    ]
    try:
        await wait_up(f"http://127.0.0.1:{fport}/v1/models")
        await wait_up(f"http://127.0.0.1:{lport}/v1/chat/completions")
        await wait_up(f"http://127.0.0.1:{aport}/readyz")
        messages = [{"role": "system", "content": "You are a helpful assistant." * 4}] + [
            {"role": "user" if i % 2 == 0 else "assistant", "content": f"Message number {i} with some words to make the body realistic. " * 3} for i in range(6)
        ]
        targets = {
            "direct": f"http://127.0.0.1:{fport}/v1/chat/completions",
            "floor": f"http://127.0.0.1:{lport}/v1/chat/completions",
            "warden": f"http://127.0.0.1:{wport}/v1/chat/completions",
        }
        modes = [("chat", False)] + ([("chat stream", True)] if args.stream else [])
        rows = []
        for label, stream in modes:
            body = orjson.dumps({"model": "gpt-bench", "messages": messages, "stream": stream})
            for conc in (1, 16):
                rounds: dict[str, list[tuple[float, float, float]]] = {k: [] for k in targets}
                for _ in range(args.rounds):
                    for name, url in targets.items():
                        if stream and name == "floor":
                            continue
                        lat, wall = await load(url, token, body, args.requests // args.rounds, conc, stream)
                        rounds[name].append((pct(lat, 0.5), pct(lat, 0.99), len(lat) / wall))
                res = {k: sorted(v)[len(v) // 2] for k, v in rounds.items() if v}
                rows.append((label, conc, res))
        print(f"\nproxy overhead, {args.requests} requests per cell, median of {args.rounds} interleaved rounds (ms)\n")
        print("| request | conc | direct p50 / p99 | floor p50 / p99 | warden p50 / p99 | warden rps | added p50 (warden − direct) | floor added p50 | warden/floor added |")
        print("|---|---|---|---|---|---|---|---|---|")
        for label, conc, res in rows:
            d, w = res["direct"], res["warden"]
            f = res.get("floor")
            add_w = (w[0] - d[0]) * 1000
            add_f = (f[0] - d[0]) * 1000 if f else float("nan")
            ratio = add_w / add_f if f and add_f > 0 else float("nan")
            fl = f"{f[0]*1000:.3f} / {f[1]*1000:.3f}" if f else "—"
            print(f"| {label} | {conc} | {d[0]*1000:.3f} / {d[1]*1000:.3f} | {fl} | {w[0]*1000:.3f} / {w[1]*1000:.3f} | {w[2]:.0f} | {add_w:.3f} | {add_f:.3f} | {ratio:.2f} |")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
