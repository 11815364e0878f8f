"""Memory after a burst of concurrent streams: what Warden keeps, and whether it gives it back.

    python bench/stream_memory.py                          # 1000 streams, baseline beside each remedy
    python bench/stream_memory.py --fix exact-body         # baseline and one fix, side by side
    python bench/stream_memory.py --prompt-kib 32          # retrieval-sized request bodies
    python bench/stream_memory.py --streams 300 --tracemalloc --survivors --variants baseline

Processes (loopback only): the fake provider of ``tests/fakeprovider.py``
(listen backlog 4096), answering every chat completion with a stream of
``--words`` content events ``--chunk-ms`` apart; and one Warden per variant
(JWT auth, RS256, the ``headers`` plugin, ``--plugins`` for more; audit off),
each in a child of this script (``--child``) that adds a control listener on
another port: RSS, pymalloc's arenas, the C allocator's counters
(``mallinfo2``, or jemalloc's ``stats.*``), ``gc.collect()``, a release
(``malloc_trim(0)`` or a jemalloc purge), ``tracemalloc`` snapshots and the
objects that survived a burst.

Every variant's Warden is started and warmed up (``--warmup`` streams one at
a time), then sampled ('before').  Then ``--bursts`` rounds: in each, every
variant in turn gets one burst of ``--streams`` concurrent streams, each on
its own client connection, closed at its end; its RSS is read from ``/proc``
every 10 ms during the burst (peak), sampled once all streams have their
headers ('open'), and ``--sample-at`` seconds after the burst (each after a
``gc.collect()``), while the next variant has its burst.  Last, one release
('+trim'), and with ``--survivors`` the objects allocated since 'before' that
are still alive.  With ``--tracemalloc`` a baseline Warden runs alone under
``tracemalloc`` and the Python allocations alive at 'open' and after the
bursts, minus those before, are listed by line.

The default samples at 3 s and 40 s: the upstream connector keeps each
provider connection idle for aiohttp's 15 s keep-alive (closed at its next
cleanup, up to 30 s), so 40 s is "after the burst, flat".

Variants (``--variants``): ``baseline``, or parts joined by ``+`` (see
:data:`PARTS`): ``arena2``, ``trim``, ``malloc``, ``jemalloc``, ``mmap64k``,
``asyncio-loop``, ``fix:NAME`` (:data:`FIXES`: ``exact-body``,
``compact-text``).  ``--fix NAME`` runs ``baseline`` and ``fix:NAME``.
Results and their reading: ``bench/results/2026-12-07-stream-memory.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import ctypes
import ctypes.util
import gc
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import orjson

SELF = Path(__file__).resolve()
ROOT = SELF.parent.parent
sys.path.insert(0, str(ROOT))

KIB = 1024

# -- the fake provider -----------------------------------------------------------------

FAKE = """
import sys, uvloop
from tests.fakeprovider import FakeProvider, Reply
words, chunk_s = int(sys.argv[2]), float(sys.argv[3])
reply = Reply(content=" ".join(f"word{i:04d}" for i in range(words)), chunk_delay_s=chunk_s)
class Forever:
    def popleft(self): return reply
    def __bool__(self): return True
class Sink(list):
    def append(self, x): pass
async def main():
    import asyncio
    from aiohttp import web
    fp = FakeProvider()
    fp.script = Forever()
    fp.requests = Sink()
    # FakeProvider.start's site, with a listen backlog for a thousand connections at once.
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", fp._chat)
    app.router.add_get("/v1/models", fp._models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1]), backlog=4096).start()
    await asyncio.Event().wait()
