"""The ``warden`` command: ``serve``, ``check-config``, ``token``, and the
subcommands that core parts and plugins add (``audit ...``, ``ingest`` ...).

Every subcommand's ``--help`` describes each option with its default (the
parser is finished by :func:`_finish_help`, whoever registered the command).
A subcommand reads ``--config`` (or ``WARDEN_CONFIG``) unless it is listed in
:data:`CONFIG_OPTIONAL`: without one it stops with a message that says what
to pass, instead of running on built-in defaults.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Iterator, Sequence

from llm_warden.proxy.config import load_config
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.logs import setup_logging
from llm_warden.proxy.plugin import available_plugins

# Core parts that add subcommands of their own (module with add_cli(sub)).
CORE_CLI_MODULES = ("llm_warden.proxy.audit.cli", "llm_warden.proxy.db.cli", "llm_warden.proxy.eval.cli", "llm_warden.proxy.admincli", "llm_warden.proxy.demo.cli")

CONFIG_OPTIONAL = frozenset({"audit", "replay", "db", "admin", "demo", "eval", "policy"})
"""Top-level subcommands that run without ``--config``: the audit commands take
``--db``, ``db migrate`` reads ``WARDEN_DATABASE_URL``, ``admin`` talks to a
running Warden, ``demo`` writes a config of its own, ``eval`` and ``policy``
say themselves when the command at hand needs one (``eval compare`` and
``policy test --policy FILE`` do not).  Every other command needs one."""

def _serve(args: argparse.Namespace) -> int:
    from llm_warden.proxy.serve import serve

    cfg = load_config(args.config)
    setup_logging(cfg.logging.level)
    return serve(cfg)


def _check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    from llm_warden.proxy.auth import Authenticator

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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions with their defaults, leaving out the ones that say nothing (no default, an off flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or action.help is None or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[argparse.ArgumentParser, str | None]]:
    """Every parser under ``parser`` (itself included), with the help its parent gives it."""
    yield parser, parser.description
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                for sub, own in _parsers(child):
                    yield sub, own if sub is not child else (child.description or helps.get(name))


def _finish_help(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command the formatter that shows defaults, and its one-line help as its description."""
    for p, description in _parsers(parser):
        p.formatter_class = HelpFormatter
        p.description = description


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warden",
        description="A governance sidecar for LLM traffic. Try `warden demo` (offline, nothing to set up), "
        "or `warden serve --config config.example.toml`.",
    )
    parser.add_argument(
        "--config", "-c", default=os.environ.get("WARDEN_CONFIG"), help="the TOML config file (default: $WARDEN_CONFIG); may also follow the subcommand"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("serve", help="run the proxy: the data plane ([server] listen) and the admin plane ([server] admin_listen)")
    p.set_defaults(func=_serve)
    p = sub.add_parser("check-config", help="validate the config file and its keys, then exit")
    p.set_defaults(func=_check)
    p = sub.add_parser("token", help="mint a dev HS256 JWT for local trials (reads the secret from [auth] hs256_secret_env)")
    p.add_argument("--tenant", required=True, help="the tenant claim")
    p.add_argument("--user", required=True, help="the subject claim (user or service id)")
    p.add_argument("--group", action="append", help="a group of the user (repeatable)")
    p.add_argument("--scope", action="append", help="a scope of the token, e.g. warden:admin (repeatable)")
    p.add_argument("--ttl", type=int, default=3600, help="seconds until the token expires")
    p.set_defaults(func=_token)
    for modname in CORE_CLI_MODULES:
        importlib.import_module(modname).add_cli(sub)
    for cls in available_plugins().values():
        cls.add_cli(sub)
    _finish_help(parser)
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
    if args.command not in CONFIG_OPTIONAL and not args.config:
        print(
            f"warden {args.command}: needs the config file: pass --config PATH (the quick start's is config.example.toml) "
            "or set WARDEN_CONFIG=PATH",
            file=sys.stderr,
        )
        return 2
    try:
        rc: int = args.func(args)
        return rc
    except ConfigError as e:
        print(f"warden: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
