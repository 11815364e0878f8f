"""The SSE parser: whole events whatever the line endings and read boundaries."""

from __future__ import annotations

import pytest

from proxy.sse import RawEvent, SSEError, SSEParser

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
