"""Structure-aware chunking: heading paths, whole tables and code, offsets, front matter, source."""

from __future__ import annotations

from llm_warden.plugins.retrieval.chunking import approx_tokens, chunk_text, kind_for, parse_front_matter

DOC = """---
title: Handbook
acl:
  allow_groups: [staff]
---
# Handbook

Welcome to the company.

## Benefits

### Vacation

Employees get 25 days.

| plan | days | carry over |
|------|------|------------|
| basic | 25 | 5 |
| senior | 30 | 10 |
| exec | 35 | 15 |

### Tools

```python
def setup():

    return "ok"
```

## Security

Lock your laptop.
"""


def test_markdown_heading_paths_offsets_and_front_matter() -> None:
    fm = parse_front_matter(DOC)
    assert fm.data == {"title": "Handbook", "acl": {"allow_groups": ["staff"]}}
    chunks = chunk_text(DOC, "markdown", 200, fm.body_start)
    paths = [c.heading_path for c in chunks]
    assert paths == [("Handbook",), ("Handbook", "Benefits", "Vacation"), ("Handbook", "Benefits", "Tools"), ("Handbook", "Security")]
    for c in chunks:
        assert DOC[c.start : c.end] == c.text
        assert "allow_groups" not in c.text
    assert "| exec | 35 | 15 |" in chunks[1].text and "Employees get 25 days." in chunks[1].text


def test_table_split_repeats_header_and_code_stays_whole() -> None:
    fm = parse_front_matter(DOC)
    chunks = chunk_text(DOC, "markdown", 22, fm.body_start)
    tables = [c for c in chunks if c.kind == "table"]
    assert len(tables) >= 2
    for t in tables:
        lines = t.text.splitlines()
        assert lines[0].startswith("| plan | days") and set(lines[1]) <= set("|- ")
    rows = [line for t in tables for line in t.text.splitlines()[2:]]
    assert rows == ["| basic | 25 | 5 |", "| senior | 30 | 10 |", "| exec | 35 | 15 |"]
    code = [c for c in chunks if c.kind == "code"]
    assert len(code) == 1 and code[0].text.startswith("```python") and code[0].text.endswith("```")
    assert 'return "ok"' in code[0].text


def test_long_paragraph_is_split_within_budget_at_sentences() -> None:
    text = " ".join(f"Sentence number {i} talks about things." for i in range(60))
    chunks = chunk_text(text, "text", 40, 0)
    assert len(chunks) > 1
    assert all(c.tokens <= 40 for c in chunks)
    assert all(c.text.endswith(".") for c in chunks)
    assert "".join(c.text for c in chunks).replace(" ", "") == text.replace(" ", "")


def test_python_source_by_top_level_definitions() -> None:
    src = "import os\n\n\n# helper\ndef a():\n    return 1\n\n\n@dec\nclass B:\n    x = 1\n"
    chunks = chunk_text(src, "python", 12, 0)
    assert [c.heading_path for c in chunks] == [(), ("def a",), ("class B",)]
    assert chunks[1].text.startswith("# helper") and chunks[2].text.startswith("@dec")
    assert chunk_text("def broken(:\n  pass\n\nx = 1\n", "python", 100, 0)[0].kind == "source"


def test_kinds_tokens_and_bad_front_matter() -> None:
    assert kind_for("a/b/README.md") == "markdown" and kind_for("x.py") == "python" and kind_for("x.go") == "source" and kind_for("notes") == "text"
    assert approx_tokens("hello world") == 2 and approx_tokens("a, b.") == 4 and approx_tokens("x" * 25) == 3
    fm = parse_front_matter("---\nacl: [unclosed\n---\nbody")
    assert fm.error and fm.body_start == len("---\nacl: [unclosed\n---\n")
    assert parse_front_matter("+++\ntitle = 'T'\n+++\nbody").data == {"title": "T"}
    assert parse_front_matter("no front matter").body_start == 0


def test_a_code_block_over_budget_is_split_between_lines_and_fenced_again() -> None:
    body = "\n".join(f"    result_{i} = compute(alpha={i}, beta={i * 2})" for i in range(40))
    text = f"# Code\n\nIntro.\n\n```python\n{body}\n```\n\nAfter.\n"
    chunks = [c for c in chunk_text(text, "markdown", 60) if c.kind == "code"]
    assert len(chunks) > 2
    assert all(c.tokens <= 60 for c in chunks)
    assert all(c.text.startswith("```python\n") and c.text.endswith("\n```") for c in chunks)
    inner = [line for c in chunks for line in c.text.splitlines()[1:-1]]
    assert inner == body.splitlines()
    assert chunks[0].start == text.index("```python") and chunks[-1].end == text.index("```\n\nAfter") + 3
    small = [c for c in chunk_text(text, "markdown", 2000) if c.kind == "code" or "```" in c.text]
    assert len(small) == 1 and small[0].text.count("```") == 2
