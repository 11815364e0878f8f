"""Server-sent events: split an upstream byte stream into whole events.

The parser is incremental and never hands out a partial frame: plugins and the
tool-call assembler always see whole events.  An event larger than
``max_event_bytes`` is an error (a hostile or broken upstream cannot make
Warden buffer without bound).
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


class SSEParser:
    """Feed bytes, get whole events.

    Line endings (CRLF, CR, LF) are normalized chunk by chunk; a CR at the end
    of one chunk and an LF at the start of the next are one line break.  Only
    the new bytes are scanned for the blank line, so a large event arriving in
    many small reads costs linear time.
    """

    __slots__ = ("_buf", "_pending_cr", "_scanned", "max_event_bytes")

    def __init__(self, max_event_bytes: int = 4 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._pending_cr = False
        self._scanned = 0
        self.max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> list[RawEvent]:
        if self._pending_cr:
            self._pending_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._pending_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf
        buf += chunk
        events: list[RawEvent] = []
        start = 0
        search = max(self._scanned - 1, 0)
        while True:
            end = buf.find(b"\n\n", search)
            if end < 0:
                break
            block = bytes(buf[start:end])
            start = search = end + 2
            if block.strip():
                events.append(_parse_block(block))
        if start:
            del buf[:start]
        self._scanned = len(buf)
        if len(buf) > self.max_event_bytes:
            raise SSEError(f"an upstream event exceeded {self.max_event_bytes} bytes")
        return events

    def close(self) -> list[RawEvent]:
        """The stream ended: a trailing event without its blank line still counts."""
        rest = bytes(self._buf)
        self._buf = bytearray()
        self._scanned = 0
        self._pending_cr = False
        if rest.strip():
            return [_parse_block(rest.rstrip(b"\n"))]
        return []


def _parse_block(block: bytes) -> RawEvent:
    data_lines: list[bytes] = []
    event: str | None = None
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data_lines.append(value)
        elif field == b"event":
            event = value.decode("utf-8", "replace")
    data = b"\n".join(data_lines) if data_lines else None
    return RawEvent(raw=block + b"\n\n", data=data, event=event)


def encode_data(payload: bytes) -> bytes:
    """One SSE event carrying ``payload`` as its data."""
    return b"data: " + payload + b"\n\n"


def encode_json(obj: object) -> bytes:
    return encode_data(orjson.dumps(obj))


DONE_EVENT = encode_data(DONE)
