"""The real ``warden serve`` process: probes, graceful drain on SIGTERM, config reload."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import AUDIENCE, ISSUER, Keys, make_token
from tests.fakeprovider import FakeProvider, Reply


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def write_config(
    path: Path, fake: FakeProvider, keys: Keys, port: int, aport: int, header_value: str = "one", extra: str = "", drain_s: float = 10, audit: str = "enabled = false"
) -> None:
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{aport}"
drain_s = {drain_s}
use_uvloop = true

[upstream]
base_url = "{fake.base_url}"
api_key_env = "WARDEN_TEST_PROVIDER_KEY"

[auth]
algorithms = ["RS256"]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
public_key_file = "{keys.public_path}"

[audit]
{audit}

[plugins]
enabled = ["headers"]

[headers]
add = {{ x-policy = "{header_value}" }}
{extra}
"""
    )


class Proc:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, aport: int) -> None:
        self.proc, self.port, self.aport = proc, port, aport
        self.base = f"http://127.0.0.1:{port}/v1"
        self.admin = f"http://127.0.0.1:{aport}"


async def start_proc(cfg: Path, port: int, aport: int) -> Proc:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_warden.proxy", "serve", "--config", str(cfg), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ}
    )
    p = Proc(proc, port, aport)
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            try:
                async with s.get(f"{p.admin}/readyz") as r:
                    if r.status == 200:
                        return p
            except aiohttp.ClientError:
                pass
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
    out = await proc.stdout.read() if proc.stdout else b""
    proc.kill()
    raise AssertionError(f"warden did not become ready: {out.decode()[-2000:]}")


@pytest.fixture
async def served(tmp_path: Path, fake: FakeProvider, rsa_keys: Keys) -> AsyncIterator[tuple[Proc, Path]]:
    port, aport = free_port(), free_port()
    cfg = tmp_path / "config.toml"
    write_config(cfg, fake, rsa_keys, port, aport)
    p = await start_proc(cfg, port, aport)
    yield p, cfg
    if p.proc.returncode is None:
        p.proc.kill()
        await p.proc.wait()


async def test_probes_and_metrics(served: tuple[Proc, Path], rsa_keys: Keys) -> None:
    p, _ = served
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{p.admin}/healthz") as r:
            assert r.status == 200
        h = {"Authorization": f"Bearer {make_token(rsa_keys)}"}
        async with s.post(f"{p.base}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}, headers=h) as r:
            assert r.status == 200 and r.headers["x-policy"] == "one"
        async with s.get(f"{p.admin}/metrics") as r:
            text = await r.text()
            assert 'warden_requests_total{model="m",route="chat",status_class="2xx"} 1.0' in text


async def test_sigterm_drains_an_open_stream(served: tuple[Proc, Path], fake: FakeProvider, rsa_keys: Keys) -> None:
    p, _ = served
    fake.push(Reply(content=" ".join(f"w{i}" for i in range(15)), chunk_delay_s=0.08))
    h = {"Authorization": f"Bearer {make_token(rsa_keys)}"}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(f"{p.base}/chat/completions", json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}, headers=h)
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        p.proc.send_signal(signal.SIGTERM)
        saw_draining = False
        for _ in range(20):
            try:
                async with s.get(f"{p.admin}/readyz") as r:
                    if r.status == 503:
                        saw_draining = True
                        break
            except aiohttp.ClientError:
                break
            await asyncio.sleep(0.02)
        assert saw_draining, "readiness turns false while draining"
        rest = await resp.content.read()
        assert rest.rstrip().endswith(b"data: [DONE]"), "the open stream finished"
        assert b"w14" in rest
    assert await asyncio.wait_for(p.proc.wait(), 15) == 0


async def test_sighup_reload_and_invalid_config_keeps_old(served: tuple[Proc, Path], fake: FakeProvider, rsa_keys: Keys) -> None:
    p, cfg = served
    h = {"Authorization": f"Bearer {make_token(rsa_keys)}"}
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}

    async def header() -> str:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{p.base}/chat/completions", json=body, headers=h) as r:
                return r.headers["x-policy"]

    write_config(cfg, fake, rsa_keys, p.port, p.aport, header_value="two")
    p.proc.send_signal(signal.SIGHUP)
    for _ in range(100):
        if await header() == "two":
            break
        await asyncio.sleep(0.05)
    assert await header() == "two"
    cfg.write_text(cfg.read_text().replace('x-policy = "two"', 'x-policy = "three"').replace("[headers]", "[headers]\nbogus_key = 1"))
    p.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    assert await header() == "two", "an invalid config is refused and the old one stays"


