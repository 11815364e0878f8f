"""Fenced tool calling: registry, strict schemas, least privilege, read-only mode, approvals."""

from plugins.tools.config import PolicyConfig, ToolSpec
from plugins.tools.plugin import ToolsPlugin

__all__ = ["PolicyConfig", "ToolSpec", "ToolsPlugin"]
