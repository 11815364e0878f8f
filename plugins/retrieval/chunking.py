"""Structure-aware chunking: Markdown by heading path, source by definitions.

Rules (see ``docs/retrieval.md``):

- Markdown: a chunk never crosses a heading; every chunk keeps the heading
  path (``("Install", "Linux")``).  Fenced code blocks are kept whole, and one
  larger than the budget is split between lines, each part fenced again; tables
  are kept whole, and a table larger than the budget is split by rows with
  the header and delimiter rows repeated in each part.  Prose is packed by
  paragraphs within ``chunk_tokens``; a single paragraph over the budget is
  split at sentence (then word) boundaries.
- Python source: one block per top-level definition (decorators and leading
  comments included), small neighbours packed together.  Other source: blocks
  separated by blank lines.  Plain text: paragraphs.
- Front matter (``---`` YAML or ``+++`` TOML at the very start) is parsed and
  excluded from chunks.

Every chunk carries ``start``/``end`` character offsets into the original text
(front matter included), so a citation points to a place.  For a split table
the repeated header makes ``text`` differ from ``original[start:end]``.

Tokens are counted by the ``count`` function :func:`chunk_text` is given: the
embedder's own tokenizer when it has one (the local embedder's wordpieces), else
:func:`approx_tokens`, which counts every run of ASCII letters or digits as one
token per started 10 characters and every other non-space character as one.  The
estimate is close on plain English but under-counts text dense in technical
terms, which the tokenizer splits into many pieces (see ``docs/retrieval.md``).
``reserve`` gives the tokens the embedder reads besides the chunk text (title,
heading path, special tokens) for a heading path, so each chunk's budget is what
is left of the window.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

Kind = Literal["prose", "table", "code", "source"]
Counter = Callable[[str], int]
"""Tokens of a text (``approx_tokens`` or an embedder's ``count_tokens``)."""

_TOKEN_RE = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")
_ATX_RE = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*#*[ \t]*$")
_FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_TABLE_DELIM_RE = re.compile(r"^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$")
_SETEXT_RE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+")

MARKDOWN_EXTS = frozenset({".md", ".markdown", ".mdown", ".mkd"})
PYTHON_EXTS = frozenset({".py", ".pyi"})
TEXT_EXTS = frozenset({".txt", ".rst", ".text", ""})


def approx_tokens(text: str) -> int:
    """Estimate the token count of ``text`` (see the module docstring)."""
    n = 0
    for m in _TOKEN_RE.finditer(text):
        length = m.end() - m.start()
        n += 1 if length <= 10 else (length + 9) // 10
    return n


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a document, as stored and indexed."""

    n: int
    text: str
    start: int
    end: int
    heading_path: tuple[str, ...]
    tokens: int
    kind: Kind


@dataclass
class FrontMatter:
    """What a front matter block said, and where the body starts."""

    data: dict[str, Any] = field(default_factory=dict)
    body_start: int = 0
    error: str | None = None


def parse_front_matter(text: str) -> FrontMatter:
    """Parse a leading ``---`` (YAML) or ``+++`` (TOML) block.

    A block that does not parse yields ``error`` and is still excluded from
    chunks (its text could be an ACL that must not leak into the index).
    """
    for fence, kind in (("---", "yaml"), ("+++", "toml")):
        if not (text.startswith(fence + "\n") or text.startswith(fence + "\r\n")):
            continue
        first_nl = text.index("\n") + 1
        pattern = re.compile(r"^" + re.escape(fence) + r"[ \t]*\r?$", re.MULTILINE)
        m = pattern.search(text, first_nl)
        if m is None:
            return FrontMatter()
        raw = text[first_nl : m.start()]
        body_start = m.end() + 1 if m.end() < len(text) else m.end()
        try:
            data = yaml.safe_load(raw) if kind == "yaml" else tomllib.loads(raw)
        except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
            return FrontMatter({}, body_start, f"front matter is not valid {kind.upper()}: {e}")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            return FrontMatter({}, body_start, "front matter must be a mapping")
        return FrontMatter(data, body_start)
    return FrontMatter()


@dataclass(slots=True)
class _Block:
    start: int
    end: int
    kind: Kind
    path: tuple[str, ...]
    atomic: bool = False
    header: tuple[int, int] | None = None  # table: span of header + delimiter rows


def _lines(text: str, offset: int) -> list[tuple[int, int, str]]:
    """(start, end_without_newline, line) for each line of text[offset:]."""
    out = []
    pos = offset
    n = len(text)
    while pos < n:
        nl = text.find("\n", pos)
        end = n if nl < 0 else nl
        line = text[pos:end]
        out.append((pos, end, line.rstrip("\r")))
        pos = end + 1
    return out


def _markdown_blocks(text: str, offset: int) -> list[_Block]:
    lines = _lines(text, offset)
    blocks: list[_Block] = []
    path: list[tuple[int, str]] = []
    i = 0
    para_start: int | None = None
    para_end = 0

    def cur() -> tuple[str, ...]:
        return tuple(t for _, t in path)

    def flush() -> None:
        nonlocal para_start
        if para_start is not None:
            blocks.append(_Block(para_start, para_end, "prose", cur()))
            para_start = None

    def set_heading(level: int, title: str) -> None:
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, title.strip() or "(untitled)"))

    while i < len(lines):
        start, end, line = lines[i]
        fence = _FENCE_RE.match(line)
        if fence:
            flush()
            marker = fence.group(1)
            close = re.compile(r"^ {0,3}" + re.escape(marker[0]) + "{" + str(len(marker)) + r",}[ \t]*$")
            j = i + 1
            while j < len(lines) and not close.match(lines[j][2]):
                j += 1
            last = min(j, len(lines) - 1)
            blocks.append(_Block(start, lines[last][1], "code", cur(), atomic=True))
            i = last + 1
            continue
        heading = _ATX_RE.match(line)
        if heading:
            flush()
            set_heading(len(heading.group(1)), heading.group(2) or "")
            i += 1
            continue
        if (
            para_start is not None
            and para_start == lines[i - 1][0]
            and _SETEXT_RE.match(line)
            and "|" not in lines[i - 1][2]
        ):
            title = lines[i - 1][2]
            para_start = None
            set_heading(1 if line.strip().startswith("=") else 2, title)
            i += 1
            continue
        if "|" in line and i + 1 < len(lines) and _TABLE_DELIM_RE.match(lines[i + 1][2]) and "-" in lines[i + 1][2]:
            flush()
            j = i + 2
            while j < len(lines) and lines[j][2].strip() and "|" in lines[j][2]:
                j += 1
            blocks.append(_Block(start, lines[j - 1][1], "table", cur(), atomic=True, header=(start, lines[i + 1][1])))
            i = j
            continue
        if not line.strip():
            flush()
            i += 1
            continue
        if para_start is None:
            para_start = start
        para_end = end
        i += 1
    flush()
    return blocks


def _blank_line_blocks(text: str, offset: int, kind: Kind) -> list[_Block]:
    blocks: list[_Block] = []
    block_start: int | None = None
    block_end = 0
    for start, end, line in _lines(text, offset):
        if line.strip():
            if block_start is None:
                block_start = start
            block_end = end
        elif block_start is not None:
            blocks.append(_Block(block_start, block_end, kind, ()))
            block_start = None
    if block_start is not None:
        blocks.append(_Block(block_start, block_end, kind, ()))
    return blocks


def _python_blocks(text: str, offset: int) -> list[_Block]:
    source = text[offset:]
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return _blank_line_blocks(text, offset, "source")
    line_starts = [0]
    for m in re.finditer("\n", source):
        line_starts.append(m.end())
    starts: list[tuple[int, tuple[str, ...], bool]] = []
    for node in tree.body:
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        if isinstance(node, ast.ClassDef):
            label: tuple[str, ...] = (f"class {node.name}",)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            label = (f"def {node.name}",)
        else:
            label = ()
        starts.append((line_starts[first - 1], label, bool(label)))
    if not starts:
        return _blank_line_blocks(text, offset, "source")
    # leading comments directly above a definition belong to it
    adjusted: list[tuple[int, tuple[str, ...], bool]] = []
    for pos, label, is_def in starts:
        while is_def and pos > 0:
            prev_end = pos - 1
            prev_start = source.rfind("\n", 0, prev_end) + 1
            prev_line = source[prev_start:prev_end].strip()
            if prev_line.startswith("#"):
                pos = prev_start
            else:
                break
        adjusted.append((pos, label, is_def))
    adjusted[0] = (0, adjusted[0][1], adjusted[0][2])
    blocks: list[_Block] = []
    for idx, (pos, label, is_def) in enumerate(adjusted):
        end = adjusted[idx + 1][0] if idx + 1 < len(adjusted) else len(source)
        seg = source[pos:end]
        stripped_end = pos + len(seg.rstrip())
        if stripped_end <= pos:
            continue
        blocks.append(_Block(offset + pos, offset + stripped_end, "source", label, atomic=is_def))
    return blocks


def _split_long(text: str, start: int, end: int, budget: int, count: Counter) -> list[tuple[int, int]]:
    """Split text[start:end] at sentence, then word boundaries into spans within budget."""
    pieces: list[tuple[int, int]] = []
    seg = text[start:end]
    bounds = [0] + [m.end() for m in _SENTENCE_RE.finditer(seg)] + [len(seg)]
    units: list[tuple[int, int]] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        if a >= b:
            continue
        if count(seg[a:b]) <= budget:
            units.append((a, b))
            continue
        words = [m.span() for m in re.finditer(r"\S+\s*", seg[a:b])]
        w0 = 0
        while w0 < len(words):
            w1 = w0 + 1
            while w1 < len(words) and count(seg[a + words[w0][0] : a + words[w1][1]]) <= budget:
                w1 += 1
            units.append((a + words[w0][0], a + words[w1 - 1][1]))
            w0 = w1
    cur_a: int | None = None
    cur_b = 0
    for a, b in units:
        if cur_a is not None and count(seg[cur_a:b]) <= budget:
            cur_b = b
            continue
        if cur_a is not None:
            pieces.append((cur_a, cur_b))
        cur_a, cur_b = a, b
    if cur_a is not None:
        pieces.append((cur_a, cur_b))
    return [(start + a, start + len(seg[a:b].rstrip()) + a) for a, b in pieces]


def _split_table(text: str, block: _Block, budget: int, count: Counter) -> list[tuple[str, int, int]]:
    assert block.header is not None
    header = text[block.header[0] : block.header[1]]
    rows = _lines(text[: block.end], block.header[1] + 1)
    parts: list[tuple[str, int, int]] = []
    cur_rows: list[tuple[int, int, str]] = []
    header_tokens = count(header)
    used = header_tokens
    for row in rows:
        t = count(row[2])
        if cur_rows and used + t > budget:
            parts.append((header + "\n" + "\n".join(r[2] for r in cur_rows), cur_rows[0][0], cur_rows[-1][1]))
            cur_rows, used = [], header_tokens
        cur_rows.append(row)
        used += t
    if cur_rows:
        parts.append((header + "\n" + "\n".join(r[2] for r in cur_rows), cur_rows[0][0], cur_rows[-1][1]))
    if parts:
        first_text, _, first_end = parts[0]
        parts[0] = (first_text, block.start, first_end)
    return parts


def _split_code(text: str, block: _Block, budget: int, count: Counter) -> list[tuple[str, int, int]]:
    """A fenced code block over budget, split between lines; each part is fenced again so it reads as code.

    A single line longer than the budget is split at words like prose.
    """
    lines = _lines(text[: block.end], block.start)
    opening = lines[0][2]
    closed = len(lines) > 1 and _FENCE_RE.match(lines[-1][2]) is not None
    closing = lines[-1][2] if closed else opening.strip()[:3]
    inner = lines[1:-1] if closed else lines[1:]
    fence_tokens = count(opening) + count(closing)
    parts: list[tuple[str, int, int]] = []
    cur: list[tuple[int, int, str]] = []
    used = fence_tokens

    def emit() -> None:
        if cur:
            parts.append(("\n".join([opening, *(r[2] for r in cur), closing]), cur[0][0], cur[-1][1]))

    for row in inner:
        t = count(row[2])
        if fence_tokens + t > budget:
            emit()
            cur, used = [], fence_tokens
            parts.extend((text[a:b], a, b) for a, b in _split_long(text, row[0], row[1], budget, count))
            continue
        if cur and used + t > budget:
            emit()
            cur, used = [], fence_tokens
        cur.append(row)
        used += t
    emit()
    if parts:
        parts[0] = (parts[0][0], block.start, parts[0][2])
        parts[-1] = (parts[-1][0], parts[-1][1], block.end)
    return parts


def _pack(text: str, blocks: list[_Block], budget_for: Callable[[tuple[str, ...]], int], count: Counter) -> list[Chunk]:
    chunks: list[Chunk] = []
    group: list[_Block] = []
    group_tokens = 0

    def emit(body: str, start: int, end: int, path: tuple[str, ...], kind: Kind) -> None:
        if body.strip():
            chunks.append(Chunk(len(chunks), body, start, end, path, count(body), kind))

    def flush() -> None:
        nonlocal group, group_tokens
        if group:
            kinds = {b.kind for b in group}
            kind: Kind = group[0].kind if len(kinds) == 1 else "prose"
            emit(text[group[0].start : group[-1].end], group[0].start, group[-1].end, group[0].path, kind)
        group, group_tokens = [], 0

    for block in blocks:
        body = text[block.start : block.end]
        budget = budget_for(block.path)
        tokens = count(body)
        if group and (block.path != group[0].path or group_tokens + tokens > budget):
            flush()
        if tokens > budget:
            flush()
            if block.kind == "table" and block.header is not None:
                for part, a, b in _split_table(text, block, budget, count):
                    emit(part, a, b, block.path, "table")
            elif block.kind == "source" and block.atomic:
                inner = [_Block(b.start, b.end, "source", block.path) for b in _blank_line_blocks(text[: block.end], block.start, "source")]
                for sub in _pack(text, inner, budget_for, count):
                    emit(sub.text, sub.start, sub.end, block.path, "source")
            elif block.kind == "code":
                for part, a, b in _split_code(text, block, budget, count):
                    emit(part, a, b, block.path, "code")
            elif block.atomic:
                emit(body, block.start, block.end, block.path, block.kind)
            else:
                for a, b in _split_long(text, block.start, block.end, budget, count):
                    emit(text[a:b], a, b, block.path, block.kind)
            continue
        group.append(block)
        group_tokens += tokens
    flush()
    return chunks


def kind_for(name: str) -> Literal["markdown", "python", "source", "text"]:
    """The chunker for a file name (by extension)."""
    dot = name.rfind(".")
    ext = name[dot:].lower() if dot > name.rfind("/") else ""
    if ext in MARKDOWN_EXTS:
        return "markdown"
    if ext in PYTHON_EXTS:
        return "python"
    if ext in TEXT_EXTS:
        return "text"
    return "source"


def chunk_text(
    text: str,
    kind: Literal["markdown", "python", "source", "text"],
    chunk_tokens: int,
    body_start: int = 0,
    *,
    count: Counter = approx_tokens,
    window: int | None = None,
    reserve: Callable[[tuple[str, ...]], int] | None = None,
) -> list[Chunk]:
    """Split ``text`` (from ``body_start``, i.e. after front matter) into chunks.

    A chunk's budget is ``chunk_tokens``, and at most ``window - reserve(heading_path)``
    when a window is given: what the embedder reads besides the chunk text comes out of
    its window.  Tokens are counted with ``count``.  A budget is never below a quarter
    of ``chunk_tokens`` (a title that fills the window still leaves the chunk some text).
    """
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be positive")
    floor = max(1, chunk_tokens // 4)

    def budget_for(path: tuple[str, ...]) -> int:
        if window is None:
            return chunk_tokens
        return max(floor, min(chunk_tokens, window - (reserve(path) if reserve is not None else 0)))

    if kind == "markdown":
        blocks = _markdown_blocks(text, body_start)
    elif kind == "python":
        blocks = _python_blocks(text, body_start)
    elif kind == "source":
        blocks = _blank_line_blocks(text, body_start, "source")
    else:
        blocks = _blank_line_blocks(text, body_start, "prose")
    return _pack(text, blocks, budget_for, count)