uvloop.run(main())
"""


# -- the child: Warden plus a control listener ---------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


class Malloc:
    """The C allocator of this process: glibc's, or jemalloc's when it was preloaded (``LD_PRELOAD``)."""

    MALLCTL_ARENAS_ALL = 4096

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self.libc.mallinfo2.restype = _MallInfo2
        process = ctypes.CDLL(None)
        self.mallctl = getattr(process, "mallctl", None)
        self.name = "jemalloc" if self.mallctl is not None else "glibc"
        self.releases: list[float] = []

    def _get(self, key: str) -> int:
        assert self.mallctl is not None
        v, n = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        if self.mallctl(key.encode(), ctypes.byref(v), ctypes.byref(n), None, 0):
            return -1
        return int(v.value)

    def stats(self) -> dict[str, int]:
        """Bytes the allocator hands out (``used``) and holds without handing them out (``free``)."""
        if self.mallctl is not None:
            epoch = ctypes.c_uint64(1)
            self.mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))
            allocated, resident = self._get("stats.allocated"), self._get("stats.resident")
            return {"used": allocated, "free": max(0, resident - allocated)}
        mi = self.libc.mallinfo2()
        return {"used": mi.uordblks + mi.hblkhd, "free": mi.fordblks}

    def release(self) -> float:
        """Give free memory back to the kernel now (glibc: ``malloc_trim(0)``; jemalloc: purge every arena); seconds taken."""
        t0 = time.perf_counter()
        if self.mallctl is not None:
            self.mallctl(f"arena.{self.MALLCTL_ARENAS_ALL}.purge".encode(), None, None, None, 0)
        else:
            self.libc.malloc_trim(0)
        took = time.perf_counter() - t0
        self.releases.append(took)
        return took


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile... of a process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    return out


def pymalloc_stats() -> dict[str, int]:
    """pymalloc's arenas and blocks, from ``sys._debugmallocstats()`` (written to fd 2, so fd 2 is borrowed)."""
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode("utf-8", "replace")
    out: dict[str, int] = {}
    for key, pattern in (
        ("arenas", r"# arenas allocated current\s*=\s*([\d,]+)"),
        ("arenas_highwater", r"# arenas highwater mark\s*=\s*([\d,]+)"),
        ("used_blocks", r"# bytes in allocated blocks\s*=\s*([\d,]+)"),
        ("free_blocks", r"# bytes in available blocks\s*=\s*([\d,]+)"),
        ("free_pools", r"\d+ unused pools \* \d+ bytes\s*=\s*([\d,]+)"),
        ("arena_size", r"arenas \* (\d+) bytes/arena"),
        ("arena_bytes", r"Total\s*=\s*([\d,]+)"),
    ):
        m = re.search(pattern, text)
        if m:
            out[key] = int(m.group(1).replace(",", ""))
    return out


def _type_counts() -> Counter[str]:
    return Counter(type(o).__qualname__ for o in gc.get_objects())


def _idle_trim(m: Malloc, interval_s: float) -> Callable[[], Coroutine[Any, Any, None]]:
    """The idle-trim remedy as it would run in production: an asyncio task that calls
    :meth:`Malloc.release` every ``interval_s`` while no request is in flight (a trim walks
    the whole heap, so it is kept out of busy periods; its durations are reported)."""

    async def task() -> None:
        while True:
            await asyncio.sleep(interval_s)
            if _WARDEN and _WARDEN[0].inflight == 0:
                m.release()

    return task


def _live_objects() -> list[Any]:
    """Every object the collector tracks, and what they refer to directly (strings, bytes, ints...)."""
    objs = gc.get_objects()
    out = list(objs)
    for o in objs:
        out.extend(gc.get_referents(o))
    return out


def _survivors(before: array[int]) -> dict[str, Any]:
    """Live objects whose address was not live at ``before``, by type: how many, their bytes, and how many
    distinct 1 MiB address ranges they sit in (a pymalloc arena spans one or two of those): the blocks
    that can keep an arena mapped although everything else in it was freed.

    The addresses of ``before`` are searched in a sorted array, and the objects are listed before any
    bookkeeping of this function is allocated, so its own ints and sets are not counted."""
    old = array("Q", sorted(before))
    live = _live_objects()
    seen: set[int] = set()
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    ranges: dict[str, set[int]] = {}
    every: set[int] = set()
    examples: dict[str, list[str]] = {}
    mine = {id(old), id(live), id(before)}
    for o in live:
        i = id(o)
        k = bisect.bisect_left(old, i)
        if (k < len(old) and old[k] == i) or i in seen or i in mine:
            continue
        seen.add(i)
        t = type(o).__qualname__
        count[t] += 1
        size[t] += sys.getsizeof(o)
        ranges.setdefault(t, set()).add(i >> 20)
        every.add(i >> 20)
        ex = examples.setdefault(t, [])
        if len(ex) < 3:
            with contextlib.suppress(Exception):
                ex.append(repr(o)[:100])
    return {
        "objects": sum(count.values()),
        "bytes": sum(size.values()),
        "ranges": len(every),
        "by_type": [
            {"type": t, "count": n, "bytes": size[t], "ranges": len(ranges[t]), "examples": examples[t]} for t, n in count.most_common(25)
        ],
    }


_WARDEN: list[Any] = []


