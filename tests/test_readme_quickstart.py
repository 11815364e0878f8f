"""The README's two quick-start commands, on a fresh clone and a clean virtualenv, in that order.

The first (`scripts/quickstart.sh`) runs with `--no-wait` so the demo exits
after its walk-through (and on free ports, beside whatever else listens on
this machine); the second (`.venv/bin/python -m pytest`) runs on a small
subset.  The clone is of the committed HEAD: what a newcomer gets.  pip
reuses its cache; the test is skipped, saying so, only when the package index
cannot be reached.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ["tests/test_readme.py", "tests/proxy/test_cli.py"]


def _index_host() -> tuple[str, int]:
    url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "pypi.org", parts.port or (443 if parts.scheme == "https" else 80)


def _index_reachable() -> bool:
    try:
        socket.create_connection(_index_host(), timeout=5).close()
    except OSError:
        return False
    return True


@pytest.mark.timeout(900)
def test_the_two_quick_start_commands_work_on_a_fresh_clone(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    if not _index_reachable():
        pytest.skip(f"the package index {_index_host()[0]} cannot be reached: the quick start installs from it")
    clone = tmp_path / "warden"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WARDEN_", "OPENAI_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)

    setup = subprocess.run(["scripts/quickstart.sh", "--no-wait", "--", "--port", "0", "--admin-port", "0"],
                           cwd=clone, env=env, capture_output=True, text=True, timeout=780)
    out = setup.stdout + setup.stderr
    assert setup.returncode == 0, out[-4000:]
    assert "No provider key (OPENAI_API_KEY) is set: starting the offline demo" in out
    assert "Every step showed what it should." in out and "✗" not in out
    # The install is clean: no setuptools or packaging warnings (pip's notes on this machine's index settings aside).
    noisy = [line for line in out.splitlines() if re.search(r"warn|deprecat", line, re.I)
             and not re.match(r"WARNING: Location '[^']*' is ignored", line) and "[demo model" not in line]
    assert noisy == [], "\n".join(noisy[:20])
    assert (clone / ".warden-dev.env").stat().st_mode & 0o077 == 0

    tests = subprocess.run([".venv/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET],
                           cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert re.search(r"\d+ passed", tests.stdout)
