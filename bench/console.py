"""Console page render times against a large audit log.

    python bench/console.py                      # 100k records
    python bench/console.py --records 1000000    # 1M (about 3 GB of SQLite, several minutes to build)

Builds a real SQLite audit database: a few hundred exchanges recorded
through the store (projection, redaction, the writer process), then
``--records`` more appended in bulk by copying those bodies with other request
ids, tenants (50), users (2,000), models (3), statuses and times (30 days),
each with its real chain hash (``leaf_hash``), so the database is a valid
chain that Warden opens as it is.  Then a real Warden (tools plugin, console)
serves it, an operator signs in over HTTP, and each console page is fetched
``--repeat`` times: the table shows the server's whole answer time as the
client sees it (loopback HTTP, session check, the admin API or audit query,
HTML rendering), p50 and p95 in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_warden.proxy.app import Warden  # noqa: E402
from llm_warden.proxy.audit.chain import canonical, leaf_hash  # noqa: E402
from llm_warden.proxy.audit.sqlite import SQLiteAuditLog  # noqa: E402
from llm_warden.proxy.config import AuditConfig, load_config  # noqa: E402
from llm_warden.proxy.plugin import available_plugins  # noqa: E402
from llm_warden.proxy.testing import RunningWarden  # noqa: E402
from tests.proxy.audit.helpers import make_exchange  # noqa: E402

ADMIN_TOKEN = "bench-console-admin-token-0123456789"
TENANTS = [f"t{i:02d}" for i in range(50)]
MODELS = ["gpt-4o-mini", "gpt-4.1", "llama-3-70b"]
DAY_US = 86_400 * 1_000_000


async def seed(path: Path, n: int) -> None:
    log = SQLiteAuditLog(AuditConfig(durability="batch"), path, upstream_key=None, provider="openai")  # type: ignore[arg-type]
    await log.start()
    for i in range(n):
        await log.record_exchange(
            make_exchange(tenant=TENANTS[i % len(TENANTS)], subject=f"u{i % 2000}", tool="refund" if i % 7 == 0 else "lookup_order")
        )
    await log.stop()


def bulk(path: Path, n: int, rng: random.Random) -> dict[str, Any]:
    """Append ``n`` records copied from the seeded ones, chained; returns some values to search for."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    templates = [orjson.loads(b) for (b,) in conn.execute("SELECT body FROM records WHERE kind = 'exchange'")]
    seq, head = conn.execute("SELECT seq, hash FROM head WHERE id = 1").fetchone()
    head = bytes(head)
    now_us = int(time.time() * 1_000_000)
    start_us = now_us - 30 * DAY_US
    picked: dict[str, Any] = {}
    batch: list[tuple[Any, ...]] = []
    t0 = time.perf_counter()
    for i in range(n):
        rec = dict(templates[i % len(templates)])
        seq += 1
        ts_us = start_us + (30 * DAY_US) * i // n
        tenant = TENANTS[rng.randrange(len(TENANTS))]
        subject = f"u{rng.randrange(2000)}"
        status = 200 if rng.random() < 0.97 else rng.choice([400, 403, 429, 502])
        rid = f"req_bench_{i:08d}"
        rec.update(request_id=rid, ts_us=ts_us, status=status, principal={**rec["principal"], "tenant": tenant, "subject": subject})
        rec["model"] = {"requested": MODELS[i % 3], "reported": MODELS[i % 3]}
        body = canonical(rec)
        h = leaf_hash(head, seq, body)
        names = sorted({c["name"] for c in rec.get("tool_calls") or []})
        ids = [c["id"] for c in rec.get("tool_calls") or []]
        batch.append(
            (
                seq,
                ts_us,
                "exchange",
                rid,
                tenant,
                subject,
                f",{','.join(names)}," if names else None,
                f",{','.join(ids)}," if ids else None,
                status,
                head,
                h,
                body,
            )
        )
        head = h
        if i == n // 2:
            picked.update(request_id=rid, tenant=tenant, user=subject, mid_cursor=str(seq))
        if len(batch) == 5000 or i == n - 1:
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO records (seq, ts_us, kind, request_id, tenant, subject, tools, call_ids, status, prev_hash, hash, body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                batch,
            )
            conn.execute("UPDATE head SET seq = ?, hash = ? WHERE id = 1", (seq, head))
            conn.execute("COMMIT")
            batch.clear()
    conn.execute("ANALYZE")
    conn.close()
    picked["build_s"] = time.perf_counter() - t0
    picked["since"] = time.strftime("%Y-%m-%dT%H:%M", time.gmtime((now_us - 2 * DAY_US) / 1e6))
    picked["until"] = time.strftime("%Y-%m-%dT%H:%M", time.gmtime((now_us - DAY_US) / 1e6))
    return picked


