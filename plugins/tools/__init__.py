"""Fenced tool calling: registry, strict schemas, least privilege, read-only mode, approvals."""

from llm_warden.plugins.tools.config import PolicyConfig, ToolSpec
from llm_warden.plugins.tools.plugin import ToolsPlugin

__all__ = ["PolicyConfig", "ToolSpec", "ToolsPlugin"]
