"""File ingestion for ``warden ingest``: walk paths, resolve ACLs, upsert in batches, prune.

Document ids are stable across runs: ``<root name>/<path under root>`` for a
directory argument, the file name for a file argument; ``source`` is the
absolute root, so ``--prune`` deletes exactly the documents of that root whose
files are gone.

ACL of a file, most specific first: the Markdown front matter (``acl:`` table
or top-level ``public`` / ``allow_users`` / ``allow_groups`` / ``deny_users``
/ ``deny_groups``), else the nearest ``.warden-acl.toml`` from the file's
folder up to the root, else the command-line flags.  A file with none of them
gets an empty ACL: readable by no one (fail closed), and the report counts it.
"""

from __future__ import annotations

import asyncio
import sys
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from llm_warden.plugins.retrieval.acl import Acl
from llm_warden.plugins.retrieval.chunking import kind_for, parse_front_matter
from llm_warden.plugins.retrieval.service import DocumentInput, RetrievalService

ACL_FILE = ".warden-acl.toml"
_ACL_KEYS = ("public", "allow_users", "allow_groups", "deny_users", "deny_groups")


class IngestError(Exception):
    """A path or ACL file that cannot be ingested (the message says which and why)."""


@dataclass
class FileRef:
    path: Path
    root: Path
    doc_id: str


@dataclass
class IngestReport:
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    acl_updated: int = 0
    metadata_updated: int = 0
    deleted: int = 0
    skipped: list[str] = field(default_factory=list)
    no_acl: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def files(self) -> int:
        return self.added + self.replaced + self.unchanged + self.acl_updated + self.metadata_updated

    def summary(self) -> str:
        rate = self.files / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.files} files in {self.seconds:.2f}s ({rate:.0f}/s): {self.added} added, {self.replaced} replaced, "
                f"{self.unchanged} unchanged, {self.acl_updated} ACL updated, {self.metadata_updated} metadata updated, "
                f"{self.deleted} pruned, {len(self.skipped)} skipped, {len(self.no_acl)} readable by no one (no ACL)")


