"""The image's entrypoint, run locally: ENTRYPOINT + CMD of deploy/Dockerfile
with deploy/config.toml, in an environment shaped like the container's.

The config is the image's own, changed only where a test machine must differ
from a pod: ports (free ones), the admin bind address (loopback here), the
upstream URL (the fake provider), the JWT issuer/audience of the test tokens,
and the two path prefixes (/var/lib/warden -> a temporary state directory,
/var/run/secrets/warden -> temporary key files).  Everything else (plugins,
audit durability, limits, policy) is what the image runs.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import AUDIENCE, ISSUER, Keys, make_token
from tests.deploy.deploy_helpers import DEPLOY, STATE_DIR, dump_toml, parse_dockerfile
from tests.fakeprovider import FakeProvider, Reply

SECRETS_DIR = "/var/run/secrets/warden"
PROVIDER_KEY = "sk-deploy-test-" + secrets.token_hex(16)
ADMIN_TOKEN = secrets.token_urlsafe(32)


# Run as in a pod with readOnlyRootFilesystem: a user + mount namespace in which
# "/" is remounted read-only and only the state volume and /tmp stay writable.
_READ_ONLY_ROOT = 'mount --bind "$1" "$1" && mount --bind "$2" "$2" && mount -o remount,bind,ro / && shift 2 && exec "$@"'


def read_only_root_available() -> bool:
    exe = shutil.which("unshare")
    if exe is None:
        return False
    proc = subprocess.run([exe, "--user", "--map-root-user", "--mount", "sh", "-c", "mount -o remount,bind,ro / && true"], capture_output=True, timeout=10)
    return proc.returncode == 0


READ_ONLY_ROOT = read_only_root_available()


def read_only_root(argv: list[str], writable: list[Path]) -> list[str]:
    """argv wrapped to run with / read-only except ``writable`` (two directories)."""
    assert len(writable) == 2
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _READ_ONLY_ROOT, "sh", *map(str, writable), *argv]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_command() -> tuple[list[str], list[str], str, dict[str, str]]:
    """ENTRYPOINT, CMD, WORKDIR and ENV of the final stage of deploy/Dockerfile."""
    _, stages = parse_dockerfile((DEPLOY / "Dockerfile").read_text())
    final = stages[-1]
    env: dict[str, str] = {}
    for i in final.all("ENV"):
        for token in shlex.split(i.args):
            k, _, v = token.partition("=")
            env[k] = v
    return final.all("ENTRYPOINT")[-1].exec_form(), final.all("CMD")[-1].exec_form(), final.all("WORKDIR")[-1].args, env


def _relocate(value: Any, root: Path) -> Any:
    if isinstance(value, str):
        for prefix, sub in ((STATE_DIR, "state"), (SECRETS_DIR, "secrets")):
            if value == prefix or value.startswith(prefix + "/"):
                return str(root / sub) + value[len(prefix) :]
        return value
    if isinstance(value, list):
        return [_relocate(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _relocate(v, root) for k, v in value.items()}
    return value


@dataclass
class Adapted:
    path: Path
    data: dict[str, Any]
    port: int
    admin_port: int


def adapt_deploy_config(root: Path, fake: FakeProvider) -> Adapted:
    raw = tomllib.loads((DEPLOY / "config.toml").read_text())
    data = _relocate(raw, root)
    port, admin_port = free_port(), free_port()
    assert raw["server"]["listen"].startswith("127.0.0.1:")
    data["server"]["listen"] = f"127.0.0.1:{port}"
    data["server"]["admin_listen"] = f"127.0.0.1:{admin_port}"
    data["server"]["drain_s"] = 10.0
    data["upstream"]["base_url"] = fake.base_url
    data["auth"]["issuer"], data["auth"]["audience"] = ISSUER, AUDIENCE
    (root / "state").mkdir(mode=0o750)
    etc = root / "etc" / "warden"
    etc.mkdir(parents=True)
    configmap_publish(etc, "..2026_01_01_00_00_00.000000001", dump_toml(data))
    (etc / "config.toml").symlink_to("..data/config.toml")
    return Adapted(etc / "config.toml", data, port, admin_port)


def configmap_publish(etc: Path, version: str, text: str) -> None:
    """Publish config.toml the way the kubelet updates a ConfigMap volume: a new
    timestamped directory, then an atomic rename of the ``..data`` symlink."""
    (etc / version).mkdir()
    (etc / version / "config.toml").write_text(text)
    tmp = etc / "..data_tmp"
    tmp.symlink_to(version)
    os.replace(tmp, etc / "..data")


def write_secrets(root: Path, keys: Keys, data: dict[str, Any]) -> None:
    jwt_path = Path(data["auth"]["public_key_file"])
    jwt_path.parent.mkdir(parents=True, exist_ok=True)
    jwt_path.write_bytes(keys.public_pem)
    signing = Path(data["audit"]["signing_key_file"])
    signing.parent.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    signing.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    for p in (jwt_path, signing):
        p.chmod(0o440)


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    base: str
    admin: str
    log: Path
    adapted: Adapted
    state: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
async def served(tmp_path: Path, fake: FakeProvider, rsa_keys: Keys) -> AsyncIterator[Served]:
    adapted = adapt_deploy_config(tmp_path, fake)
    write_secrets(tmp_path, rsa_keys, adapted.data)
    entrypoint, cmd, workdir, image_env = image_command()
    assert cmd[0] == "--config"
    argv = [*entrypoint, *cmd[:1], str(adapted.path), *cmd[2:]]
    home = tmp_path / "tmp"
    home.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in image_env.items() if k != "PATH"}
    env.update(
        PATH=f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
        HOME=str(home),
        TMPDIR=str(home),
        OPENAI_API_KEY=PROVIDER_KEY,
        WARDEN_ADMIN_TOKEN=ADMIN_TOKEN,
    )
    env.update({k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")})
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert workdir == STATE_DIR
    state = tmp_path / "state"
    log = tmp_path / "warden.log"
    with log.open("wb") as out:
        exe = os.path.join(venv_bin, argv[0])
        assert os.access(exe, os.X_OK), f"{argv[0]} is not installed in {venv_bin} (pip install -e .)"
        command = [exe, *argv[1:]]
        if READ_ONLY_ROOT:
            command = read_only_root(command, [state, home])
        proc = await asyncio.create_subprocess_exec(*command, cwd=state, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT)
    s = Served(proc, f"http://127.0.0.1:{adapted.port}/v1", f"http://127.0.0.1:{adapted.admin_port}", log, adapted, state)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                if proc.returncode is not None:
                    break
                try:
                    async with session.get(f"{s.admin}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"warden did not become ready:\n{s.output()}")
        assert proc.returncode is None, f"warden exited with {proc.returncode}:\n{s.output()}"
        yield s
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_probes_and_metrics_on_the_admin_port(served: Served, fake: FakeProvider, rsa_keys: Keys) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{served.admin}/healthz") as r:
            assert r.status == 200
        async with s.get(f"{served.admin}/readyz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ready"
        h = {"Authorization": f"Bearer {make_token(rsa_keys)}"}
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
        async with s.post(f"{served.base}/chat/completions", json=body, headers=h) as r:
            assert r.status == 200, await r.text()
        async with s.post(f"{served.base}/chat/completions", json=body) as r:
            assert r.status == 401, "the deploy config refuses callers without a JWT"
        async with s.post(f"{served.admin}/admin/reload") as r:
            assert r.status == 401
        async with s.post(f"{served.admin}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 200, "the bootstrap admin token comes from [admin] token_env"
        async with s.get(f"{served.admin}/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    assert "# TYPE warden_requests_total counter" in text
    assert 'route="chat"' in text and 'status_class="2xx"' in text
    (req,) = fake.chat_requests()
    assert req.headers["Authorization"] == f"Bearer {PROVIDER_KEY}", "the provider key comes from Warden's environment"


def _written_outside_state(served: Served) -> list[str]:
    etc = served.adapted.path.parent
    secrets_dir = served.state.parent / "secrets"
    found = [str(p) for p in etc.rglob("*") if p.name not in ("config.toml", "..data") and not p.name.startswith("..2026")]
    found += [str(p) for p in secrets_dir.rglob("*") if p.is_file() and p.name not in ("public.pem", "signing.key")]
    return found


def _audit_db_on_volume(served: Served) -> bool:
    path = Path(served.adapted.data["audit"]["path"])
    return path.is_relative_to(served.state) and path.exists()


async def test_writes_only_under_the_state_volume(served: Served, rsa_keys: Keys) -> None:
    """With a read-only root filesystem, state must land on the volume; nothing else is written."""
    async with aiohttp.ClientSession() as s:
        h = {"Authorization": f"Bearer {make_token(rsa_keys)}"}
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
        async with s.post(f"{served.base}/chat/completions", json=body, headers=h) as r:
            assert r.status == 200
    assert await asyncio.to_thread(_written_outside_state, served) == []
    if served.adapted.data["audit"]["enabled"]:
        assert await asyncio.to_thread(_audit_db_on_volume, served)


async def test_sigterm_turns_readiness_false_before_exit(served: Served, fake: FakeProvider, rsa_keys: Keys) -> None:
    fake.push(Reply(content=" ".join(f"w{i}" for i in range(12)), chunk_delay_s=0.08))
    h = {"Authorization": f"Bearer {make_token(rsa_keys)}"}
    body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(f"{served.base}/chat/completions", json=body, headers=h)
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"data: ")
        served.proc.send_signal(signal.SIGTERM)
        statuses = []
        for _ in range(40):
            try:
                async with s.get(f"{served.admin}/readyz") as r:
                    statuses.append(r.status)
                    if r.status == 503:
                        assert (await r.json())["status"] == "draining"
                        break
            except aiohttp.ClientError:
                statuses.append(0)
                break
            await asyncio.sleep(0.02)
        assert statuses[-1] == 503, f"readiness never turned false before exit: {statuses}"
        assert served.proc.returncode is None, "still serving the open stream while not ready"
        rest = await resp.content.read()
        assert b"w11" in rest and rest.rstrip().endswith(b"data: [DONE]"), "the open stream finished during the drain"
    assert await asyncio.wait_for(served.proc.wait(), 15) == 0, served.output()


async def _metric(session: aiohttp.ClientSession, served: Served, line_prefix: str) -> float:
    async with session.get(f"{served.admin}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(line_prefix):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_configmap_update_reloads_in_place(served: Served, rsa_keys: Keys) -> None:
    """A ConfigMap update (symlink swap in the read-only config mount) reloads plugin
    sections without a restart; an invalid update is refused and the old config stays."""
    etc = served.adapted.path.parent
    h = {"Authorization": f"Bearer {make_token(rsa_keys)}"}
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
    applied = 'warden_config_reloads_total{result="applied"}'
    refused = 'warden_config_reloads_total{result="refused"}'

    async def header(s: aiohttp.ClientSession) -> str | None:
        async with s.post(f"{served.base}/chat/completions", json=body, headers=h) as r:
            assert r.status == 200
            return r.headers.get("x-deploy-config")

    async def wait_for(s: aiohttp.ClientSession, prefix: str, value: float) -> None:
        for _ in range(100):
            if await _metric(s, served, prefix) >= value:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{prefix} never reached {value}:\n{served.output()}")

    async with aiohttp.ClientSession() as s:
        assert await header(s) is None
        data = {**served.adapted.data, "headers": {"add": {"x-deploy-config": "two"}}}
        await asyncio.to_thread(configmap_publish, etc, "..2026_01_01_00_00_01.000000001", dump_toml(data))
        await wait_for(s, applied, 1)
        assert await header(s) == "two"
        bad = {**data, "server": {**data["server"], "no_such_key": 1}}
        await asyncio.to_thread(configmap_publish, etc, "..2026_01_01_00_00_02.000000001", dump_toml(bad))
        await wait_for(s, refused, 1)
        assert await header(s) == "two", "the running config stays after a refused update"
        assert served.proc.returncode is None
    assert "config reload refused" in served.output() and "no_such_key" in served.output()


@pytest.mark.skipif(not READ_ONLY_ROOT, reason="user and mount namespaces (unshare) are not available here")
def test_read_only_root_sandbox(tmp_path: Path) -> None:
    """The sandbox the entrypoint runs in refuses writes outside the two volumes."""
    state, home, other = tmp_path / "state", tmp_path / "tmp", tmp_path / "etc"
    for d in (state, home, other):
        d.mkdir()
    script = f'touch {state}/ok && touch {home}/ok && ! touch {other}/no 2>/dev/null && ! touch {tmp_path}/no 2>/dev/null'
    proc = subprocess.run(read_only_root(["sh", "-c", script], [state, home]), capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert (state / "ok").exists() and (home / "ok").exists()
    assert not (other / "no").exists() and not (tmp_path / "no").exists()


def test_adapted_deploy_config_loads(tmp_path: Path) -> None:
    """The deploy config, moved to temporary paths, passes Warden's own loader with every plugin it names."""
    fake = FakeProvider()
    fake.port = 1
    adapted = adapt_deploy_config(tmp_path, fake)
    from llm_warden.proxy.config import load_config

    cfg = load_config(adapted.path)
    assert cfg.audit.enabled
