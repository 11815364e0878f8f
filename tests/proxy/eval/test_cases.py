"""The case file schema: what loads, and every mistake refused with the case and key named."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from llm_warden.proxy.eval.cases import CaseError, load_cases, parse_case
from llm_warden.proxy.eval.runner import Progress

BASE: dict[str, Any] = {"id": "c1", "principal": {"tenant": "acme", "user": "alice"}, "messages": [{"role": "user", "content": "hi"}]}


def test_yaml_list_mapping_and_jsonl_load_the_same_case(tmp_path: Path) -> None:
    case = {**BASE, "tags": "golden", "expect": {"cited": "doc-a", "tools_refused": ["refund"], "refusal": {"status": 403}}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump([case]))
    (tmp_path / "b.yml").write_text(yaml.safe_dump({"cases": [case]}))
    (tmp_path / "c.jsonl").write_bytes(orjson.dumps(case) + b"\n\n")
    loaded = [load_cases(tmp_path / n)[0] for n in ("a.yaml", "b.yml", "c.jsonl")]
    assert loaded[0] == loaded[1] == loaded[2]
    c = loaded[0]
    assert c.tags == ("golden",) and c.expect.cited == ("doc-a",) and c.expect.tools_refused[0].name == "refund"
    assert c.expect.refusal is not None and c.expect.refusal.status == 403
    assert parse_case(c.as_dict(), "again") == c  # what export writes loads back
    optional = parse_case({**BASE, "expect": {"refusal": "optional"}}, "x")
    assert optional.expect.refusal is not None and optional.expect.refusal.optional
    assert parse_case(optional.as_dict(), "again") == optional


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"id": "has space"}, "id: required"),
        ({"principal": {"tenant": "acme"}}, "principal.user: required"),
        ({"principal": {"tenant": "acme", "user": "a", "role": "x"}}, "unknown key 'role'"),
        ({"messages": []}, "messages: required"),
        ({"expect": {"cites": ["a"]}}, "unknown key 'cites'"),
        ({"expect": {"answer": {"regex": ["("]}}}, "not a valid regular expression"),
        ({"expect": {"answer": {"json_schema": {"type": 5}}}}, "not a valid JSON Schema"),
        ({"expect": {"refusal": {"status": 200}}}, "refusal.status"),
        ({"expect": {"refusal": "yes"}}, "refusal: must be"),
        ({"expect": {"max_latency_ms": -1}}, "max_latency_ms"),
        ({"expect": {"max_total_tokens": 1.5}}, "max_total_tokens"),
        ({"expect": {"tool_calls": [{"arguments": {}}]}}, "tool_calls[0].name"),
        ({"params": {"messages": []}}, "'messages' is a case key"),
        ({"stream": "yes"}, "stream: must be"),
    ],
)
def test_schema_mistakes_name_the_case_and_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(CaseError, match=None) as ei:
        parse_case({**BASE, **change}, "file[0]")
    assert message in str(ei.value)


def test_file_level_mistakes(tmp_path: Path) -> None:
    (tmp_path / "dup.yaml").write_text(yaml.safe_dump([BASE, BASE]))
    with pytest.raises(CaseError, match="appears twice"):
        load_cases(tmp_path / "dup.yaml")
    (tmp_path / "bad.jsonl").write_text('{"id": "a"\n')
    with pytest.raises(CaseError, match=r"bad.jsonl:1: not valid JSON"):
        load_cases(tmp_path / "bad.jsonl")
    (tmp_path / "scalar.yaml").write_text("hello")
    with pytest.raises(CaseError, match="expected a list"):
        load_cases(tmp_path / "scalar.yaml")
    with pytest.raises(CaseError, match="not found"):
        load_cases(tmp_path / "none.yaml")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_only() -> None:
    tty, pipe = _Tty(), io.StringIO()
    for out in (tty, pipe):
        p = Progress(2, out)
        p.step(True)
        p.step(False)
    assert pipe.getvalue() == ""
    assert tty.getvalue().endswith("] 2/2  failed 1\n") and tty.getvalue().startswith("\r[")
