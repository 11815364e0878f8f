"""What the output guard looks for in an answer, and how much of a stream it must hold back.

Two rules, applied to answer text:

- ``outputguard.image_host`` / ``outputguard.link_host``: a URL the client
  would fetch or follow — markdown images and links, reference definitions,
  autolinks ``<https://…>``, HTML ``src`` / ``href`` attributes, bare
  ``http(s)://`` URLs — must be relative, a fragment, or ``http(s)`` to an
  allowed host.  Anything else (another host, ``javascript:``, ``data:``,
  protocol-relative ``//host``) is neutralised: an image becomes
  ``[image removed]``, a link keeps its text and loses its target, a bare
  URL becomes ``[link removed]``.  Markdown images are fetched by the
  user's client without a click, which is why an answer is the last
  exfiltration channel.
- ``outputguard.context_echo``: a configured canary, or a secret-shaped string
  (the audit redactor's secret rules, plus configured patterns) that appeared
  in injected context — retrieved documents, tool results — and not in what
  the application or the user wrote, is replaced by ``[withheld]``.

:class:`StreamGuard` applies the same rules to a stream: it emits the longest
prefix of the text so far in which no construct can still change (an open
``[``/``![``/``<``, a trailing word that may be a URL, a suffix that may be the
start of a secret) and holds back only the rest, up to ``max_hold_chars``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from llm_warden.proxy.audit.redact import SECRET_RULES

IMAGE_RULE = "outputguard.image_host"
LINK_RULE = "outputguard.link_host"
ECHO_RULE = "outputguard.context_echo"
WITHHELD = "[withheld]"

# Every repetition is bounded by a character the construct cannot contain ("[", "(", a quote, a newline) or by a
# length, so a hostile answer ("[[[[…", "![a](![a](…") is scanned in linear time.  A target with "(" is not
# taken as a link target: its URL is still found by the bare-URL rule, and "javascript:" by its own.
_TARGET = r"<?(?P<{n}>[^\s()<>]{{1,4096}})>?(?:\s+(?:\"[^\"\n]{{0,256}}\"|'[^'\n]{{0,256}}'|\([^()\n]{{0,256}}\)))?\s*"
_CONSTRUCTS = re.compile(
    r"!\[(?P<img_alt>[^\[\]\n]{0,1024})\]\(\s*" + _TARGET.format(n="img_url") + r"\)"
    r"|\[(?P<link_text>[^\[\]\n]{0,1024})\]\(\s*" + _TARGET.format(n="link_url") + r"\)"
    r"|^(?P<ref_head>[ \t]{0,3}\[[^\[\]\n]{1,1024}\]:[ \t]*)<?(?P<ref_url>[^\s<>]{1,4096})>?"
    r"|<(?P<auto_url>[A-Za-z][A-Za-z0-9+.-]{1,31}:[^\s<>]{0,4096})>"
    r"|(?P<attr_head>\b(?:src|href|srcset|poster|background|action|formaction|data)\s{0,16}=\s{0,16}[\"']?)(?P<attr_url>[^\"'\s>]{1,4096})"
    r"|(?P<script_url>\b(?:javascript|vbscript):)"
    r"|(?P<bare_url>(?:https?|ftp|wss?)://[^\s<>\"'`]+)",
    re.IGNORECASE | re.MULTILINE,
)
_TRAILING_PUNCT = ".,;:!?*_~'\")]}"


@dataclass(frozen=True, slots=True)
class Intervention:
    rule: str
    what: str
    """``image``, ``link``, ``url``, ``attribute``, ``reference``, ``canary`` or ``secret``."""
    host: str | None = None


class HostPolicy:
    """The allow-list of hosts (exact names or ``*.example.com`` patterns)."""

    def __init__(self, hosts: Iterable[str]) -> None:
        self.exact = {h.lower().rstrip(".") for h in hosts if not h.startswith("*.")}
        self.patterns = [h.lower() for h in hosts if h.startswith("*.")]

    def verdict(self, url: str) -> tuple[bool, str | None]:
        """(allowed, host): relative URLs and fragments are allowed; absolute ones need http(s) and an allowed host."""
        u = url.strip()
        low = u.lower()
        if not u or u.startswith("#") or (u.startswith("/") and not u.startswith("//")) or u.startswith(("./", "../", "?")):
            return True, None
        if not low.startswith("//") and not re.match(r"^[a-z][a-z0-9+.-]*:", low):
            return True, None  # a relative path ("docs/x.md")
        try:
            parts = urlsplit(u if not u.startswith("//") else "https:" + u)
            host = (parts.hostname or "").rstrip(".")
        except ValueError:
            return False, None
        if u.startswith("//") or parts.scheme.lower() not in ("http", "https") or not host:
            return False, host or None
        if host in self.exact or any(fnmatch.fnmatchcase(host, p) for p in self.patterns):
            return True, host
        return False, host


def _url_end(url: str) -> str:
    """A bare URL without the sentence punctuation after it."""
    while url and url[-1] in _TRAILING_PUNCT:
        url = url[:-1]
    return url


@dataclass(slots=True)
class Guard:
    """The rules for one exchange: the host allow-list and the strings never to echo."""

    hosts: HostPolicy
    never_echo: list[str] = field(default_factory=list)
    """Canaries and secrets seen only in injected context, longest first."""

    def apply(self, text: str, found: list[Intervention], line_start: bool = True) -> str:
        """``text`` with every intervention made (and appended to ``found``).

        ``line_start`` false: ``text`` continues a line (a stream's next piece),
        so a reference definition cannot start at its beginning.
        """
        for s in self.never_echo:
            if s in text:
                found.extend(Intervention(ECHO_RULE, "secret") for _ in range(text.count(s)))
                text = text.replace(s, WITHHELD)
        if line_start:
            return _CONSTRUCTS.sub(lambda m: self._construct(m, found), text)
        return _CONSTRUCTS.sub(lambda m: self._construct(m, found), "\x00" + text)[1:]

    def _construct(self, m: re.Match[str], found: list[Intervention]) -> str:
        """One matched construct: as it is when its URL is allowed, else neutralised (and recorded)."""
        g = m.groupdict()
        kind = next(k for k in ("img_url", "link_url", "ref_url", "auto_url", "attr_url", "script_url", "bare_url") if g[k] is not None)
        url = g[kind] if kind != "bare_url" else _url_end(g[kind])
        ok, host = self.hosts.verdict(url)
        if ok:
            return m.group(0)
        if kind == "img_url":
            found.append(Intervention(IMAGE_RULE, "image", host))
            return "[image removed]"
        if kind == "link_url":
            found.append(Intervention(LINK_RULE, "link", host))
            return _CONSTRUCTS.sub(lambda inner: self._construct(inner, found), g["link_text"])
        if kind == "ref_url":
            found.append(Intervention(LINK_RULE, "reference", host))
            return g["ref_head"] + "#"
        if kind == "attr_url":
            is_img = m.group(0).lower().startswith(("src", "srcset", "poster", "background"))
            found.append(Intervention(IMAGE_RULE if is_img else LINK_RULE, "attribute", host))
            return g["attr_head"] + "#"
        found.append(Intervention(LINK_RULE, "url", host))
        return "[link removed]" + (g[kind][len(url) :] if kind == "bare_url" else "")


def secrets_in(text: str, extra: list[re.Pattern[str]]) -> set[str]:
    """Secret-shaped strings in ``text``: the audit redactor's secret rules and ``extra`` patterns."""
    out: set[str] = set()
    if not text:
        return out
    low = text.lower()
    same_len = len(low) == len(text)
    for rule in SECRET_RULES:
        if not rule.precheck(text, low):
            continue
        if rule.on_lower and not same_len:
            continue
        for m in rule.pattern.finditer(low if rule.on_lower else text):
            span = m.span("secret") if "secret" in rule.pattern.groupindex and m.group("secret") is not None else m.span()
            value = text[span[0] : span[1]]
            if rule.validate is not None and not rule.validate(value):
                continue
            if len(value) >= 8:
                out.add(value)
    for p in extra:
        for m in p.finditer(text):
            value = m.group("secret") if "secret" in p.groupindex and m.group("secret") is not None else m.group(0)
            if len(value) >= 4:
                out.add(value)
    return out


_OPENERS = re.compile(r"^[ \t]{0,3}\[[^\[\]\n]+\]:[ \t]*\S*\Z|!?\[[^\[\]\n]*(?:\](?:\([^()\n]*)?)?\Z|<[^<>\n]*\Z|!\Z", re.MULTILINE)


_SCHEMES = ("https://", "http://", "ftp://", "wss://", "ws://")


def _may_be_url(word: str) -> bool:
    """Whether a trailing word may be (or become) a URL or an attribute that holds one."""
    w = word.lower()
    if any(c in w for c in ":/="):
        return True
    return any(p.startswith(w[-k:]) for p in _SCHEMES for k in range(1, min(len(w), len(p)) + 1))


class StreamGuard:
    """The guard over one choice's streamed text: feed deltas, get what may be relayed now."""

    def __init__(self, guard: Guard, max_hold_chars: int) -> None:
        self.guard = guard
        self.max_hold = max_hold_chars
        self.pending = ""
        self.line_start = True

    def feed(self, delta: str, found: list[Intervention]) -> str:
        text = self.pending + delta
        cut = self._safe_prefix(text)
        if len(text) - cut > self.max_hold:
            # Whatever this cut splits is still checked on both sides: a URL cut short is a bare URL, and so is its rest.
            cut = len(text) - self.max_hold
        self.pending = text[cut:]
        return self._emit(text[:cut], found)

    def flush(self, found: list[Intervention]) -> str:
        text, self.pending = self.pending, ""
        return self._emit(text, found)

    def _emit(self, text: str, found: list[Intervention]) -> str:
        if not text:
            return ""
        out = self.guard.apply(text, found, self.line_start)
        self.line_start = text.endswith("\n")
        return out

    def _safe_prefix(self, text: str) -> int:
        cut = len(text)
        m = _OPENERS.search(text[-self.max_hold :])
        if m is not None:
            cut = min(cut, len(text) - len(text[-self.max_hold :]) + m.start())
        word = re.search(r"\S*\Z", text)
        if word is not None and word.group(0) and _may_be_url(word.group(0)):
            cut = min(cut, word.start())
        for s in self.guard.never_echo:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    cut = min(cut, len(text) - k)
                    break
            i = text.find(s, max(0, cut - len(s) + 1))
            if i != -1 and i < cut < i + len(s):
                cut = i
        return cut
