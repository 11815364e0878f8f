"""Header values Warden sets: validated before they are sent.

A value that reaches a response header may come from a client (a model
name), a token claim or a provider answer.  Nothing is echoed into a header
unless it is clean text of bounded length: a control character would split
the header (or make the HTTP layer drop the connection after the provider
was billed), and a huge value would be reflected to the client.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("warden.headers")
MAX_HEADER_VALUE = 4096
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}$")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def safe_text(value: str, limit: int) -> str:
    """``value`` as clean text for a log or record: undecodable bytes and control characters escaped, cut at ``limit``."""
    if value.isascii() and value.isprintable() and len(value) <= limit:
        return value
    clean = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    clean = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in clean)
    return clean if len(clean) <= limit else clean[:limit] + "…"


def header_value_ok(value: str) -> bool:
    """Whether ``value`` may be sent as a header value (visible ASCII, spaces and tabs, bounded)."""
    return len(value) <= MAX_HEADER_VALUE and value.isascii() and _BAD_VALUE.search(value) is None


def safe_headers(headers: dict[str, str], request_id: str) -> dict[str, str]:
    """``headers`` without any entry that is not a valid name or a clean, bounded value (each drop is logged)."""
    for k, v in headers.items():
        if not (_TOKEN.match(k) and isinstance(v, str) and header_value_ok(v)):
            break
    else:
        return headers
    out: dict[str, str] = {}
    for k, v in headers.items():
        if _TOKEN.match(k) and isinstance(v, str) and header_value_ok(v):
            out[k] = v
        else:
            log.warning("request %s: response header %s dropped: not a clean value of at most %d characters", request_id, safe_text(k, 64), MAX_HEADER_VALUE)
    return out
