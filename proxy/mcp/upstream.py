"""Upstream MCP servers: Streamable HTTP ones (relayed request by request) and stdio ones (supervised).

HTTP: each caller message is POSTed to the server's ``url`` with Warden's
own headers (``headers_env``, read from the environment), the upstream
session id the caller's sealed session holds, and ``traceparent``; never the
caller's token.

stdio: Warden starts ``command`` once, performs the ``initialize`` handshake
itself, and multiplexes every caller's requests over the process's
stdin/stdout under ids of its own.  When the process exits it is started
again with exponential backoff (0.25 s doubling to 10 s; back to 0.25 s after
30 s of good health); each start is a new *generation* and the sessions of
the old one end (404, the caller starts a new session).  Requests the
server itself sends (sampling, elicitation, roots) are answered with an
error: a stdio server has one pipe and no caller to route them to.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

import aiohttp
import orjson

from llm_warden.proxy.errors import ServiceUnavailable, UpstreamError, UpstreamTimeout
from llm_warden.proxy.mcp.config import McpServerConfig
from llm_warden.proxy.mcp.jsonrpc import METHOD_NOT_FOUND, McpRefusal, error_message

log = logging.getLogger("warden.mcp")
CLIENT_INFO = {"name": "warden-mcp-gateway", "version": "1"}
STDIO_PROTOCOL = "2025-11-25"
BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 10.0
HEALTHY_AFTER_S = 30.0


class HttpUpstream:
    """One Streamable HTTP server."""

    def __init__(self, cfg: McpServerConfig, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.session = session
        self.headers = cfg.upstream_headers()

    def _headers(self, upstream_sid: str | None, version: str | None, traceparent: str | None) -> dict[str, str]:
        h = {"Accept": "application/json, text/event-stream", **self.headers}
        if upstream_sid:
            h["Mcp-Session-Id"] = upstream_sid
        if version:
            h["MCP-Protocol-Version"] = version
        if traceparent:
            h["traceparent"] = traceparent
        return h

    async def send(self, method: str, body: bytes | None, upstream_sid: str | None, version: str | None, traceparent: str | None, last_event_id: str | None = None) -> aiohttp.ClientResponse:
        """Open one upstream request; the caller reads and releases the response."""
        headers = self._headers(upstream_sid, version, traceparent)
        if body is not None:
            headers["Content-Type"] = "application/json"
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        # The server's own stream (GET) may stay quiet for as long as the caller keeps it open.
        quiet = None if method == "GET" else self.cfg.timeout_s
        timeout = aiohttp.ClientTimeout(total=None, connect=min(10.0, self.cfg.timeout_s), sock_read=quiet)
        try:
            return await self.session.request(method, self.cfg.url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
        except TimeoutError:
            raise UpstreamTimeout(f"MCP server {self.cfg.name!r} did not answer in time", rule="mcp.servers.timeout_s") from None
        except aiohttp.ClientError as e:
            raise UpstreamError(f"MCP server {self.cfg.name!r} is unreachable ({type(e).__name__})", rule="mcp.servers.url") from None


class StdioServer:
    """One supervised stdio server."""

    def __init__(self, cfg: McpServerConfig, max_message_bytes: int) -> None:
        self.cfg = cfg
        self.max_message_bytes = max_message_bytes
        self.generation = 0
        self.restarts = 0
        self.init_result: dict[str, Any] | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._write_lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"mcp-stdio-{self.cfg.name}")

    async def stop(self) -> None:
        self._stopping = True
        self._ready.clear()
        await self._terminate()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _supervise(self) -> None:
        backoff = BACKOFF_START_S
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("MCP stdio server %s failed: %s: %s", self.cfg.name, type(e).__name__, e)
            self._ready.clear()
            self._fail_pending()
            if self._stopping:
                return
            if time.monotonic() - started > HEALTHY_AFTER_S:
                backoff = BACKOFF_START_S
            log.warning("MCP stdio server %s exited; restarting in %.2f s", self.cfg.name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
            self.restarts += 1

    async def _run_once(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            self.cfg.command,
            *self.cfg.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.cfg.process_env(),
            limit=self.max_message_bytes + 1,
        )
        self.proc = proc
        reader = asyncio.create_task(self._read(proc))
        stderr = asyncio.create_task(self._drain_stderr(proc))
        try:
            result = await self._call_raw(
                "initialize", {"protocolVersion": STDIO_PROTOCOL, "capabilities": {}, "clientInfo": CLIENT_INFO}, self.cfg.timeout_s
            )
            if "result" not in result or not isinstance(result["result"], dict):
                raise UpstreamError("the stdio server refused initialize", rule="mcp.servers.command")
            self.init_result = result["result"]
            await self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})
            self.generation += 1
            self._ready.set()
            log.info("MCP stdio server %s ready (generation %d, pid %d)", self.cfg.name, self.generation, proc.pid)
            await proc.wait()
        finally:
            self._ready.clear()
            await self._terminate()
            for t in (reader, stderr):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                log.error("MCP stdio server %s wrote a message over %d bytes; restarting it", self.cfg.name, self.max_message_bytes)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return
            if not line:
                return
            try:
                msg = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("MCP stdio server %s wrote a line that is not JSON; ignored", self.cfg.name)
                continue
            if not isinstance(msg, dict):
                continue
            if "method" in msg:
                if "id" in msg:
                    # A request from the server: no caller to route it to on a stdio pipe.
                    await self._write(error_message(msg["id"], METHOD_NOT_FOUND, "Warden does not relay server-initiated requests of stdio servers"))
                continue
            rid = msg.get("id")
            fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            line = await proc.stderr.readline()
            if not line:
                return
            log.debug("MCP stdio server %s: %s", self.cfg.name, line[:500].decode("utf-8", "replace").rstrip())

    def _fail_pending(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(UpstreamError(f"MCP stdio server {self.cfg.name!r} exited during the request", rule="mcp.servers.command"))
        self._pending.clear()

    async def _write(self, msg: dict[str, Any]) -> None:
        proc = self.proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            raise ServiceUnavailable(f"MCP stdio server {self.cfg.name!r} is not running", rule="mcp.servers.command", headers={"Retry-After": "1"})
        async with self._write_lock:
            try:
                proc.stdin.write(orjson.dumps(msg) + b"\n")
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                raise UpstreamError(f"MCP stdio server {self.cfg.name!r} exited", rule="mcp.servers.command") from None

    async def _call_raw(self, method: str, params: dict[str, Any], wait_s: float) -> dict[str, Any]:
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._write({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
            return await asyncio.wait_for(fut, wait_s)
        except TimeoutError:
            raise UpstreamTimeout(f"MCP stdio server {self.cfg.name!r} did not answer in time", rule="mcp.servers.timeout_s") from None
        finally:
            self._pending.pop(rid, None)

    async def request(self, method: str, params: dict[str, Any], generation: int) -> dict[str, Any]:
        """One caller request of session ``generation``; the response message (its id is Warden's)."""
        if not self.ready:
            raise ServiceUnavailable(f"MCP stdio server {self.cfg.name!r} is (re)starting", rule="mcp.servers.command", headers={"Retry-After": "1"})
        if generation != self.generation:
            raise McpRefusal("the session ended when the stdio server restarted; start a new session", rule="mcp.session", status=404)
        return await self._call_raw(method, params, self.cfg.timeout_s)

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params:
            msg["params"] = params
        await self._write(msg)
