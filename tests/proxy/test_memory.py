"""The idle trim: after traffic, once idle, one collection and heap trim — never while busy, never twice per quiet period."""

from __future__ import annotations

import asyncio

import pytest

from llm_warden.proxy import memory


def test_malloc_trim_is_found_and_callable_on_glibc() -> None:
    trim = memory._malloc_trim()
    if trim is None:
        pytest.skip("no glibc malloc_trim on this platform")
    assert trim() in (0, 1)


async def test_trims_once_after_traffic_when_idle_and_never_while_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: (lambda: calls.append(1) or 1))
    state = {"inflight": 0, "begun": 0}
    task = asyncio.create_task(memory.idle_trim(lambda: state["inflight"], lambda: state["begun"], idle_s=0.5))
    try:
        await asyncio.sleep(1.6)
        assert calls == [], "no traffic yet: nothing to give back"
        state["begun"], state["inflight"] = 5, 3
        await asyncio.sleep(1.6)
        assert calls == [], "never while requests are in flight"
        state["inflight"] = 0
        await asyncio.sleep(1.8)
        assert calls == [1], "once, after the quiet period"
        await asyncio.sleep(1.6)
        assert calls == [1], "not again without new traffic"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
