"""``warden audit show|search|export|verify`` and ``warden replay``.

Each command reads the database named by ``--db`` or by ``[audit] path`` of
the config file (``--config``), read-only.  Exit codes: 0 success, 1 a fault
(verify) or a failed replay, 2 a usage problem (no database, unknown request).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from llm_warden.proxy.audit.reader import PgTarget, Reader, open_reader
from llm_warden.proxy.errors import ConfigError


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``audit`` (show, search, export, verify) and ``replay`` to ``warden``."""
    audit = sub.add_parser("audit", help="inspect and verify the audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True)

    p = asub.add_parser("show", help="the full trace of one exchange")
    p.add_argument("request_id", help="the exchange's request id (x-request-id of its answer)")
    _db_arg(p)
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=cmd_show)

    p = asub.add_parser("search", help="find records (newest first)")
    p.add_argument("--tenant", help="only this tenant's records")
    p.add_argument("--user", help="the principal's subject")
    p.add_argument("--tool", help="a tool the model called")
    p.add_argument("--since", help="ISO time, epoch seconds, or an age like 30m, 24h, 7d")
    p.add_argument("--until", help="same forms as --since")
    p.add_argument("--kind", help="exchange, feedback, config_reload, retention_prune, tools.mode, tools.approval.approve, tools.approval.deny, retrieval.ingest, retrieval.delete")
    p.add_argument("--limit", type=int, default=100, help="at most this many records")
    _db_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    p.set_defaults(func=cmd_search)

    p = asub.add_parser("export", help="every record in chain order (for a SIEM)")
    p.add_argument("--format", choices=["jsonl"], default="jsonl", help="output format: one JSON record per line")
    p.add_argument("--output", "-o", help="file to write (default: stdout)")
    _db_arg(p)
    p.set_defaults(func=cmd_export)

    p = asub.add_parser("verify", help="walk the hash chain and the signed checkpoints")
    _db_arg(p)
    p.add_argument("--checkpoint", help="checkpoint file kept elsewhere (default: [audit] checkpoint_file)")
    p.add_argument("--key", action="append", help="trusted verifier key, or a file holding one (repeatable)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("replay", help="re-send the upstream request of a recorded exchange and compare")
    p.add_argument("request_id", help="the exchange's request id")
    p.add_argument("--model", help="send to this model instead")
    p.add_argument("--upstream", help="provider base URL (default: [upstream] base_url)")
    p.add_argument("--turn", type=int, default=0, help="which upstream turn to replay (default 0, the first)")
    p.add_argument("--api-key-env", help="environment variable with the provider key (default: [upstream] api_key_env)")
    p.add_argument("--width", type=int, help="output width")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    _db_arg(p)
    p.set_defaults(func=cmd_replay)


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        help="audit database: a SQLite file, or a postgresql:// URL (default: [audit] backend of the config: "
        "its path, or the URL in [database] dsn_env)",
    )


def _config(args: argparse.Namespace) -> Any:
    path = getattr(args, "config", None)
    if not path:
        return None
    from llm_warden.proxy.config import load_config

    return load_config(path)


def _db_path(args: argparse.Namespace) -> Path | PgTarget:
    """The store to read: ``--db`` (a file, or a ``postgresql://`` URL), else the config's ``[audit] backend``."""
    db = getattr(args, "db", None)
    if db:
        return PgTarget(db) if db.startswith(("postgresql://", "postgres://")) else Path(db)
    cfg = _config(args)
    if cfg is None:
        raise ConfigError("audit.path", "give --db PATH or --config FILE")
    if cfg.audit.backend == "postgres":
        dsn = cfg.database.dsn
        if not dsn:
            raise ConfigError("database.dsn_env", f"environment variable {cfg.database.dsn_env} is not set")
        return PgTarget(dsn)
    return Path(cfg.resolve_path(cfg.audit.path))


def _fail(msg: str, code: int = 2) -> int:
    print(f"warden: {msg}", file=sys.stderr)
    return code


_AGE = re.compile(r"^(\d+)([smhd])$")


