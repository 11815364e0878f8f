"""Property-based fuzzing of the SSE parser (:class:`proxy.sse.SSEParser`).

Properties, for every input:

- a well-formed stream (events of ``data``/``event``/``id``/``retry``/unknown
  fields and comments, any mix of CRLF, CR and LF line endings, extra blank
  lines) yields the same events however it is split into reads (empty reads
  included), and each event's ``data`` is exactly its data lines joined by LF;
- arbitrary bytes, split anywhere, under a small event bound: ``feed`` and
  ``close`` raise nothing but :class:`SSEError`; they raise exactly when some
  event (its bytes after line-ending normalization, blank line included) or
  the unterminated tail exceeds the bound, whatever the split; events
  delivered before the error are a prefix of the unbounded parse; no event
  handed out is larger than the bound.

The in-suite run is short (300 examples per property, a few seconds).  To
fuzz longer set ``WARDEN_FUZZ_EXAMPLES``; fix a seed with ``WARDEN_FUZZ_SEED``::

    WARDEN_FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest -q -p no:cacheprovider -o timeout=0 tests/proxy/test_sse_fuzz.py

A failing example is printed by Hypothesis; add it to ``tests/proxy/test_sse.py``
as a regression test.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from llm_warden.proxy.sse import RawEvent, SSEError, SSEParser

EXAMPLES = int(os.environ.get("WARDEN_FUZZ_EXAMPLES", "300"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_SEED = os.environ.get("WARDEN_FUZZ_SEED")


def _seeded(f: Any) -> Any:
    return seed(int(_SEED))(f) if _SEED else f


# A field value: any bytes but the line breaks (UTF-8 or not).
value = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
eol = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def events(draw: st.DrawFn) -> tuple[bytes, tuple[str | None, bytes | None]]:
    """One event's bytes (without its blank line) and what it must parse to."""
    lines: list[tuple[bytes, bytes]] = []
    data: list[bytes] = []
    name: str | None = None
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["data", "data", "data-nospace", "data-bare", "event", "comment", "id", "retry", "other"]))
        v = draw(value)
        if kind == "data":
            line = b"data: " + v
            data.append(v)
        elif kind == "data-nospace":
            line = b"data:" + v
            data.append(v[1:] if v.startswith(b" ") else v)
        elif kind == "data-bare":
            line = b"data"
            data.append(b"")
        elif kind == "event":
            line = b"event: " + v
            name = v.decode("utf-8", "replace")
        elif kind == "comment":
            line = b":" + v
        elif kind == "id":
            line = b"id: " + v
        elif kind == "retry":
            line = b"retry: " + str(draw(st.integers(0, 10**6))).encode()
        else:
            line = draw(st.sampled_from([b"foo", b"bar", b"Data", b"DATA"])) + b": " + v
        lines.append((line, draw(eol)))
    raw = _join([piece for line, end in lines for piece in (line, end)])
    return raw, (name, b"\n".join(data) if data else None)


def _join(pieces: list[bytes]) -> bytes:
    """Concatenate, keeping a CR that ends one piece and an LF that starts the next two line breaks
    (written together they would be one CRLF)."""
    out = bytearray()
    for p in pieces:
        if out.endswith(b"\r") and p.startswith(b"\n"):
            out += b"\r"
        out += p
    return bytes(out)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[tuple[str | None, bytes | None]]]:
    parts: list[bytes] = []
    expected = []
    for _ in range(draw(st.integers(0, 8))):
        raw, want = draw(events())
        parts += [raw, draw(eol)]  # the blank line ending the event
        parts.append(draw(st.sampled_from([b"", b"", b"\n", b"\r\n", b"\r\r"])))  # extra blank lines between events
        expected.append(want)
    return _join(parts), expected


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(c % (len(data) + 1) for c in cuts)
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])  # repeated points give empty reads
        prev = p
    out.append(data[prev:])
    return out


def _feed(chunks: list[bytes], limit: int) -> tuple[list[RawEvent], bool]:
    p = SSEParser(max_event_bytes=limit)
    out: list[RawEvent] = []
    try:
        for c in chunks:
            out.extend(p.feed(c))
        out.extend(p.close())
    except SSEError:
        return out, True
    return out, False


def _summary(evs: list[RawEvent]) -> list[tuple[str | None, bytes | None]]:
    return [(e.event, e.data) for e in evs]


@_seeded
@SETTINGS
@given(streams(), st.lists(st.integers(0, 10**6), max_size=12))
def test_any_split_of_a_valid_stream_gives_the_same_events(stream: tuple[bytes, list[Any]], cuts: list[int]) -> None:
    data, expected = stream
    whole, failed = _feed([data], 1 << 20)
    assert not failed
    assert _summary(whole) == expected
    split, failed = _feed(_splits(data, cuts), 1 << 20)
    assert not failed
    assert [(e.raw, e.event, e.data) for e in split] == [(e.raw, e.event, e.data) for e in whole]


@_seeded
@SETTINGS
@given(streams(), st.integers(0, 10**6))
def test_byte_by_byte_equals_one_read(stream: tuple[bytes, list[Any]], _: int) -> None:
    data, expected = stream
    evs, failed = _feed([data[i : i + 1] for i in range(len(data))], 1 << 20)
    assert not failed and _summary(evs) == expected


def _must_fail(data: bytes, limit: int) -> bool:
    """Whether some event of ``data`` (or its unterminated tail) is over ``limit``: the definition, on the whole stream."""
    norm = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    start = 0
    while True:
        end = norm.find(b"\n\n", start)
        if end < 0:
            return len(norm) - start > limit
        if end + 2 - start > limit:
            return True
        start = end + 2


hostile = st.lists(st.one_of(st.binary(max_size=64), st.sampled_from([b"\n", b"\r", b"\r\n", b"\n\n", b"data: ", b":", b"data: [DONE]\n\n"])), max_size=30).map(b"".join)


@_seeded
@SETTINGS
@given(hostile, st.lists(st.integers(0, 10**6), max_size=12), st.integers(1, 64))
def test_arbitrary_bytes_raise_only_sse_error_and_only_past_the_bound(data: bytes, cuts: list[int], limit: int) -> None:
    unbounded, failed = _feed([data], 1 << 20)
    assert not failed
    expect_failure = _must_fail(data, limit)
    for chunks in ([data], _splits(data, cuts)):
        evs, failed = _feed(chunks, limit)
        assert failed == expect_failure
        if failed:
            assert _summary(evs) == _summary(unbounded)[: len(evs)]
        else:
            assert _summary(evs) == _summary(unbounded)
        # A trailing event completed by close() gains its blank line: up to 2 bytes over what was held.
        assert all(len(e.raw) <= limit + 2 for e in evs)
        assert all(e.raw.endswith(b"\n\n") for e in evs)