def _fix_exact_body() -> None:
    """The upstream body of a stream, re-serialized after a plugin or ``stream_usage`` changed it, is
    held by the exchange's turn for the whole stream.  orjson (3.12 and later) returns its bytes in the
    buffer it grew while writing, never shrunk: a 1.5 KB body holds 4 KiB, a 100 KB one 1 MiB.  The fix
    copies it into an exact-size bytes (one memcpy) in ``proxy.chat.upstream_body``."""
    import llm_warden.proxy.chat

    def upstream_body(ex: Any) -> bytes:
        if ex.body_modified:
            return bytes(memoryview(orjson.dumps(ex.body)))
        return ex.raw_body  # type: ignore[no-any-return]

    llm_warden.proxy.chat.upstream_body = upstream_body


class _CompactText(list):  # type: ignore[type-arg]
    """A list of text deltas that joins itself every 64 appends: one ``str`` object per delta costs
    ~50 bytes of header for a few bytes of token, for the whole life of the stream."""

    __slots__ = ()

    def append(self, s: str) -> None:
        super().append(s)
        if len(self) >= 64:
            joined = "".join(self)
            self.clear()
            super().append(joined)


def _fix_compact_text() -> None:
    """``_TurnState.text`` (every content delta of the turn, kept for ``ex.response_text``) as a
    :class:`_CompactText`; ``proxy/chat.py`` would do the same with a joined buffer."""
    import llm_warden.proxy.chat

    orig = llm_warden.proxy.chat._TurnState.__init__

    def init(self: Any) -> None:
        orig(self)
        self.text = _CompactText()

    llm_warden.proxy.chat._TurnState.__init__ = init  # type: ignore[method-assign]


FIXES: dict[str, Callable[[], None]] = {"exact-body": _fix_exact_body, "compact-text": _fix_compact_text}
"""Monkeypatches that test a cause: NAME -> a function applied in the child before Warden starts."""


def child_main(argv: list[str]) -> int:
    """``--child CONFIG CTLPORT [--fix NAME]... [--tracemalloc] [--idle-trim S]``: Warden with a control listener."""
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("ctlport", type=int)
    ap.add_argument("--fix", action="append", default=[])
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--idle-trim", type=float, default=0.0)
    args = ap.parse_args(argv)
    if args.tracemalloc:
        tracemalloc.start(12)
    for name in args.fix:
        FIXES[name]()

    from aiohttp import web

    import llm_warden.proxy.app
    import llm_warden.proxy.serve
    from llm_warden.proxy.config import load_config
    from llm_warden.proxy.logs import setup_logging

    m = Malloc()
    snaps: dict[str, tuple[Any, Counter[str]]] = {}

    orig_init = llm_warden.proxy.app.Warden.__init__

    def init(self: Any, *a: Any, **kw: Any) -> None:
        orig_init(self, *a, **kw)
        _WARDEN.append(self)

    llm_warden.proxy.app.Warden.__init__ = init  # type: ignore[method-assign]

    async def stats(request: web.Request) -> web.Response:
        rel = m.releases
        out: dict[str, Any] = {
            "status": proc_status(),
            "malloc": {"name": m.name, **m.stats()},
            "pymalloc": pymalloc_stats(),
            "releases": {"count": len(rel), "max_ms": max(rel, default=0) * 1000, "mean_ms": sum(rel) / len(rel) * 1000 if rel else 0},
        }
        out["objects"] = len(gc.get_objects())
        out["tasks"] = len(asyncio.all_tasks())
        if tracemalloc.is_tracing():
            out["traced"] = tracemalloc.get_traced_memory()[0]
        return web.json_response(out)

    async def collect(request: web.Request) -> web.Response:
        return web.json_response({"collected": gc.collect()})

    async def trim(request: web.Request) -> web.Response:
        return web.json_response({"seconds": m.release()})

    ids_before = array("Q")

    async def record_ids(request: web.Request) -> web.Response:
        # Kept in an array (one malloc'd buffer), not a set of ints, so the record does not fill pymalloc's arenas.
        del ids_before[:]
        for o in _live_objects():
            ids_before.append(id(o))
        return web.json_response({"count": len(ids_before)})

    async def survivors(request: web.Request) -> web.Response:
        return web.json_response(_survivors(ids_before))

    async def snapshot(request: web.Request) -> web.Response:
        gc.collect()
        snap = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
        snaps[request.match_info["name"]] = (snap, _type_counts())
        return web.json_response({"ok": True})

    async def diff(request: web.Request) -> web.Response:
        a, b = snaps[request.match_info["a"]], snaps[request.match_info["b"]]
        types = [(k, v) for k, v in (b[1] - a[1]).most_common(20)]
        out: dict[str, Any] = {"types": types}
        if a[0] is not None and b[0] is not None:
            flt = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")]
            sa, sb = a[0].filter_traces(flt), b[0].filter_traces(flt)
            out["growth"] = sum(s.size_diff for s in sb.compare_to(sa, "filename"))
            out["by_line"] = [
                {"size_diff": s.size_diff, "count_diff": s.count_diff, "where": str(s.traceback[0])}
                for s in sb.compare_to(sa, "lineno")[:25]
            ]
            out["by_trace"] = [
                {"size_diff": s.size_diff, "count_diff": s.count_diff, "trace": [str(f) for f in s.traceback[-8:]]}
                for s in sb.compare_to(sa, "traceback")[:6]
            ]
        return web.json_response(out)

    orig_run = llm_warden.proxy.serve.run

    async def run(config: Any, **kw: Any) -> int:
        ctl = web.Application()
        ctl.router.add_get("/stats", stats)
        ctl.router.add_post("/gc", collect)
        ctl.router.add_post("/trim", trim)
        ctl.router.add_post("/snapshot/{name}", snapshot)
        ctl.router.add_get("/diff/{a}/{b}", diff)
        ctl.router.add_post("/ids", record_ids)
        ctl.router.add_get("/survivors", survivors)
        runner = web.AppRunner(ctl, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.ctlport).start()
        idle: asyncio.Task[Any] | None = None
        if args.idle_trim:
            idle = asyncio.get_running_loop().create_task(_idle_trim(m, args.idle_trim)())
        try:
            return await orig_run(config, **kw)
        finally:
            if idle is not None:
                idle.cancel()
            await runner.cleanup()

    llm_warden.proxy.serve.run = run
    cfg = load_config(args.config)
    setup_logging(cfg.logging.level)
    return llm_warden.proxy.serve.serve(cfg)


