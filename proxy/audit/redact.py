"""Redaction of secrets and PII before anything reaches the audit store.

Three groups of rules, applied in this order to every string of a record:

1. **Secrets** (always, in every ``store_content`` mode): the configured
   upstream key value (rule ``upstream_key``) and every other secret value
   Warden holds (rule ``secret_value``: the admin token, the HS256 secret,
   passwords in URLs... see :mod:`proxy.secrets`), private key blocks, JWTs, bearer tokens, provider keys
   (``sk-...``, including project/service/Anthropic forms), AWS access and
   secret keys, GitHub, Slack, Google and Stripe tokens, credentials in URLs
   and ``password=...``-style assignments.
2. **Custom patterns** (always): ``[audit] redact_patterns`` (name -> regex).
3. **PII** (only in ``store_content = "redacted"``): the kinds listed in
   ``[audit] redact_pii`` — ``email``, ``phone``, ``card`` (Luhn-checked),
   ``ssn``.

A match is replaced by ``[REDACTED:<rule>]``; when a rule has a group named
``secret`` only that group is replaced (``Bearer [REDACTED:bearer]``).  The
rules that fired are counted per name; the values are never kept.

Patterns are compiled once.  Each rule has a cheap pre-check (a literal
substring, a digit, ``@``) so the common string that holds no secret costs a
few substring tests, not a regex scan per rule.  A whole record is first
scanned once for every rule's needles (Hyperscan where it is installed, else
Aho-Corasick automata: the same rules either way), and only the rules whose
needles occur are tried on its strings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from ahocorasick_rs import AhoCorasick, BytesAhoCorasick, Implementation

from llm_warden.proxy.audit.chain import canonical
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.secrets import MIN_SECRET_CHARS

try:
    import hyperscan
except ImportError:  # no wheel for this platform (Linux on ARM has none): the Aho-Corasick automata serve alone
    hyperscan = None  # type: ignore[assignment]

PLACEHOLDER = "[REDACTED:{}]"


def luhn_ok(digits: str) -> bool:
    """True when the digit string passes the Luhn checksum."""
    total = 0
    parity = len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_ok(text: str) -> bool:
    digits = "".join(c for c in text if c.isdigit())
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _phone_ok(text: str) -> bool:
    n = sum(c.isdigit() for c in text)
    return 8 <= n <= 15


@dataclass(frozen=True, slots=True)
class Rule:
    """One redaction rule.

    ``precheck(s, low)`` is a cheap test that must pass before the regex runs;
    ``on_lower`` runs the regex over the lower-cased text (for
    case-insensitive keyword rules, much faster than ``re.I``);
    ``validate`` vets a match (Luhn for cards); ``digits = (lo, hi)`` marks rules
    that only run inside the digit runs (found by one shared scan) holding
    between ``lo`` and ``hi`` digits.
    """

    name: str
    pattern: re.Pattern[str]
    precheck: Callable[[str, str], bool]
    validate: Callable[[str], bool] | None = None
    on_lower: bool = False
    digits: tuple[int, int] | None = None


class _Has:
    """Pre-check: one of ``needles`` occurs (in the lower-cased text if ``lower``).

    ``needles_lower`` feed the record-level Aho-Corasick scan.
    """

    __slots__ = ("needles", "lower", "needles_lower")

    def __init__(self, *needles: str, lower: bool = False) -> None:
        self.needles = needles
        self.lower = lower
        self.needles_lower = tuple(n.lower() for n in needles)

    def __call__(self, s: str, low: str) -> bool:
        hay = low if self.lower else s
        for n in self.needles:
            if n in hay:
                return True
        return False


def _has(*needles: str) -> _Has:
    return _Has(*needles)


def _has_lower(*needles: str) -> _Has:
    return _Has(*needles, lower=True)


def _has_digit(s: str, low: str = "") -> bool:
    return "0" in s or "1" in s or "2" in s or "3" in s or "4" in s or "5" in s or "6" in s or "7" in s or "8" in s or "9" in s


def _always(s: str, low: str) -> bool:
    return True


_TOKEN_WORDS = (
    "access_token",
    "access-token",
    "accesstoken",
    "auth_token",
    "auth-token",
    "authtoken",
    "refresh_token",
    "refresh-token",
    "refreshtoken",
)


def _generic_check(s: str, low: str) -> bool:
    if "=" not in s and ":" not in s:
        return False
    if "secret" in low or "passw" in low or "pwd" in low:
        return True
    if "key" in low and ("apikey" in low or "api_key" in low or "api-key" in low):
        return True
    if "token" in low:
        for n in _TOKEN_WORDS:
            if n in low:
                return True
    return False


class _Generic(_Has):
    __slots__ = ()

    def __call__(self, s: str, low: str) -> bool:
        return _generic_check(s, low)


_generic_pre = _Generic("secret", "passw", "pwd", "apikey", "api_key", "api-key", *_TOKEN_WORDS, lower=True)


JWT_RUN = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{9,}+\.[A-Za-z0-9_-]{6,}+\.[A-Za-z0-9_-]*+(?:\.[A-Za-z0-9_-]*+){0,2}+")
"""Token-shaped runs: every quantifier possessive and a match starts only where a run starts."""


def _is_jwt_run(text: str) -> bool:
    return "eyJ" in text


SECRET_RULES: tuple[Rule, ...] = (
    Rule(
        "private_key",
        re.compile(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----(?:.*?-----END[A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----|.*\Z)", re.S),
        _has("PRIVATE KEY"),
    ),
    # A whole dotted run of base64url segments (so a scan starts once per run, never at every "eyJ" inside one:
    # linear on hostile text), kept when a segment holds a JWT header.
    Rule("jwt", JWT_RUN, _has("eyJ"), _is_jwt_run),
    Rule("bearer", re.compile(r"bearer\s+(?P<secret>[a-z0-9._~+/=-]{8,})"), _has_lower("bearer"), on_lower=True),
    Rule(
        "provider_key",
        re.compile(r"sk-(?<![A-Za-z0-9_]sk-)(?:proj-|svcacct-|admin-|ant-[a-z]{3}\d{2}-|or-v1-)?[A-Za-z0-9_-]{20,}"),
        _has("sk-"),
    ),
    Rule(
        "aws_access_key",
        re.compile(r"(?:AKIA|ASIA|ABIA|ACCA|AROA|AIDA)[A-Z0-9]{16}(?![A-Za-z0-9])"),
        _has("AKIA", "ASIA", "ABIA", "ACCA", "AROA", "AIDA"),
    ),
    Rule(
        "aws_secret_key",
        re.compile(r"aws_?secret_?(?:access_?)?key[\"']?\s*[:=]\s*[\"']?(?P<secret>[a-z0-9/+=]{40})"),
        _has_lower("aws"),
        on_lower=True,
    ),
    Rule(
        "github_token",
        re.compile(r"(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
        _has("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    ),
    Rule("slack_token", re.compile(r"xox[abposr]-[A-Za-z0-9-]{10,}"), _has("xox")),
    Rule("google_api_key", re.compile(r"AIza[0-9A-Za-z_-]{35}"), _has("AIza")),
    Rule("stripe_key", re.compile(r"[rsp]k_(?:live|test)_[0-9A-Za-z]{16,}"), _has("k_live_", "k_test_")),
    Rule("url_credentials", re.compile(r"://[^/\s:@\"']+:(?P<secret>[^/\s@\"']+)@"), _has("://")),
    Rule(
        "generic_secret",
        re.compile(
            r"(?:api[_-]?key|apikey|secret(?:[_-]?key)?|client[_-]?secret|password|passwd|pwd|access[_-]?token|auth[_-]?token|refresh[_-]?token)"
            r"[\"']?\s*[:=]\s*[\"']?(?P<secret>[^\s\"',;}]{6,})"
        ),
        _generic_pre,
        on_lower=True,
    ),
)

# A run of digits and phone/card separators: the digit PII rules only look inside these.
_DIGIT_RUN = re.compile(r"\d[\d ().+/-]{6,}\d")
# ASCII letters lower-cased and every digit made "0", any other byte kept: one byte-for-byte translation
# serves both the automaton (it is the lower-cased text, but for digits) and the digit scan.
_FOLD = bytes(i + 32 if 0x41 <= i <= 0x5A else 0x30 if 0x30 <= i <= 0x39 else i for i in range(256))
# The same runs as ``_DIGIT_RUN`` on UTF-8 bytes, found on their ``_FOLD`` translation: a pattern that
# starts with a literal scans ~5x faster than one that starts with a class, and positions map 1:1 back.
_DIGIT_RUN_FOLDED = re.compile(rb"0[0 ().+/-]{6,}0")
_PROBE_CACHE_MAX = 4096

PII_RULES: dict[str, Rule] = {
    "email": Rule("email", re.compile(r"@(?<=[A-Za-z0-9._%+-]@)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), _has("@")),
    "card": Rule("card", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _always, _card_ok, digits=(13, 19)),
    "ssn": Rule("ssn", re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])"), _always, digits=(9, 9)),
    "phone": Rule(
        "phone",
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]?\d{3,4}(?!\w)|(?<![\w+])\+\d{8,15}\b"
        ),
        _always,
        _phone_ok,
        digits=(8, 15),
    ),
}
_ASCII_LOWER = {c: c + 32 for c in range(65, 91)}
_EMAIL_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")


Scope = tuple[tuple[Rule, ...], bool]
"""The rules that can fire in a value, and whether the digit PII rules can."""


def _needle(value: str) -> str | None:
    """A piece of ``value`` the record scan can find: 8 ASCII printable characters without ``"`` or ``\\``.

    The scan runs over serialized JSON, where those two (and control
    characters) appear escaped and non-ASCII letters may be lower-cased
    into another length; such a piece reads the same in the JSON as in the
    string.  ``None`` when the value has none: its rule is then always tried.
    """
    for i in range(len(value) - 7):
        piece = value[i : i + 8]
        if piece.isascii() and piece.isprintable() and '"' not in piece and "\\" not in piece:
            return piece
    return None


def value_rule(name: str, values: Iterable[str]) -> Rule | None:
    """One rule removing each of ``values`` verbatim (those of at least ``MIN_SECRET_CHARS``), or ``None``.

    The longest value is tried first, so a secret containing another is
    replaced whole.  Each value contributes one needle to the record scan
    (Hyperscan or Aho-Corasick, like every other rule), so a record holding
    none of them never runs the rule's regex.
    """
    vals = sorted({v for v in values if v and len(v) >= MIN_SECRET_CHARS}, key=lambda v: (-len(v), v))
    if not vals:
        return None
    needles = [_needle(v) for v in vals]
    present = [n for n in needles if n is not None]
    precheck: Callable[[str, str], bool] = _always if len(present) != len(needles) else _Has(*dict.fromkeys(present))
    return Rule(name, re.compile("|".join(re.escape(v) for v in vals)), precheck)


class Redactor:
    """Applies the redaction rules to strings and whole JSON-like values.

    ``pii`` selects PII kinds (ignored unless ``apply_pii``); ``patterns`` adds
    custom rules; ``upstream_key`` is the provider key value, redacted
    verbatim wherever it appears (rule ``upstream_key``); ``secrets`` are the
    other secret values Warden holds (:func:`proxy.secrets.secret_values`),
    redacted verbatim too (rule ``secret_value``; values shorter than
    ``MIN_SECRET_CHARS`` are ignored).  Methods taking ``pii=False`` apply the
    secret and custom rules only (how a record's metadata is redacted).
    ``use_hyperscan=False`` finds the rule needles with the Aho-Corasick
    automata even where Hyperscan is installed (the two select the same rules).
    """

    def __init__(
        self,
        *,
        patterns: dict[str, str] | None = None,
        pii: Iterable[str] = (),
        apply_pii: bool = True,
        upstream_key: str | None = None,
        secrets: Iterable[str] = (),
        use_hyperscan: bool = True,
    ) -> None:
        self._settings: dict[str, Any] = {
            "patterns": patterns,
            "pii": tuple(pii),
            "apply_pii": apply_pii,
            "upstream_key": upstream_key,
            "secrets": tuple(secrets),
            "use_hyperscan": use_hyperscan,
        }
        pii = self._settings["pii"]
        rules: list[Rule] = []
        # The by-value rules come first: a span they claim is named for what it is, not for its shape.
        by_value = (
            value_rule("upstream_key", [upstream_key] if upstream_key else []),
            value_rule("secret_value", [v for v in self._settings["secrets"] if v != upstream_key]),
        )
        rules.extend(r for r in by_value if r is not None)
        rules.extend(SECRET_RULES)
        for name, rx in (patterns or {}).items():
            try:
                compiled = re.compile(rx)
            except re.error as e:
                raise ConfigError(f"audit.redact_patterns.{name}", f"invalid regex: {e}") from None
            if compiled.match(""):
                raise ConfigError(f"audit.redact_patterns.{name}", "pattern matches the empty string")
            rules.append(Rule(name, compiled, _always))
        # The PII rules come last: the first ``_base`` rules are those applied with ``pii=False``.
        self._base = len(rules)
        if apply_pii:
            unknown = [k for k in pii if k not in PII_RULES]
            if unknown:
                raise ConfigError("audit.redact_pii", f"unknown PII kind {unknown[0]!r} (known: {', '.join(sorted(PII_RULES))})")
            wanted = set(pii)
            rules.extend(r for k, r in PII_RULES.items() if k in wanted and r.digits is None)
            self.digit_rules: tuple[Rule, ...] = tuple(r for k, r in PII_RULES.items() if k in wanted and r.digits is not None)
        else:
            self.digit_rules = ()
        # Probe results by window bytes: the same digit runs (dated model names, ids) recur in every record.
        self._probe_cache: dict[bytes, bool] = {}
        self._digit_min = min(((r.digits or (0, 0))[0] for r in self.digit_rules), default=0)
        self.rules: tuple[Rule, ...] = tuple(rules)
        needles: list[str] = []
        self._owner: list[int] = []
        self._always: list[int] = []
        for i, r in enumerate(self.rules):
            ns = r.precheck.needles_lower if isinstance(r.precheck, _Has) else ()
            if not ns:
                self._always.append(i)
            for n in ns:
                needles.append(n)
                self._owner.append(i)
        # The needles are found by Hyperscan where it is installed and works, else by Aho-Corasick automata:
        # the same rules either way (tests/proxy/audit/test_redact.py runs both).
        self._hs = _HyperscanNeedles.build(needles, self._owner) if use_hyperscan and needles else None
        self._ac = AhoCorasick(needles, implementation=Implementation.DFA) if needles and self._hs is None else None
        # The byte automaton runs on ``_FOLD``-ed text, so its needles are folded too; one with a digit (from
        # the upstream key) then matches other digits as well, and its hits are checked on the text.
        folded = [n.encode().translate(_FOLD) for n in needles]
        self._bac = BytesAhoCorasick(folded, implementation=Implementation.DFA) if self._ac is not None else None
        self._digit_needles = {i: n.encode() for i, n in enumerate(needles) if folded[i] != n.encode()}

    def with_secrets(self, secrets: Iterable[str]) -> Redactor:
        """A redactor with the same settings that also removes ``secrets`` by value (rule ``secret_value``)."""
        return Redactor(**{**self._settings, "secrets": (*self._settings["secrets"], *secrets)})

    @property
    def rule_names(self) -> list[str]:
        """Every rule this redactor applies, in order."""
        return [r.name for r in (*self.rules, *self.digit_rules)]

    def active(self, blob: str) -> Scope:
        """The rules that can fire somewhere in ``blob`` (a whole record
        serialized once), and whether digit rules may fire.

        One pass over the lower-cased blob (Hyperscan or Aho-Corasick) finds
        every rule needle; rules without needles (custom patterns) are always in.
        """
        return self._active(blob.encode(), blob)

    def active_raw(self, raw: bytes, *, pii: bool = True) -> Scope:
        """:meth:`active` of UTF-8 bytes (what ``orjson.dumps`` returned)."""
        return self._active(raw, None, pii)

    def _active(self, raw: bytes, blob: str | None, pii: bool = True) -> Scope:
        if self._hs is not None:
            rules = self._scope_rules(self._hs.rules_in(raw), pii)
            return rules, pii and bool(self.digit_rules) and self._digits_possible(raw)
        folded = None
        if self._ac is not None:
            owner = self._owner
            if raw.isascii():
                # ASCII: the fold is str.lower() (but for digits), and the byte automaton skips decoding.
                folded = raw.translate(_FOLD)
                hits = self._folded_hits(raw, folded)
            else:
                # str.lower() folds some non-ASCII letters into ASCII ones (KELVIN SIGN -> "k"): keep it.
                hits = self._ac.find_matches_as_indexes((blob if blob is not None else raw.decode()).lower(), overlapping=True)
            rules = self._scope_rules({owner[idx] for idx, _, _ in hits}, pii)
        else:
            rules = self.rules if pii else self.rules[: self._base]
        return rules, pii and bool(self.digit_rules) and self._digits_possible(raw, folded)

    def _folded_hits(self, raw: bytes, folded: bytes) -> list[tuple[int, int, int]]:
        """The byte automaton's hits on ``folded`` (ASCII ``raw`` translated by ``_FOLD``): those on ``raw.lower()``."""
        assert self._bac is not None
        hits = self._bac.find_matches_as_indexes(folded, overlapping=True)
        if hits and self._digit_needles:
            needles = self._digit_needles
            hits = [h for h in hits if h[0] not in needles or raw[h[1] : h[2]].lower() == needles[h[0]]]
        return hits

    def _scope_rules(self, found: set[int], pii: bool) -> tuple[Rule, ...]:
        """The rules (by index) whose needles were found, and those without needles."""
        found.update(self._always)
        if not found:
            return ()
        return tuple(r for i, r in enumerate(self.rules if pii else self.rules[: self._base]) if i in found)

    def record_scopes(self, meta: bytes, parts: list[bytes]) -> tuple[Scope, Scope]:
        """The scopes of a record's metadata (``pii=False``) and of its content ``parts``, from one scan.

        The same as ``active_raw(meta, pii=False)`` and ``active_raw(b"\\n".join(parts))``
        (what :meth:`values` scans).  With Hyperscan: one scan of each (its
        per-scan cost is small) and the digit runs of the content alone.
        Without: one automaton pass over the metadata and the parts joined by
        newlines, its hits split at the first one (a needle never holds a
        newline, which JSON escapes).
        """
        if self._hs is not None:
            content = b"\n".join(parts)
            in_meta = self._hs.rules_in(meta)
            in_content = self._hs.rules_in(content)
            digits = bool(self.digit_rules) and self._digits_possible(content)
            return (self._scope_rules(in_meta, False), False), (self._scope_rules(in_content, True), digits)
        joined = b"\n".join([meta, *parts])
        content_at = len(meta) + 1
        if self._ac is None:
            return self._active(meta, None, False), self._active(joined[content_at:], None)
        folded = None
        if joined.isascii():
            folded = joined.translate(_FOLD)
            hits = self._folded_hits(joined, folded)
            cut = len(meta)
        else:
            # As in _active, on the lower-cased str: hit positions count its characters.
            low = meta.decode().lower()
            hits = self._ac.find_matches_as_indexes(f"{low}\n{joined[content_at:].decode().lower()}", overlapping=True)
            cut = len(low)
        owner = self._owner
        in_meta = set()
        in_content = set()
        for idx, start, _ in hits:
            (in_meta if start < cut else in_content).add(owner[idx])
        digits = bool(self.digit_rules) and self._digits_possible(joined, folded, content_at)
        return (self._scope_rules(in_meta, False), False), (self._scope_rules(in_content, True), digits)

    def _digits_possible(self, raw: bytes, folded: bytes | None = None, at: int = 0) -> bool:
        """Whether a digit PII rule can match anywhere in ``raw[at:]`` (sound: never a false no).

        Each run of digits and separators (found on the ``_FOLD``
        translation, cheaper than scanning ``str``) that holds at least as many
        digits as the least any digit rule needs is tried with the rules, with
        one character of context each side (none before ``at``).  ``folded``
        is that translation of ``raw``, if made already.
        """
        if folded is None:
            folded = raw.translate(_FOLD)
        need = self._digit_min
        for m in _DIGIT_RUN_FOLDED.finditer(folded, at):
            a, b = m.span()
            if folded.count(b"0", a, b) < need:
                continue
            if self._probe(raw[max(at, a - 1) : b + 1]):
                return True
        return False

    def _probe(self, window: bytes) -> bool:
        """Whether a digit rule matches in ``window`` (a run with one byte of context each side); cached."""
        hit = self._probe_cache.get(window)
        if hit is None:
            probe: list[tuple[int, int, str]] = []
            self._digit_spans(window.decode("utf-8", "replace"), probe)
            hit = bool(probe)
            if len(window) <= 64:
                if len(self._probe_cache) >= _PROBE_CACHE_MAX:
                    self._probe_cache.clear()
                self._probe_cache[window] = hit
        return hit

    def text(self, s: str, counts: dict[str, int], scope: Scope | None = None) -> str:
        """Redact one string; add the rules that fired to ``counts``.

        ``scope`` (from :meth:`active`) limits the rules tried to those that can
        fire in the enclosing record.
        """
        if len(s) < 6:
            return s
        rules, digits = scope if scope is not None else (self.rules, bool(self.digit_rules))
        spans: list[tuple[int, int, str]] = []
        if rules:
            low = s.lower()
            if len(low) != len(s):
                low = s.translate(_ASCII_LOWER)
            for rule in rules:
                if rule.precheck(s, low):
                    self._collect(rule, low if rule.on_lower else s, s, 0, len(s), spans)
        if digits and _has_digit(s):
            self._digit_spans(s, spans)
        if not spans:
            return s
        spans.sort()
        out: list[str] = []
        pos = 0
        for start, end, name in spans:
            out.append(s[pos:start])
            out.append(PLACEHOLDER.format(name))
            counts[name] = counts.get(name, 0) + 1
            pos = end
        out.append(s[pos:])
        return "".join(out)

    def _digit_spans(self, s: str, spans: list[tuple[int, int, str]]) -> None:
        """Run the digit PII rules inside each run of digits and separators."""
        n = len(s)
        for run in _DIGIT_RUN.finditer(s):
            a, b = run.span()
            nd = sum(c.isdigit() for c in run.group())
            if a > 0 and s[a - 1] in "+(":
                a -= 1
            for rule in self.digit_rules:
                lo, hi = rule.digits or (0, 0)
                if lo <= nd and (rule.name == "card" or nd <= hi):
                    self._collect(rule, s, s, a, min(b + 1, n), spans)

    @staticmethod
    def _collect(rule: Rule, hay: str, s: str, pos: int, endpos: int, spans: list[tuple[int, int, str]]) -> None:
        secret = "secret" in rule.pattern.groupindex
        email = rule.name == "email"
        for m in rule.pattern.finditer(hay, pos, endpos):
            if secret and m.group("secret") is not None:
                start, end = m.span("secret")
            else:
                start, end = m.span()
            if email:
                while start > 0 and s[start - 1] in _EMAIL_LOCAL:
                    start -= 1
            if rule.validate is not None and not rule.validate(s[start:end]):
                continue
            if any(start < e and b < end for b, e, _ in spans):
                continue
            spans.append((start, end, rule.name))

    def value(self, v: Any, counts: dict[str, int], *, pii: bool = True) -> Any:
        """Redact every string inside a JSON-like value.

        The value is serialized once (:func:`scan_bytes`) to find which rules
        can fire at all.  When none can, the value is returned as it is;
        otherwise the walk tries only those rules on each string and returns
        plain JSON types (sets become sorted lists, bytes are decoded as UTF-8,
        dataclasses become dicts, anything else its ``str()``).  Dict keys are
        strings, redacted like values.
        """
        return self.value_in(v, self.active_raw(scan_bytes(v), pii=pii), counts)

    def value_in(self, v: Any, scope: Scope, counts: dict[str, int]) -> Any:
        """:meth:`value` with the scope already found (:meth:`record_scopes`)."""
        if not scope[0] and not scope[1]:
            return v
        return self._walk(v, counts, scope)

    def values(self, items: list[Any], counts: dict[str, int]) -> tuple[list[Any], list[bytes] | None]:
        """Redact each of ``items``, serializing each once in canonical form.

        Returns the items as :meth:`value` would (one scope for all of them)
        and, when no rule can fire in any of them (so they are unchanged), the
        canonical bytes of each (``orjson`` with sorted keys, as the record is
        stored), for the caller to reuse instead of serializing them again.
        """
        parts = [canonical(v) for v in items]
        return self.values_in(items, parts, self.active_raw(b"\n".join(parts)), counts)

    def values_in(self, items: list[Any], parts: list[bytes], scope: Scope, counts: dict[str, int]) -> tuple[list[Any], list[bytes] | None]:
        """:meth:`values` with the canonical bytes and the scope (of ``parts`` joined by newlines) already made."""
        if not scope[0] and not scope[1]:
            return items, parts
        return [self._walk(v, counts, scope) for v in items], None

    def _walk(self, v: Any, counts: dict[str, int], scope: Scope) -> Any:
        t = type(v)
        if t is str:
            return v if len(v) < 6 else self.text(v, counts, scope)
        if t is dict:
            out: dict[str, Any] = {}
            for k, x in v.items():
                key = k if type(k) is str else str(k)
                if len(key) >= 6:
                    # A secret can be a key too ({"sk-...": 1} in tool arguments).
                    key = self.text(key, counts, scope)
                tx = type(x)
                if tx is str:
                    out[key] = x if len(x) < 6 else self.text(x, counts, scope)
                elif x is None or tx is int or tx is float or tx is bool:
                    out[key] = x
                else:
                    out[key] = self._walk(x, counts, scope)
            return out
        if t is list or t is tuple:
            return [self._walk(x, counts, scope) for x in v]
        if v is None or isinstance(v, (bool, int, float)):
            return v
        if isinstance(v, str):
            return self.text(str(v), counts, scope)
        if isinstance(v, dict):
            return self._walk(dict(v), counts, scope)
        if isinstance(v, (list, tuple)):
            return [self._walk(x, counts, scope) for x in v]
        return self._walk(json_default(v), counts, scope)


def scan_bytes(v: Any) -> bytes:
    """What :meth:`Redactor.value` scans: ``orjson.dumps(v, option=OPT_NON_STR_KEYS, default=json_default)``.

    Plain JSON with str keys is serialized without the option and ``default``
    first: the same bytes on orjson's faster path (see :func:`~proxy.audit.chain.canonical`).
    """
    try:
        return orjson.dumps(v)
    except TypeError:
        return orjson.dumps(v, option=orjson.OPT_NON_STR_KEYS, default=json_default)


def json_default(v: Any) -> Any:
    """How values that are not plain JSON are stored (sets sorted, bytes as UTF-8, else ``str``)."""
    if isinstance(v, (set, frozenset)):
        return sorted(v, key=str)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", "replace")
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    return str(v)


def _add_id(i: int, start: int, end: int, flags: int, found: set[int]) -> None:
    found.add(i)


class _HyperscanNeedles:
    """Which rule needles occur in a text, found by Hyperscan.

    Hyperscan's literal matcher is SIMD: a few times faster than the
    Aho-Corasick DFA on a record, and no case-folding copy is needed.  The
    needles (lower-cased, as for the automaton) match ASCII-caselessly on
    ASCII text, which is matching them in its ``lower()``; other text is
    lower-cased as ``str`` first, as the automaton path does.  Each needle
    is reported once per scan, under the index of its rule.

    A database's scratch space serves one scan at a time; a scan that finds
    it in use (another thread) takes a fresh one.
    """

    __slots__ = ("db",)

    def __init__(self, db: Any) -> None:
        self.db = db

    @classmethod
    def build(cls, needles: list[str], owner: list[int]) -> _HyperscanNeedles | None:
        """The compiled needles (``owner[i]``: the rule of ``needles[i]``), or ``None`` without a usable Hyperscan."""
        if hyperscan is None:
            return None
        db = hyperscan.Database()
        try:
            db.compile(
                expressions=[n.encode() for n in needles],
                ids=owner,
                elements=len(needles),
                flags=hyperscan.HS_FLAG_CASELESS | hyperscan.HS_FLAG_SINGLEMATCH,
                literal=True,
            )
        except hyperscan.error:  # e.g. a CPU without the instructions it needs
            return None
        return cls(db)

    def rules_in(self, raw: bytes) -> set[int]:
        """The indices of the rules with a needle in ``raw`` (UTF-8), as the automaton finds them."""
        found: set[int] = set()
        data = raw if raw.isascii() else raw.decode().lower().encode()
        try:
            self.db.scan(data, _add_id, 0, found)  # (data, match_event_handler, flags, context): positional is cheaper
        except hyperscan.ScratchInUseError:
            self.db.scan(data, _add_id, 0, found, hyperscan.Scratch(self.db))
        return found
