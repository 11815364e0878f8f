"""The `warden` command line: help on every subcommand, one message per config error, no silent defaults."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_warden.proxy.cli import CONFIG_OPTIONAL, _parsers, build_parser, main


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}


def test_every_subcommand_has_a_description_and_every_option_a_help_string() -> None:
    parser = build_parser()
    seen = 0
    for sub, _ in _parsers(parser):
        seen += 1
        assert sub.description, f"{sub.prog} has no description"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, f"{sub.prog} {action.option_strings or action.dest} has no help"
    assert seen > 25


@pytest.mark.parametrize(("argv", "expected"), [
    (["ingest", "--help"], "files per store transaction and index commit (default: 64)"),
    (["token", "--help"], "seconds until the token expires (default: 3600)"),
    (["demo", "--help"], "data-plane port on 127.0.0.1 (0: any free port) (default: 8080)"),
    (["audit", "search", "--help"], "at most this many records (default: 100)"),
    (["admin", "approvals", "list", "--help"], "which approvals (default: pending)"),
])
def test_help_shows_descriptions_and_defaults(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert expected in text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("argv", [["ingest", "docs", "--tenant", "acme", "--public"], ["serve"], ["search", "q", "--tenant", "a", "--user", "u"],
                                  ["index", "status"], ["check-config"], ["token", "--tenant", "a", "--user", "u"]])
def test_a_command_that_reads_the_config_says_what_to_pass_and_writes_nothing(argv: list[str], tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "llm_warden.proxy.cli", *argv], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert f"warden {argv[0]}: needs the config file: pass --config PATH" in run.stderr and "WARDEN_CONFIG" in run.stderr
    assert run.stdout == "" and list(tmp_path.iterdir()) == []


def test_config_optional_commands_are_the_ones_that_have_another_source() -> None:
    commands = {name for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction) for name in action.choices}
    assert CONFIG_OPTIONAL <= commands
    assert {"serve", "check-config", "token", "ingest", "search", "index"} <= commands - CONFIG_OPTIONAL


def test_warden_config_from_the_environment_is_used(tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text('[server]\nlisten = "127.0.0.1:1"\n')
    run = subprocess.run([sys.executable, "-m", "llm_warden.proxy.cli", "check-config"], cwd=tmp_path, env={**_env(), "WARDEN_CONFIG": str(cfg)},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"{cfg}: ok" in run.stdout


def test_a_config_error_is_printed_once(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server]\nbogus = 1\n")
    for argv in (["check-config"], ["serve"]):
        run = subprocess.run([sys.executable, "-m", "llm_warden.proxy.cli", "--config", str(cfg), *argv], cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2
        assert run.stderr.count("server.bogus") == 1, run.stderr
        assert run.stderr.startswith("warden: config error at 'server.bogus': unknown key")
