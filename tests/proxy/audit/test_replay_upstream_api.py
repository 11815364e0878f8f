"""``warden replay`` sends the recorded (chat-completions) request: over a config whose provider speaks another API it asks for an OpenAI-compatible URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_warden.proxy.cli import main


def test_replay_refuses_a_config_whose_provider_speaks_the_anthropic_api(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "warden.toml"
    cfg.write_text(
        f'[upstream]\nbase_url = "http://127.0.0.1:9/v1"\napi = "anthropic"\n[auth]\nmode = "none"\n[audit]\nenabled = true\npath = "{tmp_path / "audit.db"}"\n'
    )
    assert main(["replay", "req_x", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert 'api = "anthropic"' in err and "--upstream" in err
