"""Proxy overhead: the same load direct to a provider, through a minimal floor proxy,
and through Warden — side by side, in one run.

    python bench/overhead.py                      # defaults: 2000 requests per cell
    python bench/overhead.py --requests 5000 --stream
    python bench/overhead.py --messages --stream  # also /v1/messages (Anthropic) beside chat, in the same run

Processes (all on loopback): the fake provider; the *floor* — a minimal aiohttp
pass-through that checks a cached JWT, parses the body with orjson and runs on
uvloop (the least any Python proxy of this stack can add); and
``warden serve`` with JWT auth (RS256) on.  The load generator keeps one
keep-alive connection per worker.  Reported: p50/p99 latency, requests/s,
and the latency added over the direct path, at concurrency 1 and 16.

    python bench/overhead.py --provider-ms 20 --variants 'warden+audit(sync)'
    python bench/overhead.py --compare fe8e7f4 --variants   # this tree against an older commit, same run

With ``--compare REV`` every Warden configuration also runs from a checkout of
REV (a temporary git worktree), interleaved round by round with this tree's,
so a change to the hot path is measured against its parent in one sitting.

With ``--messages`` each Warden also serves the same conversation as an
Anthropic Messages request (``POST /v1/messages``, translated to chat
completions and its answer rendered back); the direct and floor rows of that
request send the equivalent chat body, so "added" is what the translation
costs on top of Warden's own path.

With ``--responses`` each Warden also serves it as an OpenAI Responses request
(``POST /v1/responses``; direct and floor send the equivalent chat body).  A
tree that refuses ``/v1/responses`` (404 ``server.routes.ungoverned``) is
probed once and the rows are skipped with a note.

With ``--anthropic-upstream`` a Warden with ``[upstream] api = "anthropic"``
serves the chat and Messages requests from the fake provider's native
Messages endpoint; its direct row sends the equivalent Messages request to
that endpoint, so "added" includes the translation of the request and of the
answer (or stream) both ways.

    python bench/overhead.py --messages --responses --anthropic-upstream --stream --variants

The last table puts the APIs side by side: Warden's added p50 and p99 over
the direct path per API, and each API's added p50 over chat's.

With ``--provider-ms`` the fake provider takes 0.5-1.5x that long per request
(seeded jitter), as a real one does; concurrency 16 then no longer saturates
the CPUs (by default the provider answers at once and load generator, provider
and proxy compete for the machine's cores), and the added latency is what a
request waits for Warden, not for a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
from bench.delay import Delays
from tests.fakeprovider import FakeProvider
async def main():
    fp = FakeProvider()
    delays = Delays()
    def slow(answer):
        async def handler(request):
            # --provider-ms: the load generator says how long this request takes (delay_ms), kept by
            # another process (bench/delay.py: uvloop's timers count whole milliseconds).
            body = await request.json()
            # Chat bodies carry it in metadata.delay_ms; translated bodies in "user" or metadata.user_id.
            meta = body.get("metadata") or {}
            delay = meta.get("delay_ms") or (meta.get("user_id") or body.get("user") or "").removeprefix("delay_ms=")
            await delays.sleep(float(delay) / 1000)
            return await answer(request)
        return handler
    if float(sys.argv[2]):
        await delays.start()
        fp._chat = slow(fp._chat)
        fp._anthropic_messages = slow(fp._anthropic_messages)
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


LOGS = Path(tempfile.mkdtemp(prefix="warden-bench-logs-"))


def spawn(code_or_args: list[str], env: dict[str, str] | None = None, root: Path = ROOT) -> subprocess.Popen[bytes]:
    """Start a process (code from ``root``); its output goes to a log file named in any failure."""
    out = open(LOGS / f"proc{len(list(LOGS.iterdir()))}.log", "wb")  # noqa: SIM115 (kept open for the child)
    return subprocess.Popen(code_or_args, cwd=root, env={**os.environ, **(env or {}), "PYTHONPATH": str(root)}, stdout=out, stderr=subprocess.STDOUT)


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
    raise RuntimeError(f"{url} did not come up; process logs in {LOGS}")


async def load(url: str, token: str, bodies: list[bytes], n: int, concurrency: int, stream: bool) -> tuple[list[float], float]:
    """``n`` requests (``bodies[i % len(bodies)]`` for the i-th, whichever worker sends it) from ``concurrency`` workers."""
    lat: list[float] = []
    # anthropic-version: the fake provider's native Messages endpoint requires it (as Anthropic does); the others ignore it.
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    todo = iter(range(n - n % concurrency))
    body = bodies[0]

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in todo:
            body = bodies[i % len(bodies)]
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


def parse_variant(name: str) -> tuple[str, list[str]]:
    """``warden[+audit(batch|sync|sync,nofsync)][+limits][+retrieval][+tools]`` or ``warden+all``
    (all plugins, audit batch) -> (audit settings, plugins)."""
    parts = name.split("+")
    if parts[0] != "warden":
        raise SystemExit(f"variant {name!r} must start with 'warden'")
    audit, plugins = "", []
    for part in parts[1:]:
        if part == "all":
            audit, plugins = 'durability = "batch"', ["limits", "retrieval", "tools"]
        elif part in ("audit(batch)", "audit(sync)"):
            audit = f'durability = "{part[6:-1]}"'
        elif part == "audit(sync,nofsync)":
            audit = 'durability = "sync"\nfsync = false'
        elif part in ("limits", "retrieval", "tools"):
            plugins.append(part)
        else:
            raise SystemExit(f"unknown variant part {part!r} in {name!r}")
    return audit, [*plugins, "headers"]


ANTHROPIC_WARDEN = "warden(api=anthropic)"
"""The Warden whose provider speaks the Anthropic Messages API (``--anthropic-upstream``)."""


def responses_body(messages: list[dict[str, Any]], max_tokens: int, stream: bool) -> dict[str, Any]:
    """The conversation as an OpenAI Responses request (instructions + input messages), server-side state off."""
    turns = [*messages[1:], {"role": "user", "content": "And the last question, please answer it briefly. " * 3}]
    return {"model": "gpt-bench", "instructions": messages[0]["content"], "input": turns, "max_output_tokens": max_tokens, "store": False, "stream": stream}


async def refused(url: str, token: str, body: dict[str, Any]) -> str | None:
    """``None`` when ``url`` answers ``body`` with 200; otherwise the status and the rule (or message) it answered."""
    async with aiohttp.ClientSession() as s, s.post(url, data=orjson.dumps(body), headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
        if r.status == 200:
            await r.read()
            return None
        text = (await r.read()).decode("utf-8", "replace")
    rule = text.rsplit("(rule: ", 1)[-1].split(")", 1)[0] if "(rule: " in text else text[:120]
    return f"{r.status} {rule}"


def print_side_by_side(rows: list[tuple[str, int, dict[str, tuple[float, float, float]]]]) -> None:
    """Warden's added latency per API over its direct path, and each API's added p50 over chat's (same stream, conc, Warden)."""
    print("\nadded latency by API (ms over the direct path; ratio: this API's added p50 / chat's)\n")
    print("| request | conc | warden | added p50 | added p99 | / chat |")
    print("|---|---|---|---|---|---|")
    chat_added: dict[tuple[bool, int, str, bool], float] = {}
    for label, conc, res in rows:
        d = res["direct"]
        stream, native = " stream" in label, "→ anthropic" in label
        for name, (p50, p99, _) in res.items():
            if name in ("direct", "floor"):
                continue
            added = p50 - d[0]
            key = (stream, conc, name, native)
            if label.startswith("chat"):
                chat_added[key] = added
            base = chat_added.get(key)
            ratio = f"{added / base:.2f}" if base and base > 0 else "—"
            print(f"| {label} | {conc} | {name} | {added * 1000:.3f} | {(p99 - d[1]) * 1000:.3f} | {ratio} |")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--stream", action="store_true", help="also measure a streamed completion")
    ap.add_argument("--messages", action="store_true", help="also measure the same conversation through POST /v1/messages (Anthropic)")
    ap.add_argument("--responses", action="store_true", help="also measure it through POST /v1/responses (skipped, with a note, where this tree refuses it)")
    ap.add_argument("--anthropic-upstream", action="store_true", help="also measure chat (and --messages) through a Warden whose provider speaks the Anthropic Messages API")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell; the median round is reported")
    ap.add_argument(
        "--variants",
        nargs="*",
        default=["warden+audit(batch)", "warden+audit(sync)", "warden+all"],
        help="Warden configurations besides plain 'warden' (headers plugin, audit off)",
    )
    ap.add_argument(
        "--provider-ms",
        type=float,
        default=0.0,
        help="the fake provider answers after 0.5-1.5x this many ms (default 0: at once, so concurrency 16 saturates the CPUs)",
    )
    ap.add_argument("--compare", metavar="REV", help="also run every Warden configuration from a checkout of REV (git worktree), interleaved")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="warden-bench-"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp / "pub.pem").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    now = int(time.time())
    token = jwt.encode({"iss": ISS, "aud": AUD, "sub": "bench", "tenant": "bench", "groups": ["g"], "exp": now + 7200}, priv, algorithm="RS256")

    fport, lport = free_port(), free_port()
    chosen = ["warden", *[v for v in args.variants if v != "warden"]]
    variants = {name: parse_variant(name) for name in chosen}
    if args.anthropic_upstream:
        chosen.append(ANTHROPIC_WARDEN)
        variants[ANTHROPIC_WARDEN] = parse_variant("warden")
    roots = {name: ROOT for name in chosen}
    worktree: Path | None = None
    if args.compare:
        worktree = tmp / "compare"
        git = ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.compare]
        await asyncio.to_thread(subprocess.run, git, check=True, capture_output=True)
        for name in list(chosen):
            variants[f"{name}@{args.compare}"] = variants[name]
            roots[f"{name}@{args.compare}"] = worktree
        chosen = [n for name in chosen for n in (name, f"{name}@{args.compare}")]
    procs = [
        spawn([sys.executable, "-c", FAKE, str(fport), str(args.provider_ms)]),
        spawn([sys.executable, "-c", FLOOR, str(lport), f"http://127.0.0.1:{fport}/v1", str(tmp / "pub.pem")]),
    ]
    ports: dict[str, tuple[int, int]] = {}
    for name in chosen:
        audit, plugins = variants[name]
        wport, aport = free_port(), free_port()
        ports[name] = (wport, aport)
        d = tmp / name.replace("+", "_").replace("(", "_").replace(")", "").replace("@", "_at_")
        d.mkdir()
        (d / "config.toml").write_text(
            f"""
[server]
listen = "127.0.0.1:{wport}"
admin_listen = "127.0.0.1:{aport}"
[upstream]
base_url = "http://127.0.0.1:{fport}/v1"
api_key_env = "BENCH_PROVIDER_KEY"
api = "{'anthropic' if name.startswith(ANTHROPIC_WARDEN) else 'openai'}"
[auth]
algorithms = ["RS256"]
issuer = "{ISS}"
audience = "{AUD}"
public_key_file = "{tmp / 'pub.pem'}"
[audit]
enabled = {"true" if audit else "false"}
{audit}
[logging]
access_log = false
level = "warning"
[plugins]
enabled = {plugins!r}
[limits]
[[limits.rules]]
scope = "tenant"
requests = "1000000/minute"
[retrieval]
mode = "bm25"
embedder = "none"
[policy]
read_only = false
""".replace("'", '"')
        )
        procs.append(spawn([sys.executable, "-m", "llm_warden.proxy", "serve", "--config", str(d / "config.toml")], env={"BENCH_PROVIDER_KEY": "sk-bench"}, root=roots[name]))
    try:
        await wait_up(f"http://127.0.0.1:{fport}/v1/models")
        await wait_up(f"http://127.0.0.1:{lport}/v1/chat/completions")
        for _, aport in ports.values():
            await wait_up(f"http://127.0.0.1:{aport}/readyz")
        messages = [{"role": "system", "content": "You are a helpful assistant." * 4}] + [
            {"role": "user" if i % 2 == 0 else "assistant", "content": f"Message number {i} with some words to make the body realistic. " * 3} for i in range(6)
        ]
        direct = {"direct": f"http://127.0.0.1:{fport}/v1/chat/completions", "floor": f"http://127.0.0.1:{lport}/v1/chat/completions"}
        kinds = ["chat"] + (["messages"] if args.messages else [])
        notes: list[str] = []
        if args.responses:
            why = await refused(f"http://127.0.0.1:{ports['warden'][0]}/v1/responses", token, responses_body(messages, 256, False))
            if why is None:
                kinds.append("responses")
            else:
                notes.append(f"/v1/responses skipped: this tree answers {why}")
        modes = [(k, False, k) for k in kinds] + ([(k + " stream", True, k) for k in kinds] if args.stream else [])
        if args.anthropic_upstream:
            modes += [(f"{k}{' stream' if st else ''} → anthropic", st, k) for st in ((False, True) if args.stream else (False,)) for k in kinds if k != "responses"]
        # The Messages API ends on a user turn and needs max_tokens: the same conversation, one user turn longer.
        m_turns = [*messages[1:], {"role": "user", "content": "And the last question, please answer it briefly. " * 3}]
        rnd = random.Random(7)
        delays = [round(args.provider_ms * rnd.uniform(0.5, 1.5), 3) for _ in range(997)] if args.provider_ms else []
        rows = []
        for label, stream, kind in modes:
            native = "→ anthropic" in label
            path = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}[kind]
            wardens = {name: wp for name, (wp, _) in ports.items() if name.startswith(ANTHROPIC_WARDEN) == native}
            if native:
                targets = {"direct": f"http://127.0.0.1:{fport}/v1/messages", **{name: f"http://127.0.0.1:{wp}{path}" for name, wp in wardens.items()}}
            else:
                targets = {**direct, **{name: f"http://127.0.0.1:{wp}{path}" for name, wp in wardens.items()}}
            if kind == "chat":
                chat_base: dict[str, Any] = {"model": "gpt-bench", "messages": messages, "stream": stream}
                warden_base = chat_base
            else:
                chat_base = {"model": "gpt-bench", "messages": [messages[0], *m_turns], "max_tokens": 256, "stream": stream}
                if stream:
                    chat_base["stream_options"] = {"include_usage": True}
                warden_base = (
                    {"model": "gpt-bench", "system": messages[0]["content"], "messages": m_turns, "max_tokens": 256, "stream": stream}
                    if kind == "messages"
                    else responses_body(messages, 256, stream)
                )
            if native:
                from llm_warden.proxy.upstream_anthropic import messages_request

                # What Warden sends the Anthropic provider for this request (chat: max_tokens from default_max_tokens).
                direct_base = messages_request(warden_base if kind == "chat" else chat_base, 4096)
            else:
                direct_base = chat_base
            if delays:
                # The same seeded provider times, in the same order, for every path: their medians compare.
                def carry(base: dict[str, Any], d: float, how: str) -> bytes:
                    if how == "metadata":
                        return orjson.dumps({**base, "metadata": {"delay_ms": str(d)}})
                    if how == "user_id":
                        return orjson.dumps({**base, "metadata": {"user_id": f"delay_ms={d}"}})
                    return orjson.dumps({**base, "user": f"delay_ms={d}"})

                direct_how = "user_id" if native else "metadata"
                warden_how = {"chat": "user" if native else "metadata", "messages": "user_id", "responses": "user"}[kind]
                direct_bodies = [carry(direct_base, d, direct_how) for d in delays]
                warden_bodies = [carry(warden_base, d, warden_how) for d in delays]
            else:
                direct_bodies = [orjson.dumps(direct_base)]
                warden_bodies = [orjson.dumps(warden_base)]
            for conc in (1, 16):
                rounds: dict[str, list[tuple[float, float, float]]] = {k: [] for k in targets}
                for _ in range(args.rounds):
                    for name, url in targets.items():
                        if stream and name == "floor":
                            continue
                        bodies = direct_bodies if name in direct else warden_bodies
                        lat, wall = await load(url, token, bodies, args.requests // args.rounds, conc, stream)
                        rounds[name].append((pct(lat, 0.5), pct(lat, 0.99), len(lat) / wall))
                res = {k: sorted(v)[len(v) // 2] for k, v in rounds.items() if v}
                rows.append((label, conc, res))
        print(f"\nproxy overhead, {args.requests} requests per cell, median of {args.rounds} interleaved rounds (ms)\n")
        print("| request | conc | path | p50 | p99 | rps | added p50 vs direct | added / floor's added |")
        print("|---|---|---|---|---|---|---|---|")
        for label, conc, res in rows:
            d = res["direct"]
            f = res.get("floor")
            floor_added = (f[0] - d[0]) if f else None
            for name, (p50, p99, rps) in res.items():
                added = (p50 - d[0]) * 1000
                ratio = f"{(p50 - d[0]) / floor_added:.2f}" if floor_added and name != "direct" else "—"
                add_txt = f"{added:.3f}" if name != "direct" else "—"
                print(f"| {label} | {conc} | {name} | {p50*1000:.3f} | {p99*1000:.3f} | {rps:.0f} | {add_txt} | {ratio} |")
        print_side_by_side(rows)
        for note in notes:
            print(f"\nnote: {note}")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if worktree is not None:
            git = ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)]
            await asyncio.to_thread(subprocess.run, git, check=False, capture_output=True)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
