"""Versioned tool contracts: how a version is named, offered, deprecated and retired.

A ``[[tools]]`` entry with ``version = 2`` is the contract ``refund@2``.
``refund@2`` is not a valid function name (OpenAI allows letters, digits,
``_`` and ``-``), so the model and the application address the version by its
*function name*: ``refund_v2`` unless the entry sets ``function_name`` (e.g.
``function_name = "refund"`` to keep version 1 under the name it always had).

``deprecated`` is the version's sunset: before it, calls are allowed with a
warning the application (``x-warden-deprecation`` response header) and the
model (a note at the head of the tool's description) can see; from that
moment on the version is withdrawn from requests and its calls are refused
(rule ``tools[i].deprecated``, naming the replacement).  Times are UTC
seconds since the epoch; a plain date means 00:00 UTC that day.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def contract_id(name: str, version: int | None) -> str:
    """``refund@2`` for a versioned entry, ``refund`` for an unversioned one."""
    return name if version is None else f"{name}@{version}"


def default_function_name(name: str, version: int | None) -> str:
    """The function name a version is offered under when ``function_name`` is not set: ``refund_v2``."""
    return name if version is None else f"{name}_v{version}"


@dataclass(frozen=True, slots=True)
class Sunset:
    """The moment a deprecated version stops being callable."""

    at: float
    """UTC seconds since the epoch."""
    text: str
    """As shown to people: ``2027-01-31`` for a date, else ``2027-01-31T18:00:00Z``."""


def parse_sunset(value: Any) -> Sunset:
    """A sunset from config: ``"2027-01-31"``, an RFC 3339 time with its offset, or a TOML date / offset date-time.

    Raises ``ValueError`` for anything else, including a time without an
    offset (a local time would depend on the machine's zone).
    """
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, dt.date):
        return _midnight(value)
    elif isinstance(value, str):
        text = value.strip()
        if _DATE.match(text):
            try:
                return _midnight(dt.date.fromisoformat(text))
            except ValueError:
                raise ValueError(f"{value!r} is not a calendar date") from None
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a date (2027-01-31) or an RFC 3339 time (2027-01-31T18:00:00Z)") from None
    else:
        raise ValueError(f"expected a date such as \"2027-01-31\", got {type(value).__name__}")
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{str(value)!r} has no UTC offset; write it with Z or +hh:mm")
    utc = when.astimezone(dt.UTC)
    return Sunset(utc.timestamp(), utc.strftime("%Y-%m-%dT%H:%M:%SZ"))


def _midnight(day: dt.date) -> Sunset:
    return Sunset(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp(), day.isoformat())


@dataclass(frozen=True, slots=True)
class Deprecation:
    """A deprecated version: its sunset and what replaces it."""

    contract: str
    """``refund@1``."""
    function: str
    """The function name it is called under (``refund_v1``)."""
    tool: str
    """The tool's name without version (``refund``), a metric label."""
    version: str
    """The version as text (``1``; empty when unversioned), a metric label."""
    sunset: Sunset
    replacement: str | None = None
    """The replacing contract (``refund@2``)."""
    replacement_function: str | None = None
    """The function name of the replacement (``refund_v2``)."""

    def retired(self, now: float) -> bool:
        """Whether the sunset has passed at ``now`` (UTC epoch seconds): calls are then refused."""
        return now >= self.sunset.at

    def _instead(self) -> str:
        if self.replacement is None:
            return "it has no replacement"
        return f"use {self.replacement_function!r} ({self.replacement}) instead"

    def model_note(self) -> str:
        """The note put at the head of the tool's description while it is deprecated (the model reads it)."""
        return f"DEPRECATED: this tool ({self.contract}) stops working at {self.sunset.text} UTC; {self._instead()}."

    def refusal(self) -> str:
        """What the model (and the client, in the final error) reads once the sunset passed."""
        return (
            f"tool {self.function!r} ({self.contract}) was retired at {self.sunset.text} UTC and can no longer be called; "
            f"{self._instead()}."
        )

    def header_entry(self, now: float) -> str:
        """One entry of ``x-warden-deprecation``:
        ``refund_v1; contract="refund@1"; sunset="2027-01-31"; replacement="refund_v2"`` (``; retired`` once the sunset passed)."""
        entry = f'{self.function}; contract="{self.contract}"; sunset="{self.sunset.text}"'
        if self.replacement_function is not None:
            entry += f'; replacement="{self.replacement_function}"'
        return entry + "; retired" if self.retired(now) else entry

    def details(self, now: float) -> dict[str, Any]:
        """What the decision (and so the audit record) carries about the deprecation."""
        return {
            "contract": self.contract,
            "sunset": self.sunset.text,
            "retired": self.retired(now),
            "replacement": self.replacement,
            "replacement_function": self.replacement_function,
        }