# -- the bench ---------------------------------------------------------------------------


def jemalloc_path() -> str | None:
    """Debian's libjemalloc2, where it is installed."""
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        p = Path(d) / "libjemalloc.so.2"
        if p.exists():
            return str(p)
    return None


JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"
"""jemalloc returns a freed page to the kernel within about a second, from its own thread (an idle process frees too)."""

PARTS: dict[str, tuple[dict[str, str], list[str], str]] = {
    "arena2": ({"MALLOC_ARENA_MAX": "2"}, [], ""),
    "trim": ({}, ["--idle-trim", "1"], ""),
    "malloc": ({"PYTHONMALLOC": "malloc"}, [], ""),
    "jemalloc": ({"LD_PRELOAD": "<jemalloc>", "MALLOC_CONF": JEMALLOC_CONF}, [], ""),
    "mmap64k": ({"MALLOC_MMAP_THRESHOLD_": "65536"}, [], ""),
    "asyncio-loop": ({}, [], "use_uvloop = false"),
}
"""Parts of a variant: NAME -> (Warden's extra environment, extra child arguments, extra ``[server]`` lines).

- ``arena2``: ``MALLOC_ARENA_MAX=2`` (glibc's per-thread arenas);
- ``trim``: :func:`_idle_trim` every second (``malloc_trim(0)``, or a purge under jemalloc);
- ``malloc``: ``PYTHONMALLOC=malloc``, every object from the C allocator instead of pymalloc's arenas;
- ``jemalloc``: ``LD_PRELOAD`` of libjemalloc with :data:`JEMALLOC_CONF` (pymalloc still serves
  small objects unless ``malloc`` is a part too);
- ``mmap64k``: ``MALLOC_MMAP_THRESHOLD_=65536`` (blocks of 64 KiB and more mmap'd, so given back on free);
- ``asyncio-loop``: ``[server] use_uvloop = false``;
- ``fix:NAME``: a monkeypatch of :data:`FIXES`.
"""


def variant_args(name: str) -> tuple[dict[str, str], list[str], str]:
    """``baseline`` or parts of :data:`PARTS` joined by ``+`` (``jemalloc+malloc``, ``malloc+trim+fix:exact-body``)."""
    env: dict[str, str] = {}
    extra: list[str] = []
    server: list[str] = []
    for part in [] if name == "baseline" else name.split("+"):
        if part.startswith("fix:"):
            if part[4:] not in FIXES:
                raise SystemExit(f"unknown fix {part[4:]!r} (known: {', '.join(sorted(FIXES))})")
            extra += ["--fix", part[4:]]
            continue
        if part not in PARTS:
            raise SystemExit(f"unknown variant part {part!r} in {name!r} (known: {', '.join(PARTS)}, fix:NAME)")
        e, x, srv = PARTS[part]
        if e.get("LD_PRELOAD") == "<jemalloc>":
            path = jemalloc_path()
            if path is None:
                raise SystemExit(f"variant {name!r} needs libjemalloc.so.2 (Debian: apt-get install libjemalloc2)")
            e = {**e, "LD_PRELOAD": path}
        env.update(e)
        extra += x
        server += [srv] if srv else []
    return env, extra, "\n".join(server)


