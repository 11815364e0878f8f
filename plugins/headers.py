"""Response metadata headers: tell the application what Warden did.

Adds ``x-warden-principal`` (tenant and subject, when configured),
``x-warden-upstream-turns`` and ``x-warden-model`` to every proxied answer,
and static headers from ``[headers] add``.  It is the smallest useful plugin
and keeps the chain exercised when no other plugin is enabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.exchange import Exchange
from llm_warden.proxy.plugin import Plugin

_FORBIDDEN = {"content-length", "content-type", "transfer-encoding", "connection", "x-request-id"}


@dataclass
class HeadersConfig:
    """``[headers]``."""

    add: dict[str, str] = field(default_factory=dict)
    expose_principal: bool = True
    expose_turns: bool = True

    def validate(self, key: str) -> None:
        for name, value in self.add.items():
            if name.lower() in _FORBIDDEN or not name.replace("-", "").isalnum():
                raise ConfigError(f"{key}.add.{name}", "is not an allowed header name")
            if "\r" in value or "\n" in value:
                raise ConfigError(f"{key}.add.{name}", "header values cannot contain line breaks")


class HeadersPlugin(Plugin):
    name = "headers"
    config_section = "headers"
    config_type = HeadersConfig

    section: HeadersConfig

    async def on_request(self, ex: Exchange) -> None:
        ex.response_headers.update(self.section.add)
        if self.section.expose_principal and ex.principal is not None:
            ex.response_headers["x-warden-principal"] = f"{ex.principal.tenant}/{ex.principal.subject}"

    async def on_response(self, ex: Exchange) -> None:
        if self.section.expose_turns:
            ex.response_headers["x-warden-upstream-turns"] = str(len(ex.turns))
        if ex.response_model:
            ex.response_headers["x-warden-model"] = ex.response_model