async def test_configmap_style_symlink_swap_reloads(tmp_path: Path, fake: FakeProvider, rsa_keys: Keys) -> None:
    port, aport = free_port(), free_port()
    d1, d2 = tmp_path / "..2026_a", tmp_path / "..2026_b"
    d1.mkdir()
    d2.mkdir()
    write_config(d1 / "config.toml", fake, rsa_keys, port, aport, header_value="old")
    write_config(d2 / "config.toml", fake, rsa_keys, port, aport, header_value="new")
    (tmp_path / "..data").symlink_to(d1.name)
    (tmp_path / "config.toml").symlink_to("..data/config.toml")
    p = await start_proc(tmp_path / "config.toml", port, aport)
    try:
        tmp_link = tmp_path / "..data_tmp"
        tmp_link.symlink_to(d2.name)
        os.replace(tmp_link, tmp_path / "..data")
        h = {"Authorization": f"Bearer {make_token(rsa_keys)}"}
        got = None
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                async with s.post(f"{p.base}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}, headers=h) as r:
                    got = r.headers["x-policy"]
                if got == "new":
                    break
                await asyncio.sleep(0.1)
        assert got == "new"
    finally:
        p.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(p.proc.wait(), 15) == 0


async def test_invalid_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[server]\nlisten = "nowhere"\n')
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_warden.proxy", "serve", "--config", str(cfg), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"server.listen" in err
    cfg.write_text("[upstream]\nbase_urll = 'http://x'\n")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_warden.proxy", "serve", "--config", str(cfg), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 2 and b"upstream.base_urll" in err and b"unknown key" in err




async def test_port_in_use_exits_cleanly(tmp_path: Path, fake: FakeProvider, rsa_keys: Keys) -> None:
    import socket as _socket

    busy = _socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        cfg = tmp_path / "config.toml"
        write_config(cfg, fake, rsa_keys, busy.getsockname()[1], free_port())
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_warden.proxy", "serve", "--config", str(cfg), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 1
        assert b"cannot listen" in out
    finally:
        busy.close()


# -- the drain keeps its deadline ----------------------------------------------------------------


async def _served(tmp_path: Path, fake: FakeProvider, keys: Keys, drain_s: float, audit: str = "enabled = false") -> Proc:
    port, aport = free_port(), free_port()
    cfg = tmp_path / "config.toml"
    write_config(cfg, fake, keys, port, aport, drain_s=drain_s, audit=audit)
    return await start_proc(cfg, port, aport)


def _sse_errors(raw: bytes) -> list[dict[str, object]]:
    import orjson

    out = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            doc = orjson.loads(line[6:])
            if "error" in doc:
                out.append(doc["error"])
    return out


async def _refused(port: int) -> bool:
    try:
        _, w = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    w.close()
    return False


async def test_drain_cuts_a_stream_longer_than_drain_s_and_exits_in_time(tmp_path: Path, fake: FakeProvider, rsa_keys: Keys) -> None:
    """A 20 s stream, drain_s = 3: the stream ends with a server.drain error event before the deadline,
    its audit record says so, and the process exits within drain_s + EXIT_MARGIN_S."""
    import sqlite3

    from llm_warden.proxy.serve import EXIT_MARGIN_S, cut_lead

    drain_s = 3.0
    db = tmp_path / "audit.db"
    p = await _served(tmp_path, fake, rsa_keys, drain_s, audit=f'enabled = true\npath = "{db}"')
    try:
        fake.push(Reply(content=" ".join(f"w{i}" for i in range(200)), chunk_delay_s=0.1))
        h = {"Authorization": f"Bearer {make_token(rsa_keys)}"}
        async with aiohttp.ClientSession() as s:
            resp = await s.post(f"{p.base}/chat/completions", json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}, headers=h)
            rid = resp.headers["x-request-id"]
            assert (await resp.content.readline()).startswith(b"data: ")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            p.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with s.get(f"{p.admin}/readyz") as r:
                assert r.status == 503, "readiness is false while draining"
            assert await _refused(p.port), "the data listener stops accepting at once"
            rest = await asyncio.wait_for(resp.content.read(), drain_s + 2)
            ended = loop.time() - t0
        code = await asyncio.wait_for(p.proc.wait(), drain_s + EXIT_MARGIN_S + 5)
        exited = loop.time() - t0
    finally:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()
    print(f"drain_s={drain_s}: stream ended {ended:.2f} s, process exited {exited:.2f} s after SIGTERM")
    assert code == 0
    assert drain_s - cut_lead(drain_s) - 0.3 <= ended < drain_s, "the stream ran until the cut, and ended before the deadline"
    assert exited < drain_s + EXIT_MARGIN_S, exited
    assert b"data: [DONE]" not in rest, "a cut stream must not look complete"
    errors = _sse_errors(rest)
    assert errors and "server.drain" in str(errors[-1]["message"]), rest[-400:]
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT status FROM records WHERE kind = 'exchange' AND request_id = ?", (rid,)).fetchall()
    assert rows == [(503,)], "the audit record tells the stream was cut"


