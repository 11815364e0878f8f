"""Server-sent events: split an upstream byte stream into whole events.

The parser is incremental and never hands out a partial frame: plugins and the
tool-call assembler always see whole events.  An event larger than
``max_event_bytes`` (``[upstream] max_sse_event_bytes``, 1 MiB by default) is
an error: a hostile or broken upstream cannot make Warden buffer without bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

DONE = b"[DONE]"


class SSEError(ValueError):
    """The upstream stream is not valid SSE (or an event is too large)."""


@dataclass(slots=True)
class RawEvent:
    """One whole SSE event: its exact bytes and its joined ``data`` payload."""

    raw: bytes
    data: bytes | None
    event: str | None = None


DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
"""The default bound on one event (``[upstream] max_sse_event_bytes``)."""


class SSEParser:
    """Feed bytes, get whole events.

    Line endings (CRLF, CR, LF) are normalized chunk by chunk; a CR at the end
    of one chunk and an LF at the start of the next are one line break, so
    any split of a stream into reads yields the same events.

    One event's size is its bytes after line-ending normalization, blank line
    included; past ``max_event_bytes`` :class:`SSEError` is raised (at the read
    that crosses the bound, before the event is complete), the held bytes are
    dropped and every later ``feed``/``close`` raises too.  Events completed
    earlier in the read that fails are not returned: the stream has failed.

    Memory: an incomplete event is held as the list of reads it arrived in
    (never re-copied per read, so a large event in many small reads costs
    linear time) and joined once when its blank line arrives; nothing is kept
    between events except the bytes of the next incomplete one, so the parser
    does not stay sized to the largest event it ever saw.
    """

    __slots__ = ("_parts", "_held", "_ends_lf", "_pending_cr", "_failed", "max_event_bytes")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._parts: list[bytes] = []
        self._held = 0
        self._ends_lf = False
        self._pending_cr = False
        self._failed = False
        self.max_event_bytes = max_event_bytes

    @property
    def held_bytes(self) -> int:
        """Bytes of the incomplete event held now."""
        return self._held

    def feed(self, chunk: bytes) -> list[RawEvent]:
        """The events completed by ``chunk`` (in order); raises :class:`SSEError` past the size bound."""
        if self._failed:
            raise SSEError("the upstream stream already failed")
        if not chunk:
            return []
        if self._pending_cr:
            self._pending_cr = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
                if not chunk:
                    return []
        if b"\r" in chunk:
            self._pending_cr = chunk[-1] == 0x0D
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        parts = self._parts
        if parts:
            if b"\n\n" not in chunk and not (self._ends_lf and chunk[0] == 0x0A):
                # Still no blank line: hold the read as it is (no copy of what is held).
                self._held += len(chunk)
                if self._held > self.max_event_bytes:
                    self._fail()
                parts.append(chunk)
                self._ends_lf = chunk[-1] == 0x0A
                return []
            parts.append(chunk)
            data = b"".join(parts)
            parts.clear()
        else:
            data = chunk
        limit = self.max_event_bytes
        events: list[RawEvent] = []
        start = 0
        while True:
            end = data.find(b"\n\n", start)
            if end < 0:
                break
            stop = end + 2
            if stop - start > limit:
                self._fail()
            if end > start:
                raw = data[start:stop]
                if not raw.isspace():
                    events.append(_parse_event(raw))
            start = stop
        rest = len(data) - start
        self._held = rest
        if rest:
            if rest > limit:
                self._fail()
            parts.append(data[start:] if start else data)
            self._ends_lf = data[-1] == 0x0A
        return events

    def close(self) -> list[RawEvent]:
        """The stream ended: a trailing event without its blank line still counts."""
        if self._failed:
            raise SSEError("the upstream stream already failed")
        rest = b"".join(self._parts)
        self._parts.clear()
        self._held = 0
        self._pending_cr = False
        self._ends_lf = False
        if rest.strip():
            return [_parse_event(rest.rstrip(b"\n") + b"\n\n")]
        return []

    def _fail(self) -> None:
        self._parts.clear()
        self._held = 0
        self._failed = True
        raise SSEError(f"an upstream event exceeded {self.max_event_bytes} bytes")


def _parse_event(raw: bytes) -> RawEvent:
    """One event from its bytes (LF line endings, ending in the blank line)."""
    if raw.startswith(b"data:") and raw.find(b"\n") == len(raw) - 2:
        # The usual shape: one ``data:`` line.
        data = raw[6:-2] if raw[5:6] == b" " else raw[5:-2]
        return RawEvent(raw=raw, data=data)
    data_lines: list[bytes] = []
    event: str | None = None
    joined: bytes | None = None
    for line in raw.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data_lines.append(value)
        elif field == b"event":
            event = value.decode("utf-8", "replace")
    if data_lines:
        joined = b"\n".join(data_lines)
    return RawEvent(raw=raw, data=joined, event=event)


def encode_data(payload: bytes) -> bytes:
    """One SSE event carrying ``payload`` as its data."""
    return b"data: " + payload + b"\n\n"


def encode_json(obj: object) -> bytes:
    return encode_data(orjson.dumps(obj))


DONE_EVENT = encode_data(DONE)
