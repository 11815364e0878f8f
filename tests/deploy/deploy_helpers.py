"""Helpers for the deployment tests: rendered kustomizations and their parts.

Rendering uses the real ``kubectl kustomize`` (kustomize v5 ships inside
kubectl).  Without kubectl the rendering tests fail in CI (``CI`` set) and are
skipped on a developer machine, with the reason printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
WARDEN_CONTAINER = "warden"
STATE_DIR = "/var/lib/warden"


def kustomizations() -> list[Path]:
    """Every directory under deploy/kubernetes that holds a buildable kustomization (not a Component)."""
    found = []
    for p in KUBERNETES.rglob("kustomization.yaml"):
        if yaml.safe_load(p.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(p.parent)
    return sorted(found)


def overlay_id(path: Path) -> str:
    return str(path.relative_to(KUBERNETES))


MIN_KUSTOMIZE = (5, 0)


def _unavailable(msg: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


_kubectl: str | None = None


def kubectl() -> str:
    """kubectl with kustomize >= 5 (the kustomization syntax used here), checked once."""
    global _kubectl
    if _kubectl is not None:
        return _kubectl
    exe = shutil.which("kubectl")
    if exe is None:
        _unavailable("kubectl (with its built-in kustomize >= 5) is needed to render deploy/kubernetes; see docs/deploy.md")
        raise AssertionError("unreachable")
    proc = subprocess.run([exe, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=30)
    version = json.loads(proc.stdout or "{}").get("kustomizeVersion", "") if proc.returncode == 0 else ""
    digits = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if len(digits) < 2 or digits < MIN_KUSTOMIZE:
        _unavailable(f"{exe} bundles kustomize {version or 'of unknown version'}; deploy/kubernetes needs kustomize >= 5 (kubectl >= 1.27)")
    _kubectl = exe
    return exe


def render(path: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize PATH`` parsed into objects; raises with kustomize's message on failure."""
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {overlay_id(path)} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@dataclass
class Rendered:
    """One rendered kustomization and shortcuts to what the tests look at."""

    path: Path
    objects: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return overlay_id(self.path)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def warden(self) -> dict[str, Any]:
        (c,) = [c for c in self.pod.get("initContainers", []) if c["name"] == WARDEN_CONTAINER]
        return c

    @property
    def config_text(self) -> str:
        cm = self.one("ConfigMap", "warden-config")
        return str(cm["data"]["config.toml"])

    @property
    def config(self) -> dict[str, Any]:
        return tomllib.loads(self.config_text)


_cache: dict[Path, Rendered] = {}


def rendered_for(path: Path) -> Rendered:
    if path not in _cache:
        _cache[path] = Rendered(path, render(path))
    return _cache[path]


@dataclass
class CheckedConfig:
    """A deploy config validated by Warden's own loader."""

    config: Any
    raw: dict[str, Any]


def check_config(text: str) -> CheckedConfig:
    """Validate a deploy config.toml with ``proxy.config.load_config`` (unknown sections and plugins fail)."""
    from llm_warden.proxy.config import load_config

    raw = tomllib.loads(text)
    return CheckedConfig(load_config(raw), raw)


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (number or name) as the container's port number."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dump_toml(data: dict[str, Any]) -> str:
    """Write a config back as TOML: top-level tables, arrays of tables one level down."""
    out: list[str] = []
    for section, table in data.items():
        scalars = {k: v for k, v in table.items() if not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))}
        out.append(f"[{section}]")
        out += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in scalars.items()]
        out.append("")
        for k, v in table.items():
            if k not in scalars:
                for item in v:
                    out.append(f"[[{section}.{k}]]")
                    out += [f"{json.dumps(ik)} = {_toml_value(iv)}" for ik, iv in item.items()]
                    out.append("")
    return "\n".join(out)


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"line {self.line}: not exec form"
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Instructions of a Dockerfile (line continuations joined, comments dropped)."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append((start, buf + stripped))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for n, line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = [p for p in args.split() if not p.startswith("--")]
            base = parts[0]
            name = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert keyword == "ARG", f"line {n}: only ARG may come before the first FROM"
            k, _, v = args.partition("=")
            global_args[k] = v
        else:
            stages[-1].instructions.append(Instruction(keyword, args, n))
    return global_args, stages
