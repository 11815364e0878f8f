"""The ``outputguard`` plugin: the answer is the last exfiltration channel.

An injected instruction (in a retrieved document, in a tool result) that gets
past the model's restraint still has to leave through the answer: a markdown
image whose URL carries context data is fetched by the user's client without
a click; a link or a bare URL waits for one; a secret or canary repeated in
the answer is read by whoever reads the answer.  This plugin checks every
answer — non-streamed (``on_response``) and streamed (``on_stream_event``,
holding back only a tail that may still become a link or a secret) — in the
internal chat shape, so every protocol gets it.  See :mod:`plugins.outputguard.scan`
for the rules.

Mode per tenant (``[outputguard] mode``, ``tenants``): ``off``; ``report``
records what it would change and changes nothing; ``enforce`` changes the
answer.  Every intervention is recorded with its rule in the exchange's audit
record (``plugins.outputguard``).  Its place in ``[plugins] enabled`` does not
matter: it reads the injected context from the body as sent upstream, when
the answer comes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from llm_warden.plugins.outputguard.scan import Guard, HostPolicy, Intervention, StreamGuard, secrets_in
from llm_warden.proxy.content import content_text
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.exchange import Exchange, StateKey
from llm_warden.proxy.plugin import Plugin, StreamEvent

Mode = Literal["off", "report", "enforce"]
MAX_RECORDED = 50
_HOST = re.compile(r"^(?:\*\.)?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")


@dataclass
class OutputGuardConfig:
    """``[outputguard]``."""

    mode: Mode = "enforce"
    """``off`` | ``report`` (record only) | ``enforce`` — for every tenant not in ``tenants``."""
    tenants: dict[str, Mode] = field(default_factory=dict)
    """Mode per tenant, overriding ``mode``."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Hosts links and images may point to (``docs.example.com``, ``*.example.com``); empty: none."""
    canaries: list[str] = field(default_factory=list)
    """Strings never echoed in an answer (planted in documents to detect leaks)."""
    secret_patterns: list[str] = field(default_factory=list)
    """Extra regexes of secrets (a ``secret`` group, when present, is the secret); the audit redactor's secret rules always apply."""
    max_hold_chars: int = 2048
    """The most text held back in a stream while a construct may still change."""

    def validate(self, key: str) -> None:
        for i, h in enumerate(self.allowed_hosts):
            if not _HOST.match(h.lower()):
                raise ConfigError(f"{key}.allowed_hosts[{i}]", f"{h!r} is not a host name or *.domain pattern")
        for i, c in enumerate(self.canaries):
            if len(c) < 4:
                raise ConfigError(f"{key}.canaries[{i}]", "a canary must be at least 4 characters")
        for i, p in enumerate(self.secret_patterns):
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"{key}.secret_patterns[{i}]", f"not a valid regular expression: {e}") from None
        if not 64 <= self.max_hold_chars <= 65536:
            raise ConfigError(f"{key}.max_hold_chars", "must be between 64 and 65536")


@dataclass(slots=True)
class _State:
    mode: Mode
    guard: Guard | None = None
    streams: dict[int, StreamGuard] = field(default_factory=dict)
    found: list[Intervention] = field(default_factory=list)
    dropped_chars: int = 0
    """Held-back stream text never relayed (the stream ended in tool calls or was cut)."""


STATE = StateKey("outputguard", _State)


