"""Run Warden: both listeners, signals, config reload, graceful drain.

SIGTERM/SIGINT: readiness turns false, the listeners stop accepting, in-flight
requests and streams get up to ``[server] drain_s`` to finish, then plugins,
audit and clients close and the process exits 0.  SIGHUP, or a change to the
config file (including a ConfigMap's symlink swap), reloads plugin policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from aiohttp import web

from proxy.app import Warden
from proxy.config import Config, parse_hostport
from proxy.errors import ConfigError

log = logging.getLogger("warden")


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
        from proxy.audit.sqlite import build_audit

        audit = build_audit(config)
    return Warden(config, audit=audit)


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
    data_runner = web.AppRunner(w.data_app(), access_log=None, handle_signals=False, shutdown_timeout=config.server.drain_s)
    admin_runner = web.AppRunner(w.admin_app(), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await data_runner.setup()
    await admin_runner.setup()
    try:
        await web.TCPSite(admin_runner, ahost, aport, reuse_address=True).start()
        await web.TCPSite(data_runner, host, port, reuse_address=True, backlog=1024).start()
    except OSError as e:
        log.error("cannot listen: %s", e)
        await data_runner.cleanup()
        await admin_runner.cleanup()
        await w.stop()  # flush and checkpoint the audit log, close stores
        return 1
    log.info("warden listening", extra={"listen": config.server.listen, "admin_listen": config.server.admin_listen, "upstream": config.upstream.base_url})

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reloads: set[asyncio.Task[object]] = set()

    def on_hup() -> None:
        t = loop.create_task(w.reload())
        reloads.add(t)
        t.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    watcher = loop.create_task(_watch_config(w, watch_interval_s))
    await stop.wait()
    log.info("draining", extra={"inflight": w.inflight, "drain_s": config.server.drain_s})
    w.draining = True
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await data_runner.cleanup()
    await w.stop()
    await admin_runner.cleanup()
    log.info("stopped")
    return 0


def serve(config: Config) -> int:
    if config.server.use_uvloop:
        try:
            import uvloop

            return uvloop.run(run(config))
        except ImportError:
            pass
    return asyncio.run(run(config))
