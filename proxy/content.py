"""The text of a chat message's ``content``, whatever its shape."""

from __future__ import annotations

from typing import Any


def content_text(content: Any) -> str:
    """A string as it is; the ``text`` parts of a list of parts, one per line; anything else ``""``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""