class OutputGuardPlugin(Plugin):
    """Neutralises links and images to hosts outside the allow-list and secrets echoed from injected context."""

    name = "outputguard"
    config_section = "outputguard"
    config_type = OutputGuardConfig

    section: OutputGuardConfig

    def __init__(self, section: OutputGuardConfig) -> None:
        super().__init__(section)
        self._compile(section)

    def _compile(self, section: OutputGuardConfig) -> None:
        self.hosts = HostPolicy(section.allowed_hosts)
        self.patterns = [re.compile(p) for p in section.secret_patterns]

    async def reload(self, section: Any, **extra_sections: Any) -> None:
        self._compile(section)
        self.section = section

    def _state(self, ex: Exchange) -> _State | None:
        st = ex.slots.get(STATE)
        if st is None:
            tenant = ex.principal.tenant if ex.principal is not None else ""
            mode = self.section.tenants.get(tenant, self.section.mode)
            st = ex.slots.setdefault(STATE, lambda: _State(mode))
        if st.mode == "off":
            return None
        if st.guard is None:
            st.guard = Guard(self.hosts, self._never_echo(ex))
        return st

    def _never_echo(self, ex: Exchange) -> list[str]:
        """Canaries, and the secrets of injected context (retrieved context, tool results) the caller did not write."""
        client = (ex.client_body or {}).get("messages") or []
        sent = (ex.body or {}).get("messages") or []
        own = [m for m in client if isinstance(m, dict) and m.get("role") in ("system", "developer", "user")]
        injected = [m for m in sent if isinstance(m, dict) and (m.get("role") == "tool" or m not in client)]
        injected += [m for m in client if isinstance(m, dict) and m.get("role") == "tool"]
        own_text = "\n".join(content_text(m.get("content")) for m in own)
        found = secrets_in("\n".join(content_text(m.get("content")) for m in injected), self.patterns)
        never = {s for s in found if s not in own_text} | set(self.section.canaries)
        return sorted(never, key=len, reverse=True)

    async def on_response(self, ex: Exchange) -> None:
        """Guard a whole answer (``choices[].message.content``); a stream was guarded event by event."""
        if ex.stream or ex.error is not None:
            return
        body = ex.response_body
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            return
        st = self._state(ex)
        if st is None or st.guard is None:
            return
        choices: list[Any] = []
        changed = False
        for ch in body["choices"]:
            msg = ch.get("message") if isinstance(ch, dict) else None
            if isinstance(msg, dict) and isinstance(msg.get("content"), str):
                new = st.guard.apply(msg["content"], st.found)
                if new != msg["content"] and st.mode == "enforce":
                    ch = {**ch, "message": {**msg, "content": new}}
                    changed = True
            choices.append(ch)
        if changed:
            # A new body: the provider's own answer stays on its turn, as the record shows it.
            ex.response_body = {**body, "choices": choices}
            ex.response_modified = True

    async def on_stream_event(self, ex: Exchange, event: StreamEvent) -> None:
        """Relay what can no longer become a forbidden link or a secret; hold the rest until it can be judged."""
        data = event.data
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            return
        st = self._state(ex)
        if st is None or st.guard is None:
            return
        for ch in data["choices"]:
            if not isinstance(ch, dict):
                continue
            idx = ch.get("index", 0) if isinstance(ch.get("index", 0), int) else 0
            delta = ch.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            sg = st.streams.get(idx)
            if sg is None:
                sg = st.streams[idx] = StreamGuard(st.guard, self.section.max_hold_chars)
            out = sg.feed(content, st.found) if isinstance(content, str) else ""
            if ch.get("finish_reason") is not None:
                out += sg.flush(st.found)
            if st.mode == "enforce" and (isinstance(content, str) or out):
                if not isinstance(delta, dict):
                    delta = ch["delta"] = {}
                if out != content:
                    delta["content"] = out
                    event.modified = True

    async def on_complete(self, ex: Exchange) -> None:
        """A stream that ended without a finish event (tool calls, a cut): its held tail was never relayed."""
        st = ex.slots.get(STATE)
        if st is None or st.guard is None:
            return
        for sg in st.streams.values():
            if sg.pending:
                st.dropped_chars += len(sg.pending)
                sg.flush(st.found)

    def audit_fields(self, ex: Exchange) -> dict[str, Any] | None:
        st = ex.slots.get(STATE)
        if st is None or st.mode == "off":
            return None
        rules: dict[str, int] = {}
        for f in st.found:
            rules[f.rule] = rules.get(f.rule, 0) + 1
        return {
            "mode": st.mode,
            "interventions": len(st.found),
            "rules": rules,
            "details": [{"rule": f.rule, "what": f.what, "host": f.host} for f in st.found[:MAX_RECORDED]],
            "enforced": st.mode == "enforce" and bool(st.found),
            "dropped_chars": st.dropped_chars,
        }
