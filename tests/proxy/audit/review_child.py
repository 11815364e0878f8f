"""An audit writer child with fault hooks, for the review tests.

Started instead of ``proxy.audit.writer`` (see ``use_review_child``).  Each hook
is a file holding a count; while the count is above zero, every child that
reaches the hook decrements it and dies there:

- ``WARDEN_REVIEW_DIE_AFTER_COMMIT``: right after a group's ``COMMIT``, before
  its answers are sent (the answers are lost, the records are committed);
- ``WARDEN_REVIEW_EXIT_AFTER_INIT``: right after answering ``init``.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from llm_warden.proxy.audit import writer


def _take(var: str) -> bool:
    path = os.environ.get(var)
    if not path:
        return False
    p = Path(path)
    try:
        n = int(p.read_text() or "0")
    except FileNotFoundError:
        return False
    if n <= 0:
        return False
    p.write_text(str(n - 1))
    return True


def main(argv: list[str]) -> int:
    if _take("WARDEN_REVIEW_EXIT_AFTER_INIT"):
        sock = socket.socket(fileno=int(argv[1]))
        writer._FrameReader(sock).read(0)
        sock.sendall(writer.frame({"id": 0, "ok": True, "pid": os.getpid()}))
        sock.close()
        os._exit(0)
    commit = writer._commit_group

    def commit_then_maybe_die(*args: Any) -> bytes:
        out = commit(*args)
        if _take("WARDEN_REVIEW_DIE_AFTER_COMMIT"):
            os._exit(9)
        return out

    writer._commit_group = commit_then_maybe_die  # type: ignore[assignment]
    return writer.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