def parse_time(value: str | None) -> int | None:
    """``--since``/``--until`` to epoch microseconds: ISO 8601, epoch seconds, or an age (``7d``)."""
    if value is None:
        return None
    m = _AGE.match(value.strip())
    if m:
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return int((time.time() - int(m.group(1)) * mult) * 1_000_000)
    try:
        return int(float(value) * 1_000_000)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"cannot read time {value!r} (use ISO 8601, epoch seconds, or 30m/24h/7d)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1_000_000)


# -- show ---------------------------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    try:
        path = _db_path(args)
    except ConfigError as e:
        return _fail(str(e))
    return asyncio.run(_show(path, args.request_id, args.json))


async def _open(path: Path | PgTarget) -> Reader | str:
    """A reader, or why there is none."""
    try:
        return await open_reader(path)
    except (FileNotFoundError, ConnectionError) as e:
        return str(e)


async def _show(path: Path | PgTarget, request_id: str, as_json: bool) -> int:
    reader = await _open(path)
    if isinstance(reader, str):
        return _fail(reader)
    try:
        rec = await reader.find(request_id)
        if rec is None:
            return _fail(f"no exchange {request_id!r} in {path}")
        related = await reader.related(request_id)
        links = {}
        for r in rec.get("tool_results") or []:
            cid = r.get("tool_call_id")
            if isinstance(cid, str):
                src = await reader.find_call(cid)
                if src is not None:
                    links[cid] = src.get("request_id")
    finally:
        await reader.close()
    if as_json:
        print(orjson.dumps({"record": rec, "related": related}, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_exchange(rec, related, links))
    return 0


def _content(v: Any, limit: int = 2000) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict) and set(v) == {"sha256", "bytes"}:
        return f"<{v['bytes']} bytes, sha256 {v['sha256'][:16]}...>"
    s = v if isinstance(v, str) else orjson.dumps(v).decode()
    return s if len(s) <= limit else s[:limit] + f"... ({len(s)} chars)"


def render_exchange(rec: dict[str, Any], related: list[dict[str, Any]], links: dict[str, Any]) -> str:
    """A readable trace of one exchange record."""
    p = rec.get("principal") or {}
    lat = rec.get("latency_us") or {}
    model = rec.get("model") or {}
    out = [
        f"exchange {rec.get('request_id')}   (seq {rec.get('_seq')}, {rec.get('ts')})",
        f"  trace        {rec.get('trace_id') or '-'}",
        f"  principal    tenant={p.get('tenant')} subject={p.get('subject')} groups={','.join(p.get('groups') or [])}",
        f"  route        {rec.get('method')} {rec.get('path')} ({rec.get('route')}) from {rec.get('client_ip') or '-'}",
        f"  provider     {rec.get('provider') or '-'}  model requested={model.get('requested')} reported={model.get('reported')}",
        f"  status       {rec.get('status')}{'  (client disconnected)' if rec.get('client_disconnected') else ''}",
        f"  latency      total={_ms(lat.get('total'))} upstream={_ms(lat.get('upstream'))} ttft={_ms(lat.get('ttft'))}",
        f"  usage        {_content(rec.get('usage'))}",
        f"  params       {_content(rec.get('params'))}",
        f"  prompt       system sha256={((rec.get('prompt') or {}).get('system_sha256') or '-')}",
    ]
    err = rec.get("error")
    if err:
        out.append(f"  error        {err.get('status')} {err.get('code')} rule={err.get('rule')}: {err.get('message')}")
    if rec.get("error_detail"):
        out.append(f"  detail       {rec['error_detail']}")
    for d in rec.get("retrieved") or []:
        out.append(
            f"  retrieved    {d.get('doc_id')}#{d.get('chunk_id')} score={d.get('score')} injected={d.get('injected')} "
            f"citation={d.get('citation')} {d.get('excluded_reason') or ''}".rstrip()
        )
    for t in rec.get("turns") or []:
        out.append(
            f"  turn {t.get('index')} ({t.get('reason')})  status={t.get('status')} {_ms(t.get('duration_us'))} ttft={_ms(t.get('ttft_us'))}"
        )
        req = t.get("request")
        if isinstance(req, dict) and isinstance(req.get("messages"), list):
            for m in req["messages"]:
                if isinstance(m, dict):
                    out.append(
                        f"      > {m.get('role')}: {_content(m.get('content') if m.get('content') is not None else m.get('tool_calls'), 600)}"
                    )
        else:
            out.append(f"      > request: {_content(req, 600)}")
        out.append(f"      < {_content(t.get('response'), 1200)}")
        if t.get("error"):
            out.append(f"      ! {t['error']}")
    for c in rec.get("tool_calls") or []:
        out.append(
            f"  tool call    turn {c.get('turn')} {c.get('name')}({_content(c.get('arguments'), 400)}) -> {c.get('decision')} "
            f"[rule {c.get('rule')}] {c.get('reason') or ''}".rstrip()
        )
    for r in rec.get("tool_results") or []:
        src = links.get(r.get("tool_call_id"))
        origin = f" (call made in {src})" if src else ""
        out.append(
            f"  tool result  {r.get('tool_call_id')}{origin}: {_content(r.get('content'), 400)}{' [truncated]' if r.get('truncated') else ''}"
        )
    resp = rec.get("response") or {}
    out.append(f"  answer       {_content(resp.get('text'), 2000)}")
    out.append(f"  finish       {','.join(resp.get('finish_reasons') or []) or '-'}")
    red = rec.get("redaction") or {}
    rules = red.get("rules") or {}
    out.append(f"  redaction    mode={red.get('mode')} " + (", ".join(f"{k}={v}" for k, v in sorted(rules.items())) or "nothing redacted"))
    for r in related:
        out.append(
            f"  {r.get('kind'):<12} seq {r.get('_seq')} {r.get('ts')} by {(r.get('actor') or {}).get('subject')}: {_content(r.get('data'), 600)}"
        )
    return "\n".join(out)