async def test_a_stalled_answer_is_cut_off_at_the_deadline(tmp_path: Path, fake: FakeProvider, rsa_keys: Keys) -> None:
    """A non-streamed request whose provider never answers: answered 503 at the cut, and the process exits in time."""
    from llm_warden.proxy.serve import EXIT_MARGIN_S

    drain_s = 2.0
    p = await _served(tmp_path, fake, rsa_keys, drain_s)
    try:
        fake.push(Reply(hang=True))
        h = {"Authorization": f"Bearer {make_token(rsa_keys)}"}
        async with aiohttp.ClientSession() as s:
            call = asyncio.create_task(s.post(f"{p.base}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}, headers=h))
            for _ in range(100):
                if fake.requests:
                    break
                await asyncio.sleep(0.02)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            p.proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(p.proc.wait(), drain_s + EXIT_MARGIN_S + 5)
            exited = loop.time() - t0
            try:
                r = await asyncio.wait_for(call, 2)
                status = r.status
                r.release()
            except (aiohttp.ClientError, TimeoutError):
                status = 0
    finally:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()
    print(f"stalled answer: process exited {exited:.2f} s after SIGTERM (client saw {status or 'a closed connection'})")
    assert code in (0, 1)
    assert exited < drain_s + EXIT_MARGIN_S, exited
    assert status == 503, "answered at the cut (server.drain) and recorded, not dropped"


async def test_idle_keepalive_connections_do_not_hold_the_drain(tmp_path: Path, fake: FakeProvider, rsa_keys: Keys) -> None:
    p = await _served(tmp_path, fake, rsa_keys, drain_s=10)
    h = {"Authorization": f"Bearer {make_token(rsa_keys)}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{p.base}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}, headers=h) as r:
            assert r.status == 200
        # The session keeps that connection open (idle, kept alive).
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        p.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(p.proc.wait(), 15) == 0
        took = loop.time() - t0
    assert took < 2.0, f"an idle connection held the drain for {took:.2f} s"


async def test_second_sigterm_cuts_at_once(tmp_path: Path, fake: FakeProvider, rsa_keys: Keys) -> None:
    p = await _served(tmp_path, fake, rsa_keys, drain_s=20)
    try:
        fake.push(Reply(content=" ".join(f"w{i}" for i in range(300)), chunk_delay_s=0.1))
        h = {"Authorization": f"Bearer {make_token(rsa_keys)}"}
        async with aiohttp.ClientSession() as s:
            resp = await s.post(f"{p.base}/chat/completions", json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}, headers=h)
            await resp.content.readline()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            p.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            p.proc.send_signal(signal.SIGTERM)
            rest = await asyncio.wait_for(resp.content.read(), 5)
        assert await asyncio.wait_for(p.proc.wait(), 10) == 0
        took = loop.time() - t0
    finally:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()
    assert took < 3.0, took
    errors = _sse_errors(rest)
    assert errors and "server.drain" in str(errors[-1]["message"])


async def test_http_edge_is_on_in_the_served_process(served: tuple[Proc, Path]) -> None:
    """The real process answers a parser error with JSON (the edge wraps both listeners)."""
    p, _ = served
    for port in (p.port, p.aport):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer eyJSECRET" + b"A" * 20000 + b"\r\n\r\n")
        await w.drain()
        raw = await asyncio.wait_for(r.read(), 5)
        w.close()
        assert b" 431 " in raw.split(b"\r\n", 1)[0] and b"server.max_header_bytes" in raw
        assert b"SECRET" not in raw

