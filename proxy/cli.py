"""The ``warden`` command: ``serve``, ``config check``, ``token``, and the
subcommands that core parts and plugins add (``audit ...``, ``ingest`` ...)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence

from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.logs import setup_logging
from proxy.plugin import available_plugins

# Core parts that add subcommands of their own (module with add_cli(sub)).
CORE_CLI_MODULES = ("proxy.audit.cli", "proxy.db.cli", "proxy.eval.cli")


def _serve(args: argparse.Namespace) -> int:
    from proxy.serve import serve

    cfg = load_config(args.config)
    setup_logging(cfg.logging.level)
    return serve(cfg)


def _check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    from proxy.auth import Authenticator

    Authenticator(cfg.auth, cfg)
    print(f"{args.config}: ok (plugins: {', '.join(cfg.plugins.enabled) or 'none'})")
    return 0


def _token(args: argparse.Namespace) -> int:
    """Mint an HS256 token for local trials (needs the secret from [auth] hs256_secret_env)."""
    import jwt

    cfg = load_config(args.config)
    a = cfg.auth
    if a.mode != "jwt" or not a.hs256_secret_env:
        print("warden token works only with [auth] mode = \"jwt\" and hs256_secret_env (local trials)", file=sys.stderr)
        return 2
    secret = os.environ.get(a.hs256_secret_env)
    if not secret:
        print(f"environment variable {a.hs256_secret_env} is not set", file=sys.stderr)
        return 2
    now = int(time.time())
    claims = {
        "iss": a.issuer,
        "aud": a.audience,
        "iat": now,
        "exp": now + args.ttl,
        a.subject_claim: args.user,
        a.tenant_claim: args.tenant,
        a.groups_claim: args.group or [],
        a.scopes_claim: " ".join(args.scope or []),
    }
    print(jwt.encode(claims, secret, algorithm=a.algorithms[0]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warden", description="A governance sidecar for LLM traffic.")
    parser.add_argument("--config", "-c", default=os.environ.get("WARDEN_CONFIG"), help="config file (default: $WARDEN_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the proxy")
    p.set_defaults(func=_serve)
    p = sub.add_parser("check-config", help="validate the config file and keys, then exit")
    p.set_defaults(func=_check)
    p = sub.add_parser("token", help="mint a dev HS256 token (local trials)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--group", action="append")
    p.add_argument("--scope", action="append")
    p.add_argument("--ttl", type=int, default=3600)
    p.set_defaults(func=_token)
    for modname in CORE_CLI_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError:
            continue
        mod.add_cli(sub)
    for cls in available_plugins().values():
        cls.add_cli(sub)
    return parser


def _hoist_config(argv: list[str]) -> list[str]:
    """Accept ``--config`` after the subcommand too (``warden serve --config x``)."""
    out: list[str] = []
    config: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "-c") and i + 1 < len(argv):
            config = ["--config", argv[i + 1]]
            i += 2
            continue
        if a.startswith("--config="):
            config = ["--config", a.split("=", 1)[1]]
            i += 1
            continue
        out.append(a)
        i += 1
    return config + out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_hoist_config(list(sys.argv[1:] if argv is None else argv)))
    if args.command in ("serve", "check-config", "token") and not args.config:
        print("warden: --config PATH is required (or set WARDEN_CONFIG)", file=sys.stderr)
        return 2
    try:
        rc: int = args.func(args)
        return rc
    except ConfigError as e:
        logging.getLogger("warden").error("%s", e)
        print(f"warden: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
