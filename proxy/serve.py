"""Run Warden: both listeners, signals, config reload, and a drain that keeps its deadline.

SIGTERM/SIGINT start the drain; with ``D = [server] drain_s``:

1. at once: ``/readyz`` answers 503, the data listener closes its socket (new
   connections are refused), idle kept-alive connections close, and every
   response still to come carries ``Connection: close``;
2. in-flight requests and streams run on; as soon as none is left the drain
   ends early;
3. at ``D - cut_lead(D)`` (see :func:`cut_lead`: 10 % of ``D``, at least 1 s,
   at most half of ``D``) ``Warden.stream_cut`` is set: every open stream ends
   with an OpenAI-format error event (rule ``server.drain``) and its audit
   record, and the handlers return;
4. at ``D``: whatever still runs is cancelled and its connection closed
   (at most :data:`FORCE_GRACE_S` for the cancelled handlers to clean up);
5. plugins, the audit log and the clients stop (at most :data:`STOP_BUDGET_S`),
   then the admin listener closes, and the process exits: 0, or 1 when the
   stores did not stop in time.

So the process exits at most ``D + EXIT_MARGIN_S`` after the signal.  A
second SIGTERM/SIGINT skips straight to step 3.  The admin listener keeps
answering probes and scrapes until step 5.

SIGHUP, or a change to the config file (including a ConfigMap's symlink
swap), reloads plugin policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from llm_warden.proxy.app import Warden
from llm_warden.proxy.config import Config, parse_hostport
from llm_warden.proxy.edge import Listener
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.memory import idle_trim

log = logging.getLogger("warden")

FORCE_GRACE_S = 1.0
"""After the drain deadline: how long cancelled handlers get to record and close."""
STOP_BUDGET_S = 3.0
"""How long plugins, the audit log and the clients get to stop."""
ADMIN_CLOSE_S = 0.5
"""How long the admin listener's last requests get."""
EXIT_MARGIN_S = FORCE_GRACE_S + STOP_BUDGET_S + ADMIN_CLOSE_S + 0.5
"""The process exits at most ``drain_s`` plus this long after SIGTERM (0.5 s of slack for the interpreter's exit)."""


def cut_lead(drain_s: float) -> float:
    """How long before the drain deadline open streams are cut: 10 % of ``drain_s``, at least 1 s, at most half of it."""
    return min(max(1.0, 0.1 * drain_s), drain_s / 2)


def _file_signature(path: str) -> tuple[str, int, int] | None:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return (real, st.st_mtime_ns, st.st_size)


async def _watch_config(w: Warden, interval_s: float) -> None:
    path = w.config.path
    if path is None:
        return
    last = _file_signature(path)
    while True:
        await asyncio.sleep(interval_s)
        sig = await asyncio.to_thread(_file_signature, path)
        if sig is not None and sig != last:
            last = sig
            log.info("config file %s changed; reloading", path)
            await w.reload()


def build_warden(config: Config) -> Warden:
    """Compose a Warden with the audit store the config asks for."""
    audit = None
    if config.audit.enabled:
        from llm_warden.proxy.audit.factory import build_audit

        audit = build_audit(config)
    return Warden(config, audit=audit)


def _stream_cut(w: Warden) -> asyncio.Event | None:
    cut = getattr(w, "stream_cut", None)
    return cut if isinstance(cut, asyncio.Event) else None


async def drain(w: Warden, data: Listener, drain_s: float, hurry: asyncio.Event | None = None) -> bool:
    """Drain the data listener within ``drain_s`` (steps 1-4 of the module docstring); True when nothing had to be cancelled.

    ``hurry``, once set, moves the stream cut to now.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + drain_s
    w.draining = True
    await data.stop_accepting()
    data.begin_drain()
    hurry = hurry or asyncio.Event()
    cut_at = deadline - cut_lead(drain_s)
    waiting = loop.create_task(data.wait_closed(cut_at - start))
    hurried = loop.create_task(hurry.wait())
    await asyncio.wait({waiting, hurried}, return_when=asyncio.FIRST_COMPLETED)
    hurried.cancel()
    if not waiting.done():
        waiting.cancel()
    if data.open_connections == 0:
        return True
    cut = _stream_cut(w)
    if cut is not None:
        log.warning("drain: cutting open streams", extra={"connections": data.open_connections, "left_s": round(deadline - loop.time(), 3)})
        cut.set()
    else:
        log.error("this Warden has no stream_cut event: open streams run until the drain deadline and are then cut off without an error event")
    if await data.wait_closed(deadline - loop.time()):
        return True
    log.error("drain deadline: cancelling what still runs", extra={"connections": data.open_connections})
    await data.abort(FORCE_GRACE_S)
    return False


async def run(config: Config, *, watch_interval_s: float = 2.0) -> int:
    w = build_warden(config)
    try:
        await w.start()
    except ConfigError:
        raise  # reported by the CLI, naming the key (exit 2)
    except Exception as e:
        # Warden.start has stopped what it started (the audit writer included), so the process can exit.
        log.error("cannot start: %s: %s", type(e).__name__, e)
        return 1
    host, port = parse_hostport(config.server.listen, "server.listen")
    ahost, aport = parse_hostport(config.server.admin_listen, "server.admin_listen")
    data = Listener(w.data_app(), "data", config.server, w.metrics, force_grace_s=FORCE_GRACE_S)
    admin = Listener(w.admin_app(), "admin", config.server, w.metrics, force_grace_s=ADMIN_CLOSE_S)
    await data.setup()
    await admin.setup()
    try:
        await admin.start(ahost, aport)
        await data.start(host, port, backlog=1024)
    except OSError as e:
        log.error("cannot listen: %s", e)
        await data.cleanup()
        await admin.cleanup()
        await w.stop()  # flush and checkpoint the audit log, close stores
        return 1
    log.info("warden listening", extra={"listen": config.server.listen, "admin_listen": config.server.admin_listen, "upstream": config.upstream.base_url})

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_term() -> None:
        if stop.is_set():
            hurry.set()
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    reloads: set[asyncio.Task[object]] = set()

    def on_hup() -> None:
        t = loop.create_task(w.reload())
        reloads.add(t)
        t.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    watcher = loop.create_task(_watch_config(w, watch_interval_s))
    trimmer = loop.create_task(idle_trim(lambda: w.inflight, lambda: w.begun, config.server.idle_trim_s)) if config.server.idle_trim_s > 0 else None
    await stop.wait()
    if trimmer is not None:
        trimmer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trimmer
    drain_s = config.server.drain_s
    log.info("draining", extra={"inflight": w.inflight, "connections": data.open_connections, "drain_s": drain_s})
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    clean = await drain(w, data, drain_s, hurry)
    await data.cleanup()
    code = 0
    try:
        await asyncio.wait_for(w.stop(), STOP_BUDGET_S)
    except TimeoutError:
        log.error("plugins, the audit log or the clients did not stop within %.1f s; exiting anyway", STOP_BUDGET_S)
        code = 1
    await admin.abort(0)
    await admin.cleanup()
    log.info("stopped", extra={"clean": clean})
    return code


def serve(config: Config) -> int:
    if config.server.use_uvloop:
        try:
            import uvloop

            return uvloop.run(run(config))
        except ImportError:
            pass
    return asyncio.run(run(config))
