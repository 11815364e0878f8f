"""The provider side: one pooled ``aiohttp.ClientSession``, timeouts, safe retries.

Retries happen only before any byte of the answer was relayed, and only where
they cannot duplicate work: when the connection could not be made, on a
502/503/504 answer, and for idempotent methods also when the request was sent
but no answer came (timeout, dropped connection).  A POST the provider may be
working on is never sent twice.  The provider key comes from Warden's own environment; the
caller's token never goes upstream.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from llm_warden.proxy import wire
from llm_warden.proxy.config import UpstreamConfig
from llm_warden.proxy.errors import UpstreamError, UpstreamTimeout
from llm_warden.proxy.sse import RawEvent, SSEParser

log = logging.getLogger("warden.upstream")

RETRY_STATUSES = frozenset({502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
"""Methods retried after the request reached the provider (a timeout or a broken
connection before the answer); other methods only when the connection failed."""
FORWARD_REQUEST_HEADERS = ("content-type", "accept", "openai-beta", "user-agent", "tracestate")
RELAY_RESPONSE_HEADERS = (
    "content-type",
    "retry-after",
    "openai-processing-ms",
    "openai-version",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


class StreamTranslator(Protocol):
    """A provider stream in another API, event by event, as internal ``chat.completion.chunk`` objects.

    ``feed`` returns chunk objects and keep-alive comment bytes, raises
    :class:`~proxy.sse.SSEError` for a malformed event; ``done`` says the
    answer is complete (a stream that ends before is cut).
    """

    done: bool

    def feed(self, ev: RawEvent) -> list[dict[str, Any] | bytes]: ...


class Dialect(Protocol):
    """The API the provider speaks for the chat flow's upstream turns (``[upstream] api``)."""

    name: str
    path: str
    """The provider path of a chat turn, below the base URL."""
    retry_statuses: frozenset[int]

    def auth_headers(self, key: str | None) -> dict[str, str]:
        """The headers that carry the provider key (and the API version)."""
        ...

    def encode(self, payload: dict[str, Any], raw: bytes) -> bytes:
        """The request bytes for an internal chat body (``raw``: its bytes); raises ``BadRequest`` for what cannot be translated."""
        ...

    def answer(self, obj: object) -> tuple[dict[str, Any] | None, str | None]:
        """A parsed 2xx answer as a ``chat.completion`` checked against the wire, or ``(None, why)``."""
        ...

    def error_body(self, raw: bytes) -> bytes:
        """A provider error body in the OpenAI format (unchanged when it is not the dialect's error shape)."""
        ...

    def stream(self) -> StreamTranslator | None:
        """A translator for one streamed answer; ``None`` when the provider streams chat chunks already."""
        ...


class ChatDialect:
    """An OpenAI-compatible provider: chat completions, relayed as they are."""

    name = "openai"
    path = "/chat/completions"
    retry_statuses = RETRY_STATUSES

    def auth_headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def encode(self, payload: dict[str, Any], raw: bytes) -> bytes:
        return raw

    def answer(self, obj: object) -> tuple[dict[str, Any] | None, str | None]:
        why = wire.check_completion(obj)
        return (obj, None) if why is None and isinstance(obj, dict) else (None, why)

    def error_body(self, raw: bytes) -> bytes:
        return raw

    def stream(self) -> StreamTranslator | None:
        return None


def make_dialect(cfg: UpstreamConfig) -> Dialect:
    """The dialect ``[upstream] api`` names."""
    if cfg.api == "anthropic":
        from llm_warden.proxy.upstream_anthropic import AnthropicDialect

        return AnthropicDialect(cfg.default_max_tokens, cfg.anthropic_version)
    return ChatDialect()


@dataclass(slots=True)
class UpstreamResponse:
    """An open upstream response; ``close()`` cancels the upstream request."""

    status: int
    headers: CIMultiDict[str]
    resp: aiohttp.ClientResponse
    attempts: int

    def relay_headers(self) -> dict[str, str]:
        out = {}
        for h in RELAY_RESPONSE_HEADERS:
            v = self.resp.headers.get(h)
            if v is not None:
                out[h] = v
        return out

    def close(self) -> None:
        self.resp.close()

    def release(self) -> None:
        self.resp.release()


