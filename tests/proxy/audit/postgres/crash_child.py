"""A Warden stand-in for the crash test: records exchanges in sync mode and prints each acknowledged request id.

Run as ``python -m tests.proxy.audit.postgres.crash_child DSN KEYFILE``; it writes until killed.
"""

from __future__ import annotations

import asyncio
import sys

from llm_warden.proxy.audit.postgres import PostgresAuditLog
from llm_warden.proxy.config import AuditConfig, DatabaseConfig
from tests.proxy.audit.helpers import make_exchange


async def main(dsn: str, key_file: str) -> None:
    log = PostgresAuditLog(
        AuditConfig(backend="postgres", durability="sync", signing_key_file=key_file, checkpoint_every=50), DatabaseConfig(pool_max=4), dsn=dsn
    )
    await log.start()
    print(f"origin {log.origin}", flush=True)
    counter = iter(range(1 << 30))

    async def worker(k: int) -> None:
        for i in counter:
            rid = f"req_c{k}_{i:06d}"
            await log.record_exchange(make_exchange(request_id=rid))
            sys.stdout.write(f"ack {rid}\n")
            sys.stdout.flush()

    await asyncio.gather(*(worker(k) for k in range(8)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
