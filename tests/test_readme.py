"""The README and docs/README.md: every relative link leads to a file of the repository, and the docs index lists every page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
"""Fenced blocks and code spans: a link's syntax shown as an example there is no link."""
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_names_a_file_in_the_repository(page: Path) -> None:
    for target in LINK.findall(CODE.sub("", page.read_text())):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"{page.relative_to(ROOT)} links {target}, which is not in the repository"


def test_the_docs_index_lists_every_page_and_config_snippet() -> None:
    index = (ROOT / "docs" / "README.md").read_text()
    linked = {t.split("#", 1)[0] for t in LINK.findall(index)}
    pages = {p.name for p in (ROOT / "docs").iterdir() if p.suffix in (".md", ".toml") and p.name != "README.md"}
    assert pages - linked == set(), "docs/README.md does not list these pages"
    assert "[docs/README.md](docs/README.md)" in (ROOT / "README.md").read_text()


def test_the_quick_start_shows_ingest_with_an_acl_and_says_what_to_set_before_starting() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quick start"):readme.index("## How it works")]
    commands = re.findall(r"```bash\n(.*?)```", quick, re.S)[0].strip().splitlines()
    assert [c.split("#")[0].strip() for c in commands] == ["scripts/quickstart.sh", ".venv/bin/python -m pytest"]
    assert re.search(r"warden ingest \S+ --tenant \S+ --allow-group \S+", quick)
    assert quick.index("export\nOPENAI_API_KEY") < quick.index("warden ingest")
    assert "warden demo" in quick and "--no-wait" in quick
