"""``warden demo``: registered on the ``warden`` command by :mod:`proxy.cli`."""

from __future__ import annotations

import argparse
import asyncio


def _demo(args: argparse.Namespace) -> int:
    from llm_warden.proxy.demo.walkthrough import demo_folder, run_demo

    root = demo_folder(args.folder)
    remove = args.folder is None and not args.keep
    return asyncio.run(run_demo(root, wait=not args.no_wait, remove=remove, port=args.port, admin_port=args.admin_port))


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``demo`` to ``warden``."""
    p = sub.add_parser(
        "demo",
        help="offline tour: Warden on a scripted demo model with sample documents, ACLs and tools; "
        "walks through each guarantee, then stays up for your own SDK calls until Ctrl-C",
    )
    p.add_argument("--no-wait", action="store_true", help="exit after the walk-through (for CI) instead of serving until Ctrl-C")
    p.add_argument("--port", type=int, default=8080, help="data-plane port on 127.0.0.1 (0: any free port)")
    p.add_argument("--admin-port", type=int, default=9090, help="admin-plane port on 127.0.0.1 (0: any free port)")
    p.add_argument("--folder", help="keep the demo's config, documents and databases in this folder (default: a temporary one, removed at exit)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder at exit")
    p.set_defaults(func=_demo)