async def measure(path: Path, picked: dict[str, Any], repeat: int) -> list[tuple[str, float, float]]:
    os.environ["BENCH_CONSOLE_ADMIN_TOKEN"] = ADMIN_TOKEN
    os.environ.setdefault("BENCH_CONSOLE_PROVIDER_KEY", "sk-bench-provider-0123456789abcdef")
    classes = available_plugins()
    cfg = load_config(
        {
            "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:1"},
            "upstream": {"base_url": "http://127.0.0.1:9", "api_key_env": "BENCH_CONSOLE_PROVIDER_KEY"},
            "auth": {"mode": "none"},
            "admin": {"token_env": "BENCH_CONSOLE_ADMIN_TOKEN"},
            "audit": {"enabled": True, "path": str(path), "durability": "batch"},
            "plugins": {"enabled": ["tools"]},
            "policy": {"state_db": str(path.parent / "state.db"), "read_only": False},
            "tools": [{"name": "refund", "effect": "write", "approval": "required", "schema": {"type": "object"}}],
        },
        classes,
    )
    from llm_warden.proxy.audit.factory import build_audit

    rw = await RunningWarden.start(Warden(cfg, classes, audit=build_audit(cfg)))
    rows: list[tuple[str, float, float]] = []
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            async with s.get(rw.admin_url + "/console/login") as r:
                token = re.search(r'name="login_csrf" value="([^"]+)"', await r.text()).group(1)  # type: ignore[union-attr]
            async with s.post(rw.admin_url + "/console/login", data={"login_csrf": token, "token": ADMIN_TOKEN}) as r:
                assert r.status == 200 and "Sign out" in await r.text()
            pages = [
                ("audit, newest 50 (no filter)", "/console/audit"),
                ("audit, request id", f"/console/audit?request_id={picked['request_id']}"),
                ("audit, tenant", f"/console/audit?tenant={picked['tenant']}"),
                ("audit, user", f"/console/audit?user={picked['user']}"),
                ("audit, tenant + user", f"/console/audit?tenant={picked['tenant']}&user={picked['user']}"),
                ("audit, tool", "/console/audit?tool=refund"),
                ("audit, status 502", "/console/audit?status=502"),
                ("audit, model (scan, ≤1000 read)", "/console/audit?model=llama-3-70b"),
                ("audit, one-day range", f"/console/audit?since={picked['since']}&until={picked['until']}"),
                (
                    "audit, tenant + one-day range",
                    f"/console/audit?tenant={picked['tenant']}&since={picked['since']}&until={picked['until']}",
                ),
                ("audit, page in the middle (cursor)", f"/console/audit?before={picked['mid_cursor']}"),
                ("exchange page", f"/console/audit/exchange/{picked['request_id']}"),
                ("approvals inbox", "/console/approvals"),
                ("read-only switch", "/console/mode"),
            ]
            for name, url in pages:
                times = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    async with s.get(rw.admin_url + url) as r:
                        text = await r.text()
                        assert r.status == 200 and "Sign out" in text, (url, r.status, text[-500:])
                        if url.startswith("/console/audit?"):
                            assert "records read in" in text, text[-800:]
                    times.append((time.perf_counter() - t0) * 1000)
                times.sort()
                rows.append((name, statistics.median(times), times[max(0, int(len(times) * 0.95) - 1)]))
    finally:
        await rw.stop()
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--seed-records", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--dir", type=Path, default=None, help="where the database is built (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "audit.db"
        await seed(path, args.seed_records)
        picked = bulk(path, args.records, random.Random(7))
        size = path.stat().st_size / 1e9
        print(f"audit log: {args.records + args.seed_records:,} records, {size:.2f} GB, built in {picked['build_s']:.0f} s")
        rows = await measure(path, picked, args.repeat)
    print(f"\n{'page':40} {'p50 ms':>8} {'p95 ms':>8}")
    for name, p50, p95 in rows:
        print(f"{name:40} {p50:8.1f} {p95:8.1f}")


if __name__ == "__main__":
    asyncio.run(main())
