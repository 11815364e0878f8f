"""A child process for the SIGKILL test: writes records in sync mode forever,
printing the audit writer process's pid first, then each request id once its
``record_exchange`` returned."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from llm_warden.proxy.audit.sqlite import SQLiteAuditLog
from llm_warden.proxy.config import AuditConfig
from tests.proxy.audit.helpers import make_exchange


async def main(path: str, concurrency: int, fsync: bool) -> None:
    log = SQLiteAuditLog(AuditConfig(durability="sync", fsync=fsync, checkpoint_every=50, checkpoint_file=path + ".checkpoints"), Path(path))
    await log.start()
    sys.stdout.write(f"writer {log.writer_pid}\n")
    sys.stdout.flush()
    counter = iter(range(10**9))

    async def worker(w: int) -> None:
        while True:
            rid = f"crash_{w}_{next(counter)}"
            await log.record_exchange(make_exchange(request_id=rid))
            sys.stdout.write(rid + "\n")
            sys.stdout.flush()

    await asyncio.gather(*(worker(w) for w in range(concurrency)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "fsync" if len(sys.argv) > 3 else True))
