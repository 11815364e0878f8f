"""config.example.toml is the quick start's config: it must load, and document every key with its default."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from llm_warden.proxy.config import CORE_SECTIONS, load_config
from llm_warden.proxy.plugin import available_plugins

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARDEN_DEV_JWT_SECRET", "x" * 40)
    cfg = load_config(EXAMPLE)
    assert cfg.plugins.enabled == ["limits", "retrieval", "tools", "headers"]
    from llm_warden.proxy.auth import Authenticator

    Authenticator(cfg.auth, cfg)


def _sections() -> dict[str, Any]:
    out: dict[str, Any] = dict(CORE_SECTIONS)
    for cls in available_plugins().values():
        if cls.config_section and cls.config_type:
            out[cls.config_section] = cls.config_type
    return out


@pytest.mark.parametrize("section", sorted(_sections()))
def test_every_key_is_documented(section: str) -> None:
    """Every field of every section appears in the example, as a key or a commented key."""
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    tp = _sections()[section]
    assert section in data, f"[{section}] missing from config.example.toml"
    block = text[text.index(f"[{section}]") :]
    hints = typing.get_type_hints(tp)
    for f in dataclasses.fields(tp):
        if f.name == "rules" and section == "limits":
            assert "[[limits.rules]]" in block
            continue
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub):
            # A nested table: its own header, and every key of it documented under that header.
            assert f"[{section}.{f.name}]" in block, f"[{section}.{f.name}] is not documented in config.example.toml"
            table = block[block.index(f"[{section}.{f.name}]") :]
            for g in dataclasses.fields(sub):
                assert re.search(rf"^#?\s*{re.escape(g.name)}\s*=", table, re.M), f"{section}.{f.name}.{g.name} is not documented in config.example.toml"
            continue
        pattern = rf"^#?\s*{re.escape(f.name)}\s*="
        assert re.search(pattern, block, re.M), f"{section}.{f.name} is not documented in config.example.toml"
