"""Every secret value Warden holds, so logs and the audit log can remove it by value.

Pattern rules catch secrets by their shape (``sk-...``, JWTs, ``Bearer``);
a secret Warden itself holds can have any shape, so its value is removed
wherever it appears: a prompt that pastes the admin token, an answer that
repeats the HS256 secret, an error text holding a Redis URL.
:func:`secret_values` collects those values from a loaded
:class:`~proxy.config.Config`; the log scrubber (:func:`proxy.logs.add_secrets`)
and the audit redactor (rule ``secret_value``, see
:mod:`proxy.audit.redact`) are fed from it.

The convention, applied alike to every core section and every plugin section
(found generically: the core never names a plugin), and to the dataclasses,
lists and tables nested in them:

1. A string field whose name ends in ``_env`` names an environment variable
   holding a secret (``[upstream] api_key_env``, ``[auth] hs256_secret_env``,
   ``[admin] token_env``, ``[audit] signing_key_env``, ``[tracing]
   headers_env``, a plugin's ``embedding_api_key_env``): the variable's value
   is a secret.
2. A string (a field's value, or such a variable's value) that is a URL with
   a password (``redis://:pw@host:6379/0``, ``postgresql://app:pw@db/x``):
   the password is a secret, as written and percent-decoded.
3. A section (or any object nested in one) may define
   ``secret_values(self) -> Iterable[str]`` for any other secret it resolves
   (a value in another syntax, a key read from a file).

A value shorter than :data:`MIN_SECRET_CHARS` is not registered (it would
redact ordinary words); a warning names its key instead, never the value.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from llm_warden.proxy.config import Config

log = logging.getLogger("warden.secrets")

MIN_SECRET_CHARS = 8
"""Shortest value redacted by value, in the logs and the audit log alike."""

_MAX_DEPTH = 8


@dataclasses.dataclass(frozen=True)
class Secret:
    """One secret value and the config key it came from (for warnings; the value is never logged)."""

    key: str
    value: str


def url_passwords(text: str) -> list[str]:
    """The password of ``text`` if it is a URL holding one: as written and, when different, percent-decoded."""
    if "://" not in text or "@" not in text:
        return []
    try:
        password = urlsplit(text.strip()).password
    except ValueError:
        return []
    if not password:
        return []
    decoded = unquote(password)
    return [password] if decoded == password else [password, decoded]


def collect_secrets(cfg: Config) -> list[Secret]:
    """Every secret the configuration resolves (the convention above), short ones included, in config order."""
    from llm_warden.proxy.config import CORE_SECTIONS

    out: list[Secret] = []
    for name in CORE_SECTIONS:
        _walk(getattr(cfg, name), name, out, 0)
    for name, section in cfg.plugin_sections.items():
        _walk(section, name, out, 0)
    return out


def secret_values(cfg: Config) -> list[str]:
    """The distinct secret values to redact by value (at least :data:`MIN_SECRET_CHARS` characters each).

    Shorter ones are left out with a warning naming their key: removing
    ``"abc123"`` from every log line and record would mangle ordinary text,
    and a secret that short is weak anyway.
    """
    values: list[str] = []
    warned: set[str] = set()
    for s in collect_secrets(cfg):
        if len(s.value) < MIN_SECRET_CHARS:
            if s.key not in warned:
                warned.add(s.key)
                log.warning(
                    "the secret from %s is shorter than %d characters: it is not redacted by value from logs and the audit log",
                    s.key,
                    MIN_SECRET_CHARS,
                )
            continue
        if s.value not in values:
            values.append(s.value)
    return values


def _from_string(value: str, key: str, out: list[Secret]) -> None:
    for pw in url_passwords(value):
        out.append(Secret(f"{key} (URL password)", pw))


def _walk(obj: Any, key: str, out: list[Secret], depth: int) -> None:
    if depth > _MAX_DEPTH or obj is None or isinstance(obj, (bool, int, float, bytes)):
        return
    if isinstance(obj, str):
        _from_string(obj, key, out)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _walk(v, f"{key}.{k}", out, depth + 1)
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{key}[{i}]", out, depth + 1)
        return
    extra = getattr(obj, "secret_values", None)
    if callable(extra):
        values: Iterable[Any] = extra() or ()
        for v in values:
            if isinstance(v, str) and v:
                out.append(Secret(f"{key}.secret_values()", v))
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        return
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name, None)
        sub = f"{key}.{f.name}"
        if f.name.endswith("_env") and isinstance(v, str):
            held = os.environ.get(v) if v else None
            if held:
                out.append(Secret(f"{sub} (${v})", held))
                if held.strip() != held and held.strip():
                    out.append(Secret(f"{sub} (${v})", held.strip()))  # a value read from a file keeps its newline
                _from_string(held, f"{sub} (${v})", out)
            continue
        _walk(v, sub, out, depth + 1)