def _ms(us: Any) -> str:
    return "-" if not isinstance(us, int) else f"{us / 1000:.1f}ms"


# -- search / export ------------------------------------------------------------


def cmd_search(args: argparse.Namespace) -> int:
    try:
        path = _db_path(args)
        since, until = parse_time(args.since), parse_time(args.until)
    except (ConfigError, ValueError) as e:
        return _fail(str(e))
    return asyncio.run(_search(path, args, since, until))


async def _search(path: Path | PgTarget, args: argparse.Namespace, since: int | None, until: int | None) -> int:
    reader = await _open(path)
    if isinstance(reader, str):
        return _fail(reader)
    try:
        rows = await reader.search(args.tenant, args.user, args.tool, since, until, args.limit, args.kind)
    finally:
        await reader.close()
    for r in rows:
        if args.json:
            print(orjson.dumps(r).decode())
            continue
        who = r.get("principal") or r.get("actor") or {}
        tools = ",".join(sorted({c.get("name") for c in r.get("tool_calls") or [] if c.get("name")})) or "-"
        model = (r.get("model") or {}).get("reported") or (r.get("model") or {}).get("requested") or "-"
        rid = r.get("request_id") or (r.get("data") or {}).get("request_id") or "-"
        print(
            f"{r.get('ts')}  seq={r.get('_seq'):<7} {r.get('kind'):<12} {rid:<28} tenant={who.get('tenant')} "
            f"user={who.get('subject')} status={r.get('status', '-')} model={model} tools={tools}"
        )
    if not args.json:
        print(f"({len(rows)} records)", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        path = _db_path(args)
    except ConfigError as e:
        return _fail(str(e))
    return asyncio.run(_export(path, args.output))


async def _export(path: Path | PgTarget, output: str | None) -> int:
    reader = await _open(path)
    if isinstance(reader, str):
        return _fail(reader)
    out = open(output, "wb") if output else sys.stdout.buffer  # noqa: ASYNC230 - a CLI writing its own output
    n = 0
    try:
        async for rec in reader.iter_records():
            out.write(orjson.dumps(rec) + b"\n")
            n += 1
    finally:
        await reader.close()
        if output:
            out.close()
        else:
            out.flush()
    print(f"exported {n} records", file=sys.stderr)
    return 0


# -- verify -----------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        path = _db_path(args)
    except ConfigError as e:
        return _fail(str(e))
    cfg = _config(args) if not args.checkpoint else None
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is None and cfg is not None and cfg.audit.checkpoint_file:
        candidate = Path(cfg.resolve_path(cfg.audit.checkpoint_file))
        checkpoint = candidate if candidate.exists() else None
    if checkpoint is not None and not checkpoint.exists():
        return _fail(f"checkpoint file {checkpoint} does not exist")
    keys = None
    if args.key:
        keys = [Path(k).read_text() if os.path.exists(k) else k for k in args.key]
    report: Any
    if isinstance(path, PgTarget):
        from llm_warden.proxy.audit.pg_verify import verify_pg

        try:
            report = asyncio.run(verify_pg(path.dsn, keys=keys, checkpoint_file=checkpoint))
        except ValueError as e:
            return _fail(f"bad key: {e}")
        except ConnectionError as e:
            return _fail(str(e))
    else:
        if not path.exists():
            return _fail(f"audit database {path} does not exist")
        from llm_warden.proxy.audit.verify import verify_db

        try:
            report = asyncio.run(verify_db(path, keys=keys, checkpoint_file=checkpoint))
        except ValueError as e:
            return _fail(f"bad key: {e}")
    if args.json:
        print(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(report.render())
    return 0 if report.ok else 1


# -- replay -------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    from llm_warden.proxy.audit.replay import ReplayError, plan_replay, send, side_by_side

    try:
        path = _db_path(args)
        cfg = _config(args)
    except ConfigError as e:
        return _fail(str(e))
    if not args.upstream and cfg is not None and cfg.upstream.api != "openai":
        # The record holds the internal (chat-completions) request; replay sends it as it is.
        return _fail(f'replay sends the recorded chat-completions request, and this config\'s provider speaks the {cfg.upstream.api} API ([upstream] api = "{cfg.upstream.api}"): give --upstream an OpenAI-compatible URL')
    base = args.upstream or (cfg.upstream.base_url if cfg is not None else None)
    if not base:
        return _fail("give --upstream URL or --config FILE")
    key_env = args.api_key_env or (cfg.upstream.api_key_env if cfg is not None else "OPENAI_API_KEY")
    api_key = os.environ.get(key_env) if key_env else None

    async def run() -> int:
        reader = await _open(path)
        if isinstance(reader, str):
            return _fail(reader)
        try:
            rec = await reader.find(args.request_id)
        finally:
            await reader.close()
        if rec is None:
            return _fail(f"no exchange {args.request_id!r} in {path}")
        try:
            plan = plan_replay(rec, base_url=base, turn=args.turn, model=args.model)
        except ReplayError as e:
            return _fail(f"cannot replay {args.request_id}: {e}")
        if not args.json:
            print(f"replaying {args.request_id} turn {args.turn} -> POST {plan.url} (model {plan.body.get('model')})")
            for c in plan.caveats:
                print(f"  note: {c}")
        try:
            new = await send(plan, api_key)
        except Exception as e:
            return _fail(f"replay request failed: {type(e).__name__}: {e}", 1)
        if args.json:
            from llm_warden.proxy.audit.replay import tool_call_changes

            print(
                orjson.dumps(
                    {
                        "url": plan.url,
                        "caveats": plan.caveats,
                        "old": {"model": plan.old.model, "text": plan.old.text, "tool_calls": plan.old.tool_calls},
                        "new": {
                            "model": new.model,
                            "text": new.text,
                            "tool_calls": new.tool_calls,
                            "status": new.status,
                            "error": new.error,
                        },
                        "tool_call_changes": tool_call_changes(plan.old, new),
                    },
                    option=orjson.OPT_INDENT_2,
                ).decode()
            )
        else:
            print(side_by_side(plan.old, new, args.width))
        return 0 if new.error is None else 1

    return asyncio.run(run())