def write_config(d: Path, wport: int, aport: int, fport: int, pub: Path, plugins: list[str], upstream_conns: int, server: str) -> Path:
    from bench.overhead import AUD, ISS

    d.mkdir(parents=True, exist_ok=True)
    path = d / "config.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{wport}"
admin_listen = "127.0.0.1:{aport}"
max_connections = 4096
{server}
[upstream]
base_url = "http://127.0.0.1:{fport}/v1"
api_key_env = "BENCH_PROVIDER_KEY"
max_connections = {upstream_conns}
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
enabled = {orjson.dumps([*plugins, "headers"]).decode()}
[limits]
[[limits.rules]]
scope = "tenant"
requests = "1000000/minute"
[retrieval]
mode = "bm25"
embedder = "none"
[policy]
read_only = false
"""
    )
    return path


async def one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], opened: Callable[[], None] | None = None
) -> int:
    """One streamed completion read to its end; the bytes received (raises when it is not a whole stream)."""
    async with session.post(url, data=body, headers=headers) as r:
        if opened is not None:
            opened()
        data = await r.read()
        if r.status != 200 or not data.endswith(b"data: [DONE]\n\n"):
            raise RuntimeError(f"stream failed: status {r.status}, {data[-200:]!r}")
        return len(data)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def burst(
    url: str, body: bytes, headers: dict[str, str], n: int, pid: int, timeout_s: float, all_open: Callable[[], Awaitable[Any]]
) -> dict[str, Any]:
    """``n`` concurrent streams, each on its own connection, closed afterwards.

    Returns the peak RSS (KiB), wall and CPU seconds of Warden, bytes received, and what
    ``all_open()`` returned (called once every stream has its response headers).
    """
    peak = 0
    stop = asyncio.Event()
    open_count = 0
    every_open = asyncio.Event()

    def opened() -> None:
        nonlocal open_count
        open_count += 1
        if open_count == n:
            every_open.set()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            with contextlib.suppress(OSError):
                peak = max(peak, proc_status(pid)["VmRSS"])
            await asyncio.sleep(0.01)

    async def at_all_open() -> Any:
        await every_open.wait()
        return await all_open()

    sampler = asyncio.create_task(sample())
    mid = asyncio.create_task(at_all_open())
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    try:
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
            sizes = await asyncio.wait_for(asyncio.gather(*(one_stream(s, url, body, headers, opened) for _ in range(n))), timeout_s)
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    finally:
        stop.set()
        await sampler
    mid_result = await mid if every_open.is_set() else None
    if not mid.done():
        mid.cancel()
    return {"peak": peak, "wall": wall, "cpu": cpu, "received": sum(sizes), "mid": mid_result}


class Control:
    def __init__(self, port: int, pid: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.pid = pid

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(self.base + path) as r:
            return await r.json()

    async def post(self, path: str) -> Any:
        async with aiohttp.ClientSession() as s, s.post(self.base + path) as r:
            return await r.json()


def row_of(st: dict[str, Any]) -> dict[str, int]:
    mi, pm = st["malloc"], st["pymalloc"]
    return {
        "release_max_ms": st["releases"]["max_ms"],
        "release_mean_ms": st["releases"]["mean_ms"],
        "releases": st["releases"]["count"],
        "rss": st["status"]["VmRSS"],
        "anon": st["status"]["RssAnon"],
        "glibc_used": mi["used"] // KIB,
        "glibc_free": mi["free"] // KIB,
        "py_arenas": pm.get("arenas", 0),
        "py_used": pm.get("used_blocks", 0) // KIB,
        "py_free": (pm.get("free_blocks", 0) + pm.get("free_pools", 0)) // KIB,
        "objects": st["objects"],
    }


class Subject:
    """One Warden variant: its process, its control listener, and what was measured of it."""

    def __init__(
        self, ov: Any, name: str, args: argparse.Namespace, tmp: Path, fport: int, pub: Path, token: str, body: bytes, tracemalloc_on: bool
    ) -> None:
        self.ov, self.args, self.body, self.tm = ov, args, body, tracemalloc_on
        env, extra, server = variant_args(name)
        wport, aport, cport = ov.free_port(), ov.free_port(), ov.free_port()
        cfg = write_config(
            tmp / re.sub(r"[^A-Za-z0-9]+", "_", name), wport, aport, fport, pub, args.plugins, args.upstream_connections, server
        )
        self.cmd = [sys.executable, str(SELF), "--child", str(cfg), str(cport), *extra, *(["--tracemalloc"] if tracemalloc_on else [])]
        self.env = {"BENCH_PROVIDER_KEY": "sk-bench", **env}
        self.ready_url = f"http://127.0.0.1:{aport}/readyz"
        self.url = f"http://127.0.0.1:{wport}/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.cport = cport
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctl: Control | None = None
        self.result: dict[str, Any] = {"name": name, "bursts": []}

    async def start(self) -> None:
        """Start Warden, warm it up, and take the 'before' sample."""
        self.proc = self.ov.spawn(self.cmd, env=self.env)
        ctl = self.ctl = Control(self.cport, self.proc.pid)
        await self.ov.wait_up(self.ready_url, 120.0)
        await self.ov.wait_up(f"{ctl.base}/stats")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            for _ in range(self.args.warmup):
                await one_stream(s, self.url, self.body, self.headers)
        await asyncio.sleep(self.args.settle_s)
        await ctl.post("/gc")
        if self.tm:
            await ctl.post("/snapshot/before")
        if self.args.survivors:
            await ctl.post("/ids")
        self.result["before"] = row_of(await ctl.get("/stats"))

    async def burst(self) -> dict[str, Any]:
        """One burst; its samples are taken by :meth:`samples` (which may overlap another variant's burst)."""
        ctl = self.ctl
        assert ctl is not None and self.proc is not None

        async def all_open() -> dict[str, int]:
            if self.tm:
                await ctl.post("/snapshot/mid")
            return row_of(await ctl.get("/stats"))

        b = await burst(self.url, self.body, self.headers, self.args.streams, self.proc.pid, self.args.timeout_s, all_open)
        b["ended"] = time.monotonic()
        b["samples"] = []
        self.result["bursts"].append(b)
        return b

    async def samples(self, b: dict[str, Any]) -> None:
        assert self.ctl is not None
        for at in self.args.sample_at:
            await asyncio.sleep(max(0.0, b["ended"] + at - time.monotonic()))
            await self.ctl.post("/gc")
            b["samples"].append((at, row_of(await self.ctl.get("/stats"))))

    async def finish(self) -> None:
        """The last measurements: tracemalloc differences, or what one malloc release gives back; survivors."""
        ctl = self.ctl
        assert ctl is not None
        r = self.result
        if self.tm:
            await ctl.post("/snapshot/after")
            r["diff"] = await ctl.get("/diff/before/after")
            if r["bursts"] and r["bursts"][-1]["mid"] is not None:
                r["mid_diff"] = await ctl.get("/diff/before/mid")
        else:
            # Last: a release changes what a next burst would start from.
            await ctl.post("/trim")
            r["trimmed"] = row_of(await ctl.get("/stats"))
        if self.args.survivors:
            await ctl.post("/gc")
            r["survivors"] = await ctl.get("/survivors")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def run_subjects(subjects: list[Subject], rounds: int) -> None:
    """Every subject started; then ``rounds`` rounds in which each subject in turn has one burst.  A
    subject's samples after its burst are taken while the next subjects have theirs (an idle Warden's
    memory does not depend on another process's load), and a round ends when all its samples are in;
    bursts of different variants thus alternate under the same background load of the machine."""
    try:
        for sub in subjects:
            print(f"starting {sub.result['name']} ...", file=sys.stderr, flush=True)
            await sub.start()
        for i in range(rounds):
            pending = []
            for sub in subjects:
                print(f"round {i + 1}: {sub.result['name']} ...", file=sys.stderr, flush=True)
                b = await sub.burst()
                pending.append(asyncio.create_task(sub.samples(b)))
            await asyncio.gather(*pending)
        for sub in subjects:
            await sub.finish()
    finally:
        for sub in subjects:
            sub.stop()


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = io.StringIO()
    p = out.write
    p(f"\n{args.streams} concurrent streams x {args.bursts} bursts, {args.words} content events each {args.chunk_ms} ms apart, ")
    p(
        f"upstream max_connections {args.upstream_connections}, plugins {['headers', *args.plugins]}, request body {args.body_bytes} bytes\n\n"
    )
    p("Memory in MiB.  'when': before the first burst; 'open' once all streams of the burst have their headers;\n")
    p("'+N s' N seconds after the burst ended (gc.collect() first); '+trim' after one release, last.  '+%' and\n")
    p("KiB/stream compare RSS with 'before'.  malloc: the C allocator's bytes in use / free but kept; py: pymalloc's\n")
    p("1 MiB arenas, bytes in live blocks, bytes free inside them; objects: len(gc.get_objects())\n\n")
    p("| variant | burst | when | RSS | +% | KiB/stream | malloc used | malloc free | py arenas | py used | py free | objects |\n")
    p("|---|---|---|---|---|---|---|---|---|---|---|---|\n")

    def line(name: str, burst: str, when: str, bf: dict[str, int], a: dict[str, int]) -> None:
        grow = f"{(a['rss'] - bf['rss']) / bf['rss'] * 100:+.1f}"
        per = f"{(a['rss'] - bf['rss']) / args.streams:.1f}"
        py = [str(a["py_arenas"]), mib(a["py_used"]), mib(a["py_free"])] if a["py_arenas"] else ["n/a"] * 3
        p(
            f"| {name} | {burst} | {when} | {mib(a['rss'])} | {grow} | {per} | {mib(a['glibc_used'])} | {mib(a['glibc_free'])} | {' | '.join(py)} | {a['objects']} |\n"
        )

    results = [r for r in results if "before" in r]
    for r in results:
        bf = r["before"]
        line(r["name"], "—", "before", bf, bf)
        for i, b in enumerate(r["bursts"], 1):
            if b["mid"] is not None:
                line(r["name"], str(i), "open", bf, b["mid"])
            for at, a in b["samples"]:
                line(r["name"], str(i), f"+{at:g} s", bf, a)
        if "trimmed" in r:
            line(r["name"], str(len(r["bursts"])), "+trim", bf, r["trimmed"])
    p("\nPer burst: peak RSS; wall time; Warden's CPU seconds (user + system) during the burst; the releases\n")
    p("(malloc_trim(0) or jemalloc purge) run by the idle task so far, and the longest one\n\n")
    p("| variant | burst | peak RSS | +% | wall s | Warden CPU s | MiB received | releases | longest release ms |\n")
    p("|---|---|---|---|---|---|---|---|---|\n")
    for r in results:
        bf = r["before"]
        for i, b in enumerate(r["bursts"], 1):
            last = b["samples"][-1][1] if b["samples"] else bf
            p(
                f"| {r['name']} | {i} | {mib(b['peak'])} | {(b['peak'] - bf['rss']) / bf['rss'] * 100:+.1f} | {b['wall']:.1f} | {b['cpu']:.2f} | "
                f"{b['received'] / 2**20:.1f} | {last['releases']} | {last['release_max_ms']:.1f} |\n"
            )
        cpus = sorted(b["cpu"] for b in r["bursts"])
        if len(cpus) > 2:
            p(f"| {r['name']} | median | | | | {cpus[len(cpus) // 2]:.2f} | | | |\n")
    for r in results:
        sv = r.get("survivors")
        if not sv:
            continue
        p(f"\nsurvivors, {r['name']}: {sv['objects']} objects ({sv['bytes'] / KIB:.1f} KiB) allocated since 'before' are alive, ")
        p(f"in {sv['ranges']} distinct 1 MiB address ranges\n\n| type | count | KiB | 1 MiB ranges | examples |\n|---|---|---|---|---|\n")
        for t in sv["by_type"]:
            ex = "; ".join(e.replace("|", "\\|").replace("\n", " ") for e in t["examples"])[:160]
            p(f"| {t['type']} | {t['count']} | {t['bytes'] / KIB:.1f} | {t['ranges']} | `{ex}` |\n")
    for r in results:
        for key, what in (("mid_diff", "alive with every stream open"), ("diff", "alive after the bursts")):
            d = r.get(key)
            if not d:
                continue
            p(f"\ntracemalloc, {r['name']}: Python allocations {what}, minus before: {d.get('growth', 0) / KIB:.1f} KiB")
            p(f" ({d.get('growth', 0) / KIB / args.streams:.2f} KiB per stream)\n\n")
            p("| size diff KiB | count diff | allocated at |\n|---|---|---|\n")
            for s in d.get("by_line", []):
                p(f"| {s['size_diff'] / KIB:.1f} | {s['count_diff']} | {s['where']} |\n")
            p("\nobject types that grew: " + ", ".join(f"{k} +{v}" for k, v in d["types"]) + "\n")
            for s in d.get("by_trace", [])[:3]:
                p(f"\n{s['size_diff'] / KIB:.1f} KiB in {s['count_diff']} blocks from:\n")
                for f in s["trace"]:
                    p(f"    {f}\n")
    return out.getvalue()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=1000, help="concurrent streams per burst")
    ap.add_argument("--bursts", type=int, default=2, help="bursts per variant (a second one tells a leak from a high-water mark)")
    ap.add_argument("--words", type=int, default=100, help="content events per stream")
    ap.add_argument("--chunk-ms", type=float, default=10.0, help="the provider's delay between events")
    ap.add_argument("--prompt-kib", type=int, default=0, help="add a user message of this many KiB (a request body of ~1.5 KB without)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--settle-s", type=float, default=3.0, help="idle time after the warm-up, before the first sample")
    ap.add_argument(
        "--sample-at",
        type=float,
        nargs="+",
        default=[3.0, 40.0],
        help="seconds after a burst to sample (gc.collect() first); 40 s is past the upstream pool's idle keep-alive (15 s, closed at its next cleanup, up to 30 s)",
    )
    ap.add_argument("--timeout-s", type=float, default=120.0, help="bound on one burst")
    ap.add_argument("--upstream-connections", type=int, default=1000, help="[upstream] max_connections")
    ap.add_argument("--plugins", nargs="*", default=[], help="plugins besides 'headers' (limits, tools, retrieval)")
    ap.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="'baseline' or PARTS joined by '+' (default: baseline and each remedy; with --fix: baseline)",
    )
    ap.add_argument("--fix", action="append", default=[], help="also run variant fix:NAME (repeatable)")
    ap.add_argument("--tracemalloc", action="store_true", help="also run baseline under tracemalloc and list what it still holds")
    ap.add_argument(
        "--survivors",
        action="store_true",
        help="after the last sample, list the objects allocated since 'before' that are still alive, by type",
    )
    args = ap.parse_args()
    if args.variants is None:
        args.variants = (
            ["baseline"] if args.fix else ["baseline", "arena2", "trim", "malloc+trim", "jemalloc", "jemalloc+malloc", "fix:exact-body"]
        )
    variants = list(dict.fromkeys([*args.variants, *(f"fix:{f}" for f in args.fix)]))
    for v in variants:
        variant_args(v)

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from bench import overhead as ov

    tmp = Path(tempfile.mkdtemp(prefix="warden-bench-mem-"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = tmp / "pub.pem"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    token = jwt.encode(
        {"iss": ov.ISS, "aud": ov.AUD, "sub": "bench", "tenant": "bench", "groups": ["g"], "exp": int(time.time()) + 7200},
        priv,
        algorithm="RS256",
    )
    messages = [{"role": "system", "content": "You are a helpful assistant." * 4}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"Message number {i} with some words to make the body realistic. " * 3}
        for i in range(6)
    ]
    if args.prompt_kib:
        # A retrieval-sized prompt: one more user message of that many KiB of text.
        words = " ".join(f"passage{i % 9973:04d}" for i in range(args.prompt_kib * 1024 // 12 + 1))
        messages.append({"role": "user", "content": words[: args.prompt_kib * 1024]})
    body = orjson.dumps({"model": "gpt-bench", "messages": messages, "stream": True})

    fport = ov.free_port()
    fake = ov.spawn([sys.executable, "-c", FAKE, str(fport), str(args.words), str(args.chunk_ms / 1000)])
    args.body_bytes = len(body)
    subjects = [Subject(ov, v, args, tmp, fport, pub, token, body, False) for v in variants]
    results = [sub.result for sub in subjects]
    try:
        await ov.wait_up(f"http://127.0.0.1:{fport}/v1/models")
        await run_subjects(subjects, args.bursts)
        if args.tracemalloc:
            # Alone: tracemalloc slows its Warden several times over.
            tm = Subject(ov, "baseline", args, tmp / "tm", fport, pub, token, body, True)
            tm.result["name"] = "baseline (tracemalloc)"
            results.append(tm.result)
            await run_subjects([tm], args.bursts)
    finally:
        fake.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            fake.wait(10)
        # What was measured is printed even when a later variant failed.
        print(report(results, args))
    print(f"process logs: {ov.LOGS}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2:]))
    import uvloop

    uvloop.run(main())
