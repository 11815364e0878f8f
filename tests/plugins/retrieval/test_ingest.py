"""``warden ingest`` / ``search`` / ``index``: ACL sources, skipping unchanged files, prune, progress."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from llm_warden.plugins.retrieval.acl import Acl, Reader
from llm_warden.plugins.retrieval.ingest import IngestError, Progress, ingest_paths
from llm_warden.proxy.cli import main
from tests.plugins.retrieval.conftest import ServiceFactory


def _tree(root: Path) -> Path:
    docs = root / "docs"
    (docs / "hr").mkdir(parents=True)
    (docs / "eng").mkdir()
    (docs / "hr" / ".warden-acl.toml").write_text('allow_groups = ["hr"]\n')
    (docs / "hr" / "pay.md").write_text("# Pay\n\nPayroll runs monthly.\n")
    (docs / "hr" / "open.md").write_text("---\ntitle: Open house\npublic: true\n---\n# Ignored title\n\nThe open house is in May.\n")
    (docs / "eng" / "deploy.py").write_text('"""Deploy tool."""\n\n\ndef deploy():\n    """Deploy the payroll service."""\n')
    (docs / "eng" / "image.png").write_bytes(b"\x89PNG\x00\x00")
    (docs / ".hidden.md").write_text("secret hidden file")
    return docs


async def test_ingest_acl_sources_unchanged_and_prune(service_factory: ServiceFactory, tmp_path: Path) -> None:
    svc = await service_factory(mode="bm25", embedder=False)
    docs = _tree(tmp_path)
    out = io.StringIO()
    report = await ingest_paths(svc, [docs], "acme", Acl(allow_groups=frozenset({"eng"})), progress=out)
    assert (report.added, report.unchanged, report.skipped) == (3, 0, [])
    assert "ingest: 3/3 (100%)" in out.getvalue()
    pay = await svc.store.get_document("acme", "docs/hr/pay.md")
    opened = await svc.store.get_document("acme", "docs/hr/open.md")
    deploy = await svc.store.get_document("acme", "docs/eng/deploy.py")
    assert pay is not None and pay.acl["allow_groups"] == ["hr"] and pay.title == "Pay"
    assert opened is not None and opened.acl["public"] is True and opened.title == "Open house"
    assert deploy is not None and deploy.acl["allow_groups"] == ["eng"]
    assert await svc.store.get_document("acme", "docs/.hidden.md") is None
    hr = await svc.search(Reader("acme", "x", frozenset({"hr"})), "payroll")
    assert [h.doc_id for h in hr.hits] == ["docs/hr/pay.md"]
    eng = await svc.search(Reader("acme", "x", frozenset({"eng"})), "payroll")
    assert [h.doc_id for h in eng.hits] == ["docs/eng/deploy.py"]
    again = await ingest_paths(svc, [docs], "acme", Acl(allow_groups=frozenset({"eng"})), progress=io.StringIO())
    assert (again.added, again.unchanged) == (0, 3)
    (docs / "hr" / "pay.md").unlink()
    (docs / "eng" / "deploy.py").write_text("def deploy():\n    return 2\n")
    pruned = await ingest_paths(svc, [docs], "acme", Acl(allow_groups=frozenset({"eng"})), prune=True, progress=io.StringIO())
    assert (pruned.replaced, pruned.unchanged, pruned.deleted) == (1, 1, 1)
    assert (await svc.search(Reader("acme", "x", frozenset({"hr"})), "payroll")).hits == []
    with pytest.raises(IngestError):
        await ingest_paths(svc, [tmp_path / "missing"], "acme", None, progress=io.StringIO())


async def test_files_without_any_acl_are_readable_by_no_one(service_factory: ServiceFactory, tmp_path: Path) -> None:
    svc = await service_factory(mode="bm25", embedder=False)
    f = tmp_path / "note.txt"
    f.write_text("orphan note about lunch")
    report = await ingest_paths(svc, [f], "acme", None, progress=io.StringIO())
    assert report.no_acl == ["note.txt"]
    assert (await svc.search(Reader("acme", "anyone", frozenset({"all"})), "lunch note")).hits == []


def test_progress_is_one_line_on_a_tty() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    bar = Progress(4, out)
    for _ in range(4):
        bar.advance(1)
    bar.close()
    assert out.getvalue().count("\n") == 1 and out.getvalue().count("\r") == 4 and "4/4" in out.getvalue()


def test_cli_ingest_search_rebuild_status(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _tree(tmp_path)
    cfg = tmp_path / "warden.toml"
    cfg.write_text('[plugins]\nenabled = ["retrieval"]\n[retrieval]\nembedder = "none"\nmode = "bm25"\ndb = "r.db"\nindex_dir = "r-index"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["ingest", str(docs), "--tenant", "acme", "--allow-group", "eng", "--config", str(cfg)]) == 0
    assert "3 added" in capsys.readouterr().out
    assert main(["search", "payroll", "--tenant", "acme", "--user", "bob", "--group", "hr", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "=== injected system message ===" in out and "Payroll runs monthly." in out and "excluded:acl" in out
    assert "Deploy the payroll service" not in out
    assert main(["index", "rebuild", "--config", str(cfg)]) == 0
    assert "lexical 4 chunks" in capsys.readouterr().out
    assert main(["index", "status", "--config", str(cfg)]) == 0
    assert '"documents": 3' in capsys.readouterr().out
    assert main(["ingest", str(tmp_path / "nope"), "--tenant", "acme", "--config", str(cfg)]) == 2
