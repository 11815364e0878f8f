"""The SSE parser: whole events whatever the line endings and read boundaries."""

from __future__ import annotations

import pytest

from llm_warden.proxy.sse import RawEvent, SSEError, SSEParser

STREAM = (
    b": keep-alive comment\r\n\r\n"
    b"event: message\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n"
    b"data: caf\xc3\xa9\r\r"
    b"data:no-space\n\n"
    b"data: [DONE]\r\n\r\n"
)


def _summary(events: list[RawEvent]) -> list[tuple[str | None, bytes | None]]:
    return [(e.event, e.data) for e in events]


def _feed_split(parts: list[bytes]) -> list[RawEvent]:
    p = SSEParser()
    out: list[RawEvent] = []
    for part in parts:
        out.extend(p.feed(part))
    return out + p.close()


EXPECTED = [(None, None), ("message", b'{"a":\n1}'), (None, "café".encode()), (None, b"no-space"), (None, b"[DONE]")]


def test_whole_stream() -> None:
    assert _summary(_feed_split([STREAM])) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_any_split_point_gives_the_same_events(cut: int) -> None:
    """A CR at the end of one read and the LF at the start of the next are one line break."""
    assert _summary(_feed_split([STREAM[:cut], STREAM[cut:]])) == EXPECTED


def test_byte_by_byte() -> None:
    assert _summary(_feed_split([bytes([b]) for b in STREAM])) == EXPECTED


def test_lone_cr_then_lf_reads() -> None:
    # "\r" | "\n" | "\n": one line break, then a blank line ends the event.
    assert _summary(_feed_split([b"data: x\r", b"\n", b"\n", b"data: y\n\n"])) == [(None, b"x"), (None, b"y")]


def test_trailing_event_without_blank_line_counts_on_close() -> None:
    p = SSEParser()
    assert p.feed(b"data: tail") == []
    assert _summary(p.close()) == [(None, b"tail")]


def test_oversized_event_is_an_error_and_large_events_within_limit_pass() -> None:
    p = SSEParser(max_event_bytes=64 * 1024)
    big = b"data: " + b"x" * (60 * 1024) + b"\n\n"
    events = []
    for i in range(0, len(big), 1000):
        events.extend(p.feed(big[i : i + 1000]))
    assert [len(e.data or b"") for e in events] == [60 * 1024]
    with pytest.raises(SSEError):
        for _ in range(70):
            p.feed(b"data: " + b"y" * 1000)


def test_empty_reads_keep_a_pending_cr() -> None:
    # "\r" | "" | "\n" is still one line break (an empty read must not forget the CR).
    assert _summary(_feed_split([b"data: x\r", b"", b"\n", b"data: y\n\n"])) == [(None, b"x\ny")]


def test_an_oversized_event_in_one_read_is_an_error() -> None:
    """The bound applies to each complete event too, not only to what is left incomplete after a read."""
    p = SSEParser(max_event_bytes=4096)
    with pytest.raises(SSEError):
        p.feed(b"data: ok\n\n" + b"data: " + b"x" * 5000 + b"\n\ndata: after\n\n")


def test_the_bound_counts_normalized_bytes_and_the_blank_line() -> None:
    event = b"data: " + b"x" * 94 + b"\n\n"  # 102 bytes
    assert _summary(SSEParser(max_event_bytes=102).feed(event)) == [(None, b"x" * 94)]
    with pytest.raises(SSEError):
        SSEParser(max_event_bytes=101).feed(event)
    # CRLF counts as one byte per line break, whatever the read boundaries.
    crlf = event.replace(b"\n", b"\r\n")
    p = SSEParser(max_event_bytes=102)
    assert _summary([e for b in crlf for e in p.feed(bytes([b]))]) == [(None, b"x" * 94)]


def test_after_an_error_the_parser_stays_failed_and_holds_nothing() -> None:
    p = SSEParser(max_event_bytes=2048)
    p.feed(b"data: " + b"x" * 2000)
    with pytest.raises(SSEError):
        p.feed(b"x" * 100)
    assert p.held_bytes == 0
    with pytest.raises(SSEError):
        p.feed(b"\n\ndata: y\n\n")
    with pytest.raises(SSEError):
        p.close()


def test_a_large_event_does_not_leave_a_large_buffer_behind() -> None:
    """1000 events, one of 900 KB arriving in 1 KiB reads: afterwards the parser holds
    only the incomplete next event, and no allocation of the large one stays alive."""
    import gc
    import tracemalloc

    big = b"data: " + b"b" * (900 * 1024) + b"\n\n"
    small = b'data: {"choices":[{"index":0,"delta":{"content":"word"}}]}\n\n'
    p = SSEParser(max_event_bytes=1024 * 1024)
    tracemalloc.start()
    try:
        sizes = []
        for i in range(1000):
            payload = big if i == 500 else small
            for j in range(0, len(payload), 1024):
                for ev in p.feed(payload[j : j + 1024]):
                    sizes.append(len(ev.raw))
            if i == 500:
                _, peak = tracemalloc.get_traced_memory()
        p.feed(b"data: partial")  # an incomplete event is held, nothing more
        gc.collect()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sizes) == 1000 and max(sizes) == len(big)
    assert peak > 900 * 1024  # the large event was really held while it arrived
    assert p.held_bytes == len(b"data: partial")
    assert current < 64 * 1024, f"{current} bytes still allocated after the large event"


def test_the_config_bounds_the_parser() -> None:
    from llm_warden.proxy.config import UpstreamConfig, load_config
    from llm_warden.proxy.errors import ConfigError
    from llm_warden.proxy.sse import DEFAULT_MAX_EVENT_BYTES
    from llm_warden.proxy.upstream import Upstream

    assert UpstreamConfig().max_sse_event_bytes == DEFAULT_MAX_EVENT_BYTES == 1024 * 1024
    cfg = load_config({"upstream": {"max_sse_event_bytes": 4096}, "plugins": {"enabled": []}}, plugin_classes={})
    p = Upstream(cfg.upstream).sse_parser()
    assert p.max_event_bytes == 4096
    with pytest.raises(SSEError):
        p.feed(b"data: " + b"x" * 4096)
    for bad in (0, 1023, 256 * 1024 * 1024 + 1):
        with pytest.raises(ConfigError, match="max_sse_event_bytes"):
            load_config({"upstream": {"max_sse_event_bytes": bad}, "plugins": {"enabled": []}}, plugin_classes={})
