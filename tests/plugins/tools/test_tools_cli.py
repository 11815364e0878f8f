"""``warden policy test CASES``: the shipped cases pass, a wrong expectation fails (exit 1), an invalid file says where (exit 2)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llm_warden.proxy.cli import main

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE_CASES = ROOT / "docs" / "tools.cases.yaml"
EXAMPLE_POLICY = ROOT / "docs" / "tools.config.toml"

POLICY = """
[policy]
read_only = true

[[tools]]
name = "lookup"
effect = "read"
schema = { type = "object" }

[[tools]]
name = "pay"
version = 2
effect = "write"
rules_default = "deny"
schema = { type = "object", required = ["amount"], properties = { amount = { type = "integer" } } }

[[tools.rules]]
name = "small"
decision = "allow"
when = { properties = { amount = { maximum = 100 } } }
"""


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def write(tmp_path: Path, cases: str, name: str = "cases.yaml", policy: str = POLICY) -> Path:
    (tmp_path / "policy.toml").write_text(policy)
    path = tmp_path / name
    path.write_text(textwrap.dedent(cases))
    return path


def test_the_example_policy_passes_its_cases(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(["policy", "test", str(EXAMPLE_CASES)], capsys)
    assert rc == 0, out + err
    assert out.splitlines()[-1] == "22 cases: 22 passed, 0 failed"
    assert "  ok     17  version 1 is refused from its sunset on, naming refund_v2: deny (tools[1].deprecated)" in out
    assert "[deprecated]" in out and err == ""


def test_the_console_command_runs_the_cases() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llm_warden.proxy", "policy", "test", "--quiet", str(EXAMPLE_CASES)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [f"policy {EXAMPLE_POLICY} (4 tools), cases {EXAMPLE_CASES}", "22 cases: 22 passed, 0 failed"]


def test_a_wrong_expectation_fails_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        """
        policy: policy.toml
        principals:
          ann: {tenant: acme, user: ann}
        cases:
          - {name: small pay, principal: ann, mode: read-write, tool: pay@2, arguments: {amount: 5}, expect: {decision: allow, rule: "tools[1].rules.small"}}
          - {name: big pay, principal: ann, mode: read-write, tool: pay_v2, arguments: {amount: 500}, expect: allow}
          - {name: read-only by default, principal: ann, tool: pay_v2, arguments: {amount: 5}, expect: {decision: deny, rule: policy.read_only}}
          - {name: wrong rule, principal: ann, tool: lookup, expect: {decision: allow, rule: "tools[9]", deprecated: true}}
        """,
    )
    rc, out, err = run(["policy", "test", str(path)], capsys)
    assert rc == 1 and err == ""
    lines = out.splitlines()
    assert lines[1] == "  ok      1  small pay: allow (tools[1].rules.small)"
    assert lines[2] == "  FAIL    2  big pay: expected allow, got deny"
    assert lines[3].startswith("              got deny (tools[1].rules_default): no policy rule allows this call to 'pay_v2'")
    assert lines[4] == "  ok      3  read-only by default: deny (policy.read_only)"
    assert lines[5] == "  FAIL    4  wrong rule: expected rule tools[9], got tools[0]; expected a deprecation warning, got none"
    assert lines[-1] == "4 cases: 2 passed, 2 failed"
    rc, out, _ = run(["policy", "test", "-q", str(path)], capsys)
    assert rc == 1 and "small pay" not in out and "big pay" in out


def test_json_lines_and_an_explicit_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        """\
        {"name": "lookup", "principal": {"tenant": "acme", "user": "u"}, "tool": "lookup", "expect": "allow"}

        {"name": "raw text", "principal": null, "mode": "read-write", "tool": "pay_v2", "arguments": "{\\"amount\\": 5", "expect": "repair"}
        """,
        name="cases.jsonl",
    )
    rc, out, err = run(["policy", "test", "--policy", str(tmp_path / "policy.toml"), str(path)], capsys)
    assert rc == 0, out + err
    assert out.splitlines()[-1] == "2 cases: 2 passed, 0 failed"
    rc, out, err = run(["--config", str(tmp_path / "policy.toml"), "policy", "test", str(path)], capsys)
    assert rc == 0, out + err


@pytest.mark.parametrize(
    ("cases", "message"),
    [
        ("cases: [\n  - {name: a\n", "is not valid YAML at line"),
        ("- just a list\n", "must be a mapping with a 'cases' list"),
        ("policy: policy.toml\ncases: []\n", "'cases' must be a non-empty list"),
        ("policy: policy.toml\nsuites: []\ncases: [1]\n", "unknown top-level key(s) suites"),
        ("policy: policy.toml\ncases: [42]\n", "case 1: a case must be a mapping"),
        ("policy: policy.toml\ncases:\n  - {name: a, principal: null, expect: allow}\n", "case 1 ('a'): 'tool' is missing"),
        ("policy: policy.toml\ncases:\n  - {name: a, tool: lookup, expect: allow}\n", "case 1 ('a'): 'principal' is missing"),
        ("policy: policy.toml\ncases:\n  - {name: a, principal: null, tool: lookup, expect: allow, colour: red}\n", "case 1 ('a'): unknown key(s) colour"),
        (
            "policy: policy.toml\ncases:\n  - {name: a, principal: {tenant: acme, user: u, groups: admins}, tool: lookup, expect: allow}\n",
            "case 1 ('a'): principal.groups must be a list of non-empty strings",
        ),
        ("policy: policy.toml\ncases:\n  - {name: a, principal: {tenant: acme}, tool: lookup, expect: allow}\n", "principal.user must be a non-empty string"),
        ("policy: policy.toml\ncases:\n  - {name: a, principal: {tenant: acme, user: u, role: x}, tool: lookup, expect: allow}\n", "unknown principal key(s) role"),
        ("policy: policy.toml\ncases:\n  - {name: a, principal: root, tool: lookup, expect: allow}\n", "principal 'root' is not among the file's principals"),
        ("policy: policy.toml\ncases:\n  - {name: a, principal: null, tool: lookup, mode: sudo, expect: allow}\n", "mode must be 'read-only' or 'read-write', got 'sudo'"),
        ("policy: policy.toml\ncases:\n  - {name: a, principal: null, tool: lookup, expect: permit}\n", "expect.decision must be one of allow, deny, repair, hold, got 'permit'"),
        ("policy: policy.toml\ncases:\n  - {name: a, principal: null, tool: lookup, expect: {decision: allow, why: x}}\n", "unknown expect key(s) why"),
        ("policy: policy.toml\ncases:\n  - {name: a, principal: null, tool: lookup, expect: {decision: allow, deprecated: maybe}}\n", "expect.deprecated must be true or false"),
        ("policy: policy.toml\ncases:\n  - {name: a, principal: null, tool: lookup, now: tomorrow, expect: allow}\n", "case 1 ('a'): now: 'tomorrow' is not a date"),
        ("policy: policy.toml\ncases:\n  - {name: a, principal: null, tool: lookup, arguments: [1], expect: allow}\n", "arguments must be a mapping, or a string"),
        ("policy: policy.toml\ncases:\n  - {name: a, principal: null, tool: 7, expect: allow}\n", "case 1 ('a'): tool must be a non-empty string"),
        ("policy: policy.toml\ncases:\n  - {name: a, principal: null, tool: pay@9, expect: allow}\n", "case 1 ('a'): tool 'pay@9' is not a contract of the policy (known: lookup, pay@2)"),
        (
            "policy: policy.toml\ncases:\n  - {name: a, principal: null, tool: lookup, expect: allow}\n  - {name: a, principal: null, tool: lookup, expect: allow}\n",
            "case 2 ('a'): the name is already used by case 1",
        ),
        ("policy: policy.toml\ndefaults: {mode: read-only, colour: red}\ncases: [1]\n", "'defaults' must be a mapping of mode, now, principal"),
        ("policy: 5\ncases:\n  - {name: a, principal: null, tool: lookup, expect: allow}\n", "'policy' must be the path of a config file"),
    ],
)
def test_an_invalid_case_file_says_which_case_and_why(tmp_path: Path, capsys: pytest.CaptureFixture[str], cases: str, message: str) -> None:
    path = write(tmp_path, cases)
    rc, out, err = run(["policy", "test", "--policy", str(tmp_path / "policy.toml"), str(path)], capsys)
    assert rc == 2 and out == ""
    assert err.startswith(f"warden policy test: {path}: ")
    assert message in err, err
    assert "Traceback" not in err


def test_an_invalid_json_lines_file_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '{"name": "a", "principal": null, "tool": "lookup", "expect": "allow"}\n{"name": "b",\n', name="c.jsonl")
    rc, _, err = run(["policy", "test", "--policy", str(tmp_path / "policy.toml"), str(path)], capsys)
    assert rc == 2 and "line 2: not valid JSON" in err


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ('[[tools]]\nname = "x"\neffect = "read"\nschema = { type = "object", properties = { a = { type = "strin" } } }\n', "config error at 'tools[0].schema'"),
        ('[[tools]]\nname = "x"\neffect = "read"\nschema = { type = "object" }\n[[tools.rules]]\nname = "r"\ndecision = "deny"\nwhen = { type = 3 }\n', "tools[0].rules[0].when"),
        ("[[tools]\n", "is not valid TOML"),
    ],
)
def test_an_invalid_policy_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str, message: str) -> None:
    path = write(tmp_path, "policy: policy.toml\ncases:\n  - {name: a, principal: null, tool: x, expect: allow}\n", policy=policy)
    rc, out, err = run(["policy", "test", str(path)], capsys)
    assert rc == 2 and out == "" and message in err, err


def test_without_a_policy_it_says_how_to_name_one(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WARDEN_CONFIG", raising=False)
    path = write(tmp_path, "cases:\n  - {name: a, principal: null, tool: x, expect: allow}\n")
    rc, _, err = run(["policy", "test", str(path)], capsys)
    assert rc == 2 and "no policy: pass --policy FILE" in err
    rc, _, err = run(["policy", "test", str(tmp_path / "missing.yaml")], capsys)
    assert rc == 2 and "cannot read" in err and "missing.yaml" in err
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00cases")
    rc, _, err = run(["policy", "test", "--policy", str(tmp_path / "policy.toml"), str(tmp_path / "binary.yaml")], capsys)
    assert rc == 2 and "is not UTF-8 text" in err
