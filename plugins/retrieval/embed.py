"""Embeddings client: the provider's ``/v1/embeddings`` (OpenAI wire format).

``UpstreamEmbedder.embed(texts)`` returns an ``(n, dim)`` float32 matrix of
L2-normalised rows.  The dimension is fixed by configuration or learned from
the first answer and checked on every answer afterwards; a mismatch, a
malformed body, an HTTP error or a timeout raises :class:`EmbeddingError`
(a :class:`~proxy.errors.UpstreamError`, so a request refused because of it
renders as a 502/504 OpenAI error naming the rule ``retrieval.embedder``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import aiohttp
import numpy as np
import orjson

from llm_warden.proxy.errors import UpstreamError, UpstreamTimeout


class EmbeddingError(UpstreamError):
    """The embeddings endpoint failed or answered something unusable."""


class EmbeddingTimeout(UpstreamTimeout):
    """The embeddings endpoint did not answer in time."""


class Embedder(Protocol):
    """What the retrieval service needs from an embedder."""

    model: str
    dim: int | None

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts``: an (n, dim) float32 matrix of L2-normalised rows."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class TokenCounting(Protocol):
    """An embedder that knows its own tokenizer: chunks are then sized in the model's tokens."""

    max_tokens: int
    """The model's window, special tokens included."""
    special_tokens: int
    """Tokens the model adds to every input (``[CLS]`` and ``[SEP]``)."""

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as the model reads it, without the special tokens, never truncated."""
        ...


def normalize(matrix: np.ndarray) -> np.ndarray:
    """L2-normalise rows; a zero row is an error (it has no direction)."""
    m = np.ascontiguousarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise EmbeddingError("the embedder returned a zero or non-finite vector", rule="retrieval.embedder")
    unit: np.ndarray = m / norms
    return unit


class UpstreamEmbedder:
    """POST ``{base_url}/embeddings`` in batches with a timeout per request."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        dim: int | None = None,
        batch_size: int = 64,
        timeout_s: float = 30.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/embeddings"
        self.api_key = api_key
        self.model = model
        self.dim = dim or None
        self.batch_size = batch_size
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        self._own_session = session is None

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` (batched); rows are L2-normalised float32."""
        if not texts:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        parts = [await self._embed_batch(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return np.vstack(parts)

    async def _embed_batch(self, texts: list[str]) -> np.ndarray:
        session = await self._get_session()
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        payload = orjson.dumps({"model": self.model, "input": texts, "encoding_format": "float"})
        try:
            async with session.post(self.url, data=payload, headers=headers, timeout=self.timeout) as resp:
                body = await resp.read()
                status = resp.status
        except TimeoutError:
            raise EmbeddingTimeout(f"embeddings request to {self.url} timed out", rule="retrieval.embedder") from None
        except aiohttp.ClientError as e:
            raise EmbeddingError(f"embeddings request to {self.url} failed: {e.__class__.__name__}", rule="retrieval.embedder") from None
        if status != 200:
            raise EmbeddingError(f"embeddings endpoint answered HTTP {status}: {_error_message(body)}", rule="retrieval.embedder")
        return self._parse(body, len(texts))

    def _parse(self, body: bytes, n: int) -> np.ndarray:
        try:
            data = orjson.loads(body)
            items = data["data"]
            if not isinstance(items, list) or len(items) != n:
                raise ValueError(f"expected {n} embeddings, got {len(items) if isinstance(items, list) else 'none'}")
            rows: list[Any] = [None] * n
            for pos, item in enumerate(items):
                idx = item.get("index", pos)
                if not isinstance(idx, int) or not 0 <= idx < n or rows[idx] is not None:
                    raise ValueError(f"bad or repeated index {idx!r}")
                rows[idx] = item["embedding"]
            matrix = np.asarray(rows, dtype=np.float32)
        except (ValueError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError) as e:
            raise EmbeddingError(f"embeddings endpoint answered an unusable body: {e}", rule="retrieval.embedder") from None
        if matrix.ndim != 2 or matrix.shape[1] == 0:
            raise EmbeddingError("embeddings endpoint answered vectors of no dimension", rule="retrieval.embedder")
        if self.dim is None:
            self.dim = int(matrix.shape[1])
        elif matrix.shape[1] != self.dim:
            raise EmbeddingError(
                f"embedding dimension {matrix.shape[1]} differs from the expected {self.dim} (model {self.model!r})",
                rule="retrieval.embedding_dim",
            )
        return normalize(matrix)


def _error_message(body: bytes) -> str:
    try:
        data = orjson.loads(body)
        msg = data.get("error", {}).get("message") if isinstance(data, dict) else None
        if isinstance(msg, str):
            return msg[:300]
    except orjson.JSONDecodeError:
        pass
    return body[:200].decode("utf-8", "replace")
