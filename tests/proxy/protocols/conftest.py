"""Fixtures for the protocol adapters: the official ``anthropic`` SDK pointed at a running Warden."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import pytest

from llm_warden.proxy.testing import RunningWarden

_open: list[anthropic.AsyncAnthropic] = []


def anthropic_client(rw: RunningWarden, api_key: str, **kw: Any) -> anthropic.AsyncAnthropic:
    """The SDK as an application configures it: Warden's address as the base URL, the user's JWT as the API key."""
    client = anthropic.AsyncAnthropic(base_url=rw.base_url.removesuffix("/v1"), api_key=api_key, max_retries=0, timeout=10, **kw)
    _open.append(client)
    return client


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    """Close every SDK client a test made while its event loop still runs."""
    yield
    while _open:
        await _open.pop().close()


@pytest.fixture
def aclient(warden: RunningWarden, token: Callable[..., str]) -> anthropic.AsyncAnthropic:
    return anthropic_client(warden, token())