class Progress:
    """A one-line progress bar on a TTY (redrawn in place), sparse lines otherwise."""

    def __init__(self, total: int, stream: IO[str] | None = None, label: str = "ingest") -> None:
        self.total = max(total, 1)
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label = label
        self.done = 0
        self._last_pct = -1
        self._start = time.perf_counter()

    def advance(self, n: int, note: str = "") -> None:
        self.done += n
        pct = int(100 * self.done / self.total)
        if self.tty:
            width = 30
            filled = int(width * self.done / self.total)
            rate = self.done / max(time.perf_counter() - self._start, 1e-9)
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {rate:.0f}/s {note}\x1b[K")
            self.stream.flush()
        elif pct // 10 != self._last_pct // 10 or self.done >= self.total:
            self.stream.write(f"{self.label}: {self.done}/{self.total} ({pct}%) {note}\n")
            self.stream.flush()
        self._last_pct = pct

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def collect_files(paths: Iterable[Path], extensions: Iterable[str]) -> list[FileRef]:
    """The files to ingest under ``paths`` (hidden files and folders skipped), sorted by id."""
    exts = {e.lower() for e in extensions}
    out: dict[str, FileRef] = {}
    for p in paths:
        if not p.exists():
            raise IngestError(f"{p} does not exist")
        root = p.resolve()
        if root.is_file():
            out[root.name] = FileRef(root, root.parent, root.name)
            continue
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or not f.is_file() or f.suffix.lower() not in exts:
                continue
            doc_id = f"{root.name}/{rel.as_posix()}"
            out[doc_id] = FileRef(f, root, doc_id)
    return [out[k] for k in sorted(out)]


def _acl_from_mapping(data: dict[str, Any], where: str) -> Acl | None:
    table = data.get("acl")
    if table is None:
        table = {k: data[k] for k in _ACL_KEYS if k in data}
        if not table:
            return None
    try:
        return Acl.from_json(table)
    except ValueError as e:
        raise IngestError(f"{where}: {e}") from None


class AclResolver:
    """Finds the ACL of a file (front matter, nearest ``.warden-acl.toml``, flags), caching ACL files."""

    def __init__(self, default: Acl | None) -> None:
        self.default = default
        self._cache: dict[Path, Acl | None] = {}

    def folder_acl(self, folder: Path, root: Path) -> Acl | None:
        if folder in self._cache:
            return self._cache[folder]
        f = folder / ACL_FILE
        acl: Acl | None
        if f.is_file():
            try:
                data = tomllib.loads(f.read_text("utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise IngestError(f"{f}: not valid TOML: {e}") from None
            acl = _acl_from_mapping(data, str(f))
        elif folder != root and root in folder.parents:
            acl = self.folder_acl(folder.parent, root)
        else:
            acl = None
        self._cache[folder] = acl
        return acl

    def resolve(self, ref: FileRef, front: dict[str, Any]) -> Acl | None:
        acl = _acl_from_mapping(front, str(ref.path)) if front else None
        return acl or self.folder_acl(ref.path.parent, ref.root) or self.default


def read_document(ref: FileRef, tenant: str, resolver: AclResolver, max_bytes: int) -> tuple[DocumentInput | None, str | None, bool]:
    """(document, skip reason, had an ACL) for one file; blocking (run in a thread)."""
    try:
        raw = ref.path.read_bytes()
    except OSError as e:
        return None, f"{ref.path}: {e.strerror}", False
    if len(raw) > max_bytes:
        return None, f"{ref.path}: larger than max_document_bytes ({max_bytes})", False
    if b"\x00" in raw[:8192]:
        return None, f"{ref.path}: binary file", False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"{ref.path}: not UTF-8 text", False
    kind = kind_for(ref.path.name)
    front: dict[str, Any] = {}
    title = ""
    if kind == "markdown":
        fm = parse_front_matter(text)
        if fm.error:
            return None, f"{ref.path}: {fm.error}", False
        front = fm.data
        title = str(front.get("title") or "")
        if not title:
            for line in text[fm.body_start :].splitlines():
                if line.startswith("# "):
                    title = line[2:].strip()
                    break
    acl = resolver.resolve(ref, front)
    labels = front.get("labels", [])
    updated = front.get("updated_at") or front.get("updated")
    if updated is not None and not isinstance(updated, str):
        updated = updated.isoformat() if hasattr(updated, "isoformat") else str(updated)
    if updated is None:
        updated = datetime.fromtimestamp(ref.path.stat().st_mtime, UTC).isoformat(timespec="seconds")
    doc = DocumentInput(
        tenant=tenant, doc_id=ref.doc_id, text=text, acl=acl or Acl(), title=title or ref.path.name,
        uri=ref.path.as_uri(), source=str(ref.root), updated_at=updated,
        labels=[str(x) for x in labels] if isinstance(labels, list) else [], kind=kind,
    )
    return doc, None, acl is not None


async def ingest_paths(
    svc: RetrievalService,
    paths: list[Path],
    tenant: str,
    default_acl: Acl | None,
    *,
    prune: bool = False,
    batch: int = 64,
    progress: IO[str] | None = None,
) -> IngestReport:
    """Ingest files and folders into ``tenant`` (see the module docstring)."""
    t0 = time.perf_counter()
    report = IngestReport()
    refs = await asyncio.to_thread(collect_files, paths, svc.cfg.ingest_extensions)
    resolver = AclResolver(default_acl)
    bar = Progress(len(refs), progress)

    def read_batch(part: list[FileRef]) -> list[tuple[DocumentInput | None, str | None, bool]]:
        return [read_document(r, tenant, resolver, svc.cfg.max_document_bytes) for r in part]

    for i in range(0, len(refs), batch):
        part = refs[i : i + batch]
        read = await asyncio.to_thread(read_batch, part)
        docs = []
        for doc, skip, had_acl in read:
            if doc is None:
                report.skipped.append(skip or "unknown")
                continue
            if not had_acl:
                report.no_acl.append(doc.doc_id)
            docs.append(doc)
        for r in await svc.upsert_many(docs):
            setattr(report, r.status, getattr(report, r.status) + 1)
        bar.advance(len(part), f"+{report.added} ~{report.replaced} ={report.unchanged}")
    bar.close()
    if prune:
        present = {r.doc_id for r in refs}
        for root in {p.resolve() for p in paths if p.resolve().is_dir()}:
            gone: list[tuple[str, str]] = []
            after = ""
            while True:
                page = await svc.store.list_documents(tenant, 500, after)
                if not page:
                    break
                after = page[-1].doc_id
                gone += [(tenant, d.doc_id) for d in page if d.source == str(root) and d.doc_id not in present]
            report.deleted += await svc.delete_many(gone)
    report.seconds = time.perf_counter() - t0
    return report