class Upstream:
    """The one client towards the provider."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.base = cfg.base_url.rstrip("/")
        self.session: aiohttp.ClientSession | None = None
        key = cfg.api_key
        self.dialect = make_dialect(cfg)
        self._auth = self.dialect.auth_headers(key)
        self._forward = tuple(h for h in FORWARD_REQUEST_HEADERS if self.dialect.name == "openai" or h != "openai-beta")
        if cfg.api_key_env and not key:
            log.warning("environment variable %s is not set: requests go upstream without a provider key", cfg.api_key_env)
        self._timeout = aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout_s, sock_connect=cfg.connect_timeout_s, sock_read=cfg.timeout_s)
        from urllib.parse import urlsplit

        parts = urlsplit(self.base)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.cfg.max_connections, ttl_dns_cache=300, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=True, skip_auto_headers=("User-Agent",)
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def sse_parser(self) -> SSEParser:
        """A parser for one streamed answer, bounded by ``[upstream] max_sse_event_bytes``."""
        return SSEParser(self.cfg.max_sse_event_bytes)

    def build_headers(self, incoming: Any, extra: dict[str, str]) -> dict[str, str]:
        headers: dict[str, str] = {}
        for h in self._forward:
            v = incoming.get(h)
            if v is not None:
                headers[h] = v
        headers.update(extra)
        headers.update(self._auth)
        return headers

    async def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> UpstreamResponse:
        """Send a request; retries before any byte was relayed.  Raises UpstreamError / UpstreamTimeout.

        ``path`` is sent as it is (already encoded, never normalised again):
        the pipeline builds it from the matched route and the client's raw query.
        """
        assert self.session is not None, "upstream session not started"
        url = URL(self.base + path, encoded=True)
        attempts = 0
        delay = self.cfg.retry_backoff_s
        while True:
            attempts += 1
            last = attempts > self.cfg.max_retries
            try:
                resp = await self.session.request(method, url, data=body, headers=headers, allow_redirects=False)
            except aiohttp.ConnectionTimeoutError:
                if last:
                    raise UpstreamTimeout("the provider did not accept the connection in time", rule="upstream.connect_timeout_s") from None
            except (TimeoutError, aiohttp.ServerTimeoutError):
                # The request was sent: the provider may be working on it.
                if last or method not in IDEMPOTENT_METHODS:
                    raise UpstreamTimeout("the provider did not answer in time", rule="upstream.timeout_s") from None
            except aiohttp.ClientConnectorError as e:
                if last:
                    raise UpstreamError(f"cannot connect to the provider ({e.os_error.strerror or 'connection failed'})", rule="upstream.base_url") from None
            except aiohttp.ClientError as e:
                if last or method not in IDEMPOTENT_METHODS:
                    raise UpstreamError(f"provider connection failed: {type(e).__name__}", rule="upstream.base_url") from None
            else:
                if resp.status in self.dialect.retry_statuses and attempts <= self.cfg.max_retries:
                    resp.release()
                else:
                    return UpstreamResponse(resp.status, resp.headers.copy(), resp, attempts)
            await asyncio.sleep(delay)
            delay *= 2

    async def read_body(self, ur: UpstreamResponse, limit: int) -> bytes:
        """Read a whole (non-streamed) answer, bounded; timeouts become 504."""
        try:
            chunks = []
            size = 0
            async for chunk in ur.resp.content.iter_chunked(65536):
                size += len(chunk)
                if size > limit:
                    ur.close()
                    raise UpstreamError("the provider's answer is too large", rule="upstream.max_response_bytes")
                chunks.append(chunk)
            return b"".join(chunks)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            ur.close()
            raise UpstreamTimeout("the provider did not finish its answer in time", rule="upstream.timeout_s") from None
        except aiohttp.ClientError as e:
            ur.close()
            raise UpstreamError(f"the provider connection broke: {type(e).__name__}", rule="upstream.base_url") from None
        finally:
            ur.release()
