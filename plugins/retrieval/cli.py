"""``warden ingest``, ``warden search`` and ``warden index rebuild|status``.

They open the same store and index as the server (``[retrieval]`` of
``--config``).  With ``store = "postgres"``, ``ingest`` writes the shared
store only and every replica serves the documents once it has caught up
(notified at commit).  With the embedded SQLite store a running Warden owns
the indexes: ``ingest`` then writes the store of record only and the server
applies the changes within ``sync_interval_s``; ``search`` and ``index
rebuild`` need the index and ask you to use the admin API (``POST
/admin/search``) or stop the server.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

from llm_warden.plugins.retrieval.acl import Acl, Reader
from llm_warden.plugins.retrieval.config import RetrievalConfig
from llm_warden.plugins.retrieval.ingest import IngestError, ingest_paths
from llm_warden.plugins.retrieval.inject import SearchResult, render_context
from llm_warden.plugins.retrieval.service import RetrievalService, build_service
from llm_warden.proxy.errors import ConfigError, WardenError


def _service(args: argparse.Namespace) -> RetrievalService:
    from llm_warden.proxy.config import load_config

    if args.config:
        config = load_config(args.config)
        section = config.plugin_sections.get("retrieval") or RetrievalConfig()
        return build_service(section, config)
    return build_service(RetrievalConfig(), None)


def _run(args: argparse.Namespace, fn: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]) -> int:
    try:
        return asyncio.run(fn(args))
    except (ConfigError, IngestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WardenError as e:
        print(f"error: {e.message}" + (f" (rule: {e.rule})" if e.rule else ""), file=sys.stderr)
        return 1


def _acl_from_flags(args: argparse.Namespace) -> Acl | None:
    if not (args.public or args.allow_user or args.allow_group or args.deny_user or args.deny_group):
        return None
    return Acl(public=args.public, allow_users=frozenset(args.allow_user or []), allow_groups=frozenset(args.allow_group or []),
               deny_users=frozenset(args.deny_user or []), deny_groups=frozenset(args.deny_group or []))


async def _ingest(args: argparse.Namespace) -> int:
    svc = _service(args)
    # The shared store needs no local index to be written: the replicas follow it.
    await svc.start(own_engines=svc.store.kind == "sqlite")
    try:
        if svc.store.kind == "postgres":
            print("note: writing to the shared PostgreSQL store; every replica serves these documents once it has caught up", file=sys.stderr)
        elif not svc.owner:
            print(f"note: a running Warden owns {svc.index_dir}; it will index these changes within {svc.cfg.sync_interval_s:g}s", file=sys.stderr)
        report = await ingest_paths(svc, [Path(p) for p in args.paths], args.tenant, _acl_from_flags(args), prune=args.prune, batch=args.batch)
    finally:
        await svc.close()
    for skip in report.skipped:
        print(f"skipped: {skip}", file=sys.stderr)
    if report.no_acl:
        print(f"warning: {len(report.no_acl)} documents have no ACL (no flags, front matter or {'.warden-acl.toml'}) and are readable by no one", file=sys.stderr)
    print(report.summary())
    return 0


def print_result(result: SearchResult, template: str, out: Any = None) -> None:
    """The exact system message that would be injected, then scores per retriever and exclusions."""
    out = out or sys.stdout
    if result.hits:
        print("=== injected system message ===", file=out)
        print(render_context(result.hits, template), file=out)
    else:
        print("=== nothing would be injected ===", file=out)
    print("\n=== candidates ===", file=out)
    print(f"{'rank':>4} {'cite':>4} {'score':>8} {'bm25':>9} {'vector':>8} {'tokens':>6}  {'status':<14} chunk", file=out)
    for h in sorted([*result.hits, *result.excluded], key=lambda h: h.rank):
        bm25 = f"{h.scores['bm25']:.3f}" if "bm25" in h.scores else "-"
        vec = f"{h.scores['vector']:.3f}" if "vector" in h.scores else "-"
        status = "injected" if h.injected else f"excluded:{h.excluded_reason}"
        cite = f"[{h.citation}]" if h.citation else ""
        print(f"{h.rank:>4} {cite:>4} {h.score:>8.4f} {bm25:>9} {vec:>8} {h.tokens:>6}  {status:<14} {h.chunk_id}", file=out)
    print(f"\ncontext tokens: {result.context_tokens}; timings ms: " + ", ".join(f"{k.removesuffix('_ms')}={v:.2f}" for k, v in result.timings.items()), file=out)


async def _search(args: argparse.Namespace) -> int:
    svc = _service(args)
    await svc.start()
    try:
        result = await svc.search(Reader(args.tenant, args.user, frozenset(args.group or [])), args.text, top_k=args.top_k, debug=True)
    finally:
        await svc.close()
    if args.json:
        print(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        print_result(result, svc.cfg.template)
    return 0


async def _rebuild(args: argparse.Namespace) -> int:
    svc = _service(args)
    await svc.start()
    try:
        counts = await svc.rebuild()
    finally:
        await svc.close()
    print("rebuilt: " + ", ".join(f"{name} {n} chunks" for name, n in counts.items()))
    return 0


async def _status(args: argparse.Namespace) -> int:
    svc = _service(args)
    await svc.start(own_engines=False)
    try:
        status = await svc.status()
    finally:
        await svc.close()
    status.pop("owner", None)
    print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the retrieval subcommands on the ``warden`` parser."""
    p = sub.add_parser("ingest", help="ingest files and folders into the retrieval index")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files and folders to ingest")
    p.add_argument("--tenant", required=True, help="the tenant the documents belong to")
    p.add_argument("--allow-group", action="append", metavar="G", help="members of group G may read them (repeatable)")
    p.add_argument("--allow-user", action="append", metavar="U", help="user U may read them (repeatable)")
    p.add_argument("--deny-group", action="append", metavar="G", help="members of group G may not, whatever else allows (repeatable)")
    p.add_argument("--deny-user", action="append", metavar="U", help="user U may not, whatever else allows (repeatable)")
    p.add_argument("--public", action="store_true", help="readable by everyone in the tenant")
    p.add_argument("--prune", action="store_true", help="delete documents of these folders whose files are gone")
    p.add_argument("--batch", type=int, default=64, help="files per store transaction and index commit")
    p.set_defaults(func=lambda a: _run(a, _ingest))
    p = sub.add_parser("search", help="show exactly what retrieval would inject for a principal")
    p.add_argument("text", help="the question")
    p.add_argument("--tenant", required=True, help="the principal's tenant")
    p.add_argument("--user", required=True, help="the principal's subject")
    p.add_argument("--group", action="append", metavar="G", help="a group of the principal (repeatable)")
    p.add_argument("--top-k", type=int, default=None, help="chunks to inject (default: [retrieval] top_k)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=lambda a: _run(a, _search))
    p = sub.add_parser("index", help="maintain the retrieval index")
    isub = p.add_subparsers(dest="index_command", required=True)
    ip = isub.add_parser("rebuild", help="recreate the lexical and vector indexes from the store of record")
    ip.set_defaults(func=lambda a: _run(a, _rebuild))
    ip = isub.add_parser("status", help="documents, chunks, embedding model and engine lag")
    ip.set_defaults(func=lambda a: _run(a, _status))
