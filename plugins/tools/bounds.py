"""Size and nesting bounds of tool-call arguments, checked on the raw text.

A model (or a prompt injection steering it) can emit arguments nested hundreds
of levels deep or megabytes long.  Deep values break recursive code further on
(the schema validator gives up at a few hundred levels, Python's own recursion
limit is 1000), and huge ones cost time in every check.  These functions bound
both *before* anything parses or walks the arguments:

- :func:`utf8_size` counts bytes without building a copy when the character
  count alone already decides;
- :func:`nesting_depth` finds the deepest ``[``/``{`` nesting outside string
  literals with C-level passes only (one regular expression, ``bytes.translate``
  and ``itertools.accumulate``): no Python recursion and no per-character
  Python loop, so hostile depth costs the same as flat text of its length.

The scan never raises, whatever the text: it is exact for valid JSON, and for
invalid text (which fails to parse right after) it still returns a number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import accumulate

#: Upper bound of ``[policy] max_argument_depth``: deep enough for any real
#: tool, shallow enough that the validator (which fails around 255 levels when
#: it renders an error) and the recursive canonical form always stay safe.
MAX_DEPTH_LIMIT = 128

#: Upper bound of ``[policy] max_argument_bytes``: what the core holds of one
#: streamed turn's arguments (``proxy.tooling.MAX_STREAMED_ARGS_BYTES``).
MAX_BYTES_LIMIT = 16 * 1024 * 1024

# A string literal, or an unterminated one up to the end of the text.  Both
# quantifiers are possessive: no backtracking, so every start position is
# scanned once and a run of escaped quotes cannot make the match quadratic.
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"?', re.S)
# Opening brackets become the signed byte +1, closing ones -1 and every other
# byte is deleted: the running sum is the depth.  UTF-8 continuation bytes are
# all >= 0x80, so no multi-byte character can contain a bracket byte.
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[{]}")


def utf8_size(text: str, limit: int) -> int:
    """The UTF-8 size of ``text`` in bytes; only a lower bound (the character count) when that exceeds ``limit``.

    No copy is made for ASCII text or when the count alone decides.  Lone
    surrogates (a JSON ``"\\ud800"`` decoded by the provider's parser) count
    as the three bytes ``surrogatepass`` gives them instead of raising.
    """
    n = len(text)
    if n > limit or text.isascii():
        return n
    return len(text.encode("utf-8", "surrogatepass"))


def nesting_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` outside string literals (0 for a scalar).

    ``{"a": [1, {"b": "[[["}]}`` is 3 deep.  Linear in ``len(text)``.
    """
    if "[" not in text and "{" not in text:
        return 0
    outside = _STRING.sub("", text) if '"' in text else text
    steps = outside.encode("utf-8", "surrogatepass").translate(_STEPS, _NOT_BRACKETS)
    return max(0, max(accumulate(memoryview(steps).cast("b")), default=0))


@dataclass(frozen=True, slots=True)
class BoundsFailure:
    """Why arguments are out of bounds: the rule, the configured limit and what was found."""

    rule: str
    """``tools.argument_bytes`` or ``tools.argument_depth``."""
    limit: int
    actual: int
    """Bytes (at least this many) or nesting levels found."""

    def explain(self, tool: str) -> str:
        """The reason for the model: what is wrong and how to call the tool instead."""
        if self.rule == "tools.argument_bytes":
            return (
                f"the arguments for {tool} are at least {self.actual} bytes long and at most {self.limit} are accepted. "
                f"Call {tool} again with shorter arguments (leave out long text, or split the work into several smaller calls)."
            )
        return (
            f"the arguments for {tool} are nested {self.actual} levels deep and at most {self.limit} levels "
            "(objects and arrays inside one another) are accepted. "
            f"Call {tool} again with flatter arguments that follow the tool's schema."
        )


def bounds_failure(text: str, max_depth: int, max_bytes: int) -> BoundsFailure | None:
    """The first bound ``text`` exceeds (size first, so the depth scan only sees bounded text), else ``None``."""
    size = utf8_size(text, max_bytes)
    if size > max_bytes:
        return BoundsFailure("tools.argument_bytes", max_bytes, size)
    # Fewer brackets than the limit cannot nest deeper than it: skip the scan.
    if text.count("[") + text.count("{") <= max_depth:
        return None
    depth = nesting_depth(text)
    if depth > max_depth:
        return BoundsFailure("tools.argument_depth", max_depth, depth)
    return None
