"""The import contract: the core never imports a plugin, and no plugin imports another.

``proxy/`` is the core; it finds plugins through the ``warden.plugins`` entry
points only.  Each plugin (``plugins/<name>/`` or ``plugins/<name>.py``) may
import the core and itself; what two plugins share belongs in the core (as the
GCRA does, in ``proxy/gcra.py``).  ``plugins/__init__.py`` is the composition
root and may name every plugin.

The check reads every ``.py`` file under ``proxy/`` and ``plugins/`` with
:mod:`ast`, so it sees every static import wherever it is written: at module
level, inside functions, under ``if TYPE_CHECKING:``, relative imports, and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal
name.  A failure lists each offending ``file:line``.

(An AST walk rather than import-linter: no extra dependency, it needs no
import of the code (so a module that fails to import cannot hide its imports),
and the rule is two lines of Python that the self-tests below exercise.)
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "llm_warden"
"""The installed package: the folders ``proxy/`` and ``plugins/`` are ``llm_warden.proxy`` and ``llm_warden.plugins``."""
CORE = "proxy"
PLUGINS = "plugins"


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    importer: str
    imported: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported}"


def module_name(root: Path, path: Path) -> tuple[str, bool]:
    """The dotted (installed) module name of ``path`` and whether it is a package ``__init__``."""
    parts = [PKG, *path.relative_to(root).with_suffix("").parts]
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def owner(module: str) -> str | None:
    """``core``, ``plugin <name>``, or ``None`` for the composition root (``plugins`` itself)."""
    parts = module.removeprefix(PKG + ".").split(".")
    if parts[0] == CORE:
        return "core"
    if parts[0] == PLUGINS:
        return f"plugin {parts[1]}" if len(parts) > 1 else None
    return "other"


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of a relative import (``from ..x import y`` inside ``module``)."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every module name ``tree`` imports statically, with its line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            if base == f"{PKG}.{PLUGINS}":
                # ``from plugins import tools`` imports the plugin plugins.tools.
                found.extend((node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names)
            else:
                found.append((node.lineno, base))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.append((node.lineno, first.value))
    return found


def violations(root: Path) -> list[Violation]:
    """Every import under ``root/proxy`` and ``root/plugins`` that breaks the contract."""
    out: list[Violation] = []
    for top in (CORE, PLUGINS):
        for path in sorted((root / top).rglob("*.py")):
            module, is_package = module_name(root, path)
            who = owner(module)
            if who is None:
                continue
            tree = ast.parse(path.read_bytes(), filename=str(path))
            for line, name in sorted(set(imports(tree, module, is_package))):
                if name.split(".")[0] in (CORE, PLUGINS):
                    # The folders are installed as llm_warden.proxy and llm_warden.plugins: a bare
                    # name would load a second copy of the module (or nothing, once installed).
                    out.append(Violation(str(path.relative_to(root)), line, who, f"{name} by its folder's name, not {PKG}.{name}"))
                    continue
                name = name.removeprefix(PKG + ".")
                if name != PLUGINS and not name.startswith(PLUGINS + "."):
                    continue
                if owner(name) != who:
                    out.append(Violation(str(path.relative_to(root)), line, who, name))
    return out


def test_the_core_and_the_plugins_keep_the_import_contract() -> None:
    found = violations(ROOT)
    assert not found, "import contract broken (see tests/test_architecture.py):\n" + "\n".join(map(str, found))


def test_the_whole_tree_is_read() -> None:
    """The walk sees the core and every plugin, so an empty result means something."""
    modules = {module_name(ROOT, p)[0] for top in (CORE, PLUGINS) for p in (ROOT / top).rglob("*.py")}
    expected = {"proxy.plugin", "proxy.gcra", "plugins", "plugins.headers", "plugins.tools.judge", "plugins.ratelimit.plugin"}
    assert {f"{PKG}.{m}" for m in expected} <= modules
    assert {owner(m) for m in modules} >= {"core", "plugin tools", "plugin ratelimit", "plugin retrieval", "plugin headers", None}


# -- the checker itself can fail -------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pkg in ("proxy", "plugins", "plugins/tools", "plugins/ratelimit"):
        init = tmp_path / pkg / "__init__.py"
        if not init.exists():
            init.parent.mkdir(parents=True, exist_ok=True)
            init.write_text("")
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"proxy/app.py": "import os\nimport llm_warden.plugins.tools\n"}, ["proxy/app.py:2: core imports plugins.tools"]),
        ({"proxy/app.py": "from llm_warden.plugins.headers import HeadersPlugin\n"}, ["proxy/app.py:1: core imports plugins.headers"]),
        ({"proxy/app.py": "from llm_warden.plugins import tools, headers\n"}, ["proxy/app.py:1: core imports plugins.headers", "proxy/app.py:1: core imports plugins.tools"]),
        ({"proxy/app.py": "import llm_warden.plugins\n"}, ["proxy/app.py:1: core imports plugins"]),
        (
            {"proxy/audit/record.py": "def f():\n    x = 1\n    from llm_warden.plugins.tools.judge import ToolJudge\n    return ToolJudge\n"},
            ["proxy/audit/record.py:3: core imports plugins.tools.judge"],
        ),
        (
            {"proxy/app.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from llm_warden.plugins.tools import ToolsPlugin\n"},
            ["proxy/app.py:3: core imports plugins.tools"],
        ),
        ({"proxy/app.py": "import importlib\nm = importlib.import_module('llm_warden.plugins.tools')\n"}, ["proxy/app.py:2: core imports plugins.tools"]),
        ({"proxy/app.py": "__import__('llm_warden.plugins.headers')\n"}, ["proxy/app.py:1: core imports plugins.headers"]),
        ({"plugins/tools/judge.py": "from llm_warden.plugins.ratelimit.gcra import MemoryGCRA\n"}, ["plugins/tools/judge.py:1: plugin tools imports plugins.ratelimit.gcra"]),
        ({"plugins/tools/judge.py": "from ..ratelimit import gcra\n"}, ["plugins/tools/judge.py:1: plugin tools imports plugins.ratelimit"]),
        ({"plugins/tools/judge.py": "from .. import headers\n"}, ["plugins/tools/judge.py:1: plugin tools imports plugins.headers"]),
        ({"plugins/tools/judge.py": "from llm_warden.plugins import *\n"}, ["plugins/tools/judge.py:1: plugin tools imports plugins"]),
        ({"plugins/headers.py": "def f():\n    import llm_warden.plugins.tools.store\n"}, ["plugins/headers.py:2: plugin headers imports plugins.tools.store"]),
        ({"plugins/tools/__init__.py": "from llm_warden.plugins.headers import HeadersPlugin\n"}, ["plugins/tools/__init__.py:1: plugin tools imports plugins.headers"]),
        # Allowed: a plugin importing itself (absolute or relative) and the core; the composition root naming plugins.
        ({"plugins/tools/judge.py": "from llm_warden.plugins.tools.store import X\nfrom . import store\nfrom .store import Y\nfrom llm_warden.plugins import tools\nimport llm_warden.proxy.gcra\n"}, []),
        ({"plugins/__init__.py": "from llm_warden.plugins.tools import ToolsPlugin\nfrom llm_warden.plugins.headers import HeadersPlugin\n"}, []),
        ({"proxy/app.py": "import llm_warden.proxy.plugin\nfrom llm_warden.proxy import gcra\nimport pluginsx\n"}, []),
        # A folder's bare name is no import of the installed package (it would load a second copy of the module).
        ({"proxy/app.py": "import proxy.gcra\n"}, ["proxy/app.py:1: core imports proxy.gcra by its folder's name, not llm_warden.proxy.gcra"]),
        (
            {"plugins/tools/judge.py": "from plugins.tools import store\n"},
            ["plugins/tools/judge.py:1: plugin tools imports plugins.tools by its folder's name, not llm_warden.plugins.tools"],
        ),
    ],
)
def test_the_checker_reports_each_offending_line(tmp_path: Path, files: dict[str, str], expected: list[str]) -> None:
    assert [str(v) for v in violations(_tree(tmp_path, files))] == expected


def test_the_failure_message_names_every_offender(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"proxy/a.py": "import llm_warden.plugins.tools\n", "plugins/tools/b.py": "\n\nimport llm_warden.plugins.ratelimit.gcra\n"})
    found = violations(root)
    with pytest.raises(AssertionError) as err:
        assert not found, "\n".join(map(str, found))
    assert "proxy/a.py:1: core imports plugins.tools" in str(err.value)
    assert "plugins/tools/b.py:3: plugin tools imports plugins.ratelimit.gcra" in str(err.value)
