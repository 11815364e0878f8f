"""Redaction: every listed secret type, PII with Luhn, custom patterns, rule counts."""

from __future__ import annotations

import time

import orjson
import pytest

from llm_warden.proxy.audit import redact
from llm_warden.proxy.audit.redact import Redactor, Rule, luhn_ok
from llm_warden.proxy.errors import ConfigError

UPSTREAM = "sk-upstream-secret-0123456789abcdefXYZ"

SECRETS = {
    "upstream_key": f"the key is {UPSTREAM} ok",
    "private_key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAx4\nabc\n-----END RSA PRIVATE KEY-----",
    "jwt": "token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl here",
    "bearer": "Authorization: Bearer abcDEF1234567890ghij",
    "provider_key": "use sk-proj-Abcdefghijklmnopqrstuvwx0123 please",
    "aws_access_key": "id AKIAIOSFODNN7EXAMPLE",
    "aws_secret_key": "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "github_token": "ghp_" + "A1b2" * 9,
    "slack_token": "xoxb-123456789012-abcdefABCDEF",
    "google_api_key": "AIza" + "SyD-1234567890abcdefghijklmnopqrstu",
    "stripe_key": "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
    "url_credentials": "postgres://app:hunter2secret@db.internal:5432/main",
    "generic_secret": 'config password: "Tr0ub4dor&3xyz"',
}


@pytest.fixture(autouse=True, params=["hyperscan", "aho-corasick"])
def needle_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with each way of finding the rule needles: both must select the same rules."""
    if request.param == "aho-corasick":
        monkeypatch.setattr(redact, "hyperscan", None)
    elif redact.hyperscan is None:
        pytest.skip("hyperscan is not installed on this platform")
    return str(request.param)


def secret_value(kind: str, text: str) -> str:
    return {
        "upstream_key": UPSTREAM,
        "private_key": "MIIEpAIBAAKCAQEAx4",
        "jwt": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl",
        "bearer": "abcDEF1234567890ghij",
        "provider_key": "sk-proj-Abcdefghijklmnopqrstuvwx0123",
        "aws_access_key": "AKIAIOSFODNN7EXAMPLE",
        "aws_secret_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "github_token": "A1b2A1b2A1b2",
        "slack_token": "123456789012-abcdefABCDEF",
        "google_api_key": "SyD-1234567890abcdefghijklmnopqrstu",
        "stripe_key": "4eC39HqLyjWDarjtT1zdp7dc",
        "url_credentials": "hunter2secret",
        "generic_secret": "Tr0ub4dor&3xyz",
    }[kind]


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_every_secret_type_is_redacted_and_counted(kind: str) -> None:
    r = Redactor(upstream_key=UPSTREAM, apply_pii=False)
    counts: dict[str, int] = {}
    out = r.text(SECRETS[kind], counts)
    assert secret_value(kind, SECRETS[kind]) not in out
    assert f"[REDACTED:{kind}]" in out
    assert counts == {kind: 1}


def test_bearer_keeps_the_scheme_word() -> None:
    out = Redactor().text("Authorization: Bearer abcDEF1234567890ghij", {})
    assert out == "Authorization: Bearer [REDACTED:bearer]"


def test_private_key_cut_without_end_marker_is_redacted_to_the_end() -> None:
    out = Redactor().text("here: -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC", {})
    assert out == "here: [REDACTED:private_key]"


def test_pii_email_phone_card_ssn() -> None:
    r = Redactor(pii=["email", "phone", "card", "ssn"])
    counts: dict[str, int] = {}
    text = "Mail bob.smith+tag@example.co.uk, call +1 415 555 2671 or (415) 555-2671, card 4111 1111 1111 1111, ssn 123-45-6789."
    out = r.text(text, counts)
    for v in ("bob.smith+tag@example.co.uk", "415 555 2671", "555-2671", "4111 1111 1111 1111", "123-45-6789"):
        assert v not in out
    assert counts == {"email": 1, "phone": 2, "card": 1, "ssn": 1}


def test_card_needs_a_valid_luhn_and_dates_are_not_phones() -> None:
    r = Redactor(pii=["phone", "card"])
    counts: dict[str, int] = {}
    text = "order 4111111111111112 placed 2024-01-15 10:30 from 192.168.1.100, version 1.2.3, model gpt-4o-2024-08-06"
    assert r.text(text, counts) == text
    assert counts == {}
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


def test_pii_is_kept_when_not_applied() -> None:
    r = Redactor(pii=["email"], apply_pii=False)
    assert r.text("write to bob@example.com", {}) == "write to bob@example.com"


def test_custom_patterns_and_their_validation() -> None:
    r = Redactor(patterns={"ticket": r"TICKET-\d{6}"})
    counts: dict[str, int] = {}
    assert r.text("see TICKET-123456 and TICKET-654321", counts) == "see [REDACTED:ticket] and [REDACTED:ticket]"
    assert counts == {"ticket": 2}
    with pytest.raises(ConfigError, match="redact_patterns.bad"):
        Redactor(patterns={"bad": "("})
    with pytest.raises(ConfigError, match="empty string"):
        Redactor(patterns={"empty": "x*"})
    with pytest.raises(ConfigError, match="unknown PII kind"):
        Redactor(pii=["passport"])


def test_value_walks_nested_structures_and_keeps_plain_values() -> None:
    r = Redactor(pii=["email"], upstream_key=UPSTREAM)
    counts: dict[str, int] = {}
    value = {
        "messages": [{"role": "user", "content": f"key {UPSTREAM} mail a@b.example"}],
        "n": 1,
        "t": 0.5,
        "tags": {"x"},
        "raw": b"Bearer abcdefghijklmnop",
    }
    out = r.value(value, counts)
    assert out["messages"][0]["content"] == "key [REDACTED:upstream_key] mail [REDACTED:email]"
    assert out["n"] == 1 and out["t"] == 0.5 and out["tags"] == ["x"]
    assert out["raw"] == "Bearer [REDACTED:bearer]"
    assert counts == {"upstream_key": 1, "email": 1, "bearer": 1}


def test_value_without_anything_to_redact_is_returned_as_is() -> None:
    r = Redactor(pii=["email", "phone", "card"])
    value = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12345678}
    assert r.value(value, {}) is value


def test_non_ascii_text_keeps_positions() -> None:
    r = Redactor()
    out = r.text("İstanbul ünïcode password=hunter2hunter2 end", {})
    assert out == "İstanbul ünïcode password=[REDACTED:generic_secret] end"


@pytest.mark.parametrize("hostile", ["eyJ" * 40_000, "eyJ" + "a" * 120_000, ("eyJaaaaaaa." * 11_000)])
def test_hostile_token_shaped_text_is_redacted_in_linear_time(hostile: str) -> None:
    # Every "eyJ" used to start a scan to the end of the string: quadratic on prompt-sized text.
    started = time.perf_counter()
    Redactor().value({"prompt": hostile}, {})
    assert time.perf_counter() - started < 1.0


def test_jwt_inside_a_word_run_is_still_redacted_at_its_start() -> None:
    jwt_text = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXZhbHVl"
    counts: dict[str, int] = {}
    assert Redactor().text(f"token={jwt_text} and x{jwt_text}", counts).count("[REDACTED:") == 2


def test_secrets_used_as_dict_keys_are_redacted() -> None:
    """A secret can arrive as a JSON key (tool arguments, bodies); keys are redacted like values."""
    key = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
    counts: dict[str, int] = {}
    out = Redactor(apply_pii=False).value({"args": {key: 1, "plain_key": "fine"}}, counts)
    assert key not in repr(out)
    assert out["args"]["plain_key"] == "fine"
    assert sum(counts.values()) >= 1


def test_digit_runs_found_on_the_translated_bytes_match_the_plain_regex() -> None:
    """The fast record-level digit scan finds exactly the runs of ``\\d[\\d ().+/-]{6,}\\d`` on the bytes."""
    import random
    import re

    from llm_warden.proxy.audit.redact import _DIGIT_RUN_FOLDED, _FOLD

    plain = re.compile(rb"\d[\d ().+/-]{6,}\d")
    rng = random.Random(7)
    alphabet = "0123456789 ().+/-xA:é٣\n"
    for _ in range(500):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))).encode()
        fast = [m.span() for m in _DIGIT_RUN_FOLDED.finditer(raw.translate(_FOLD))]
        assert fast == [m.span() for m in plain.finditer(raw)], raw


def test_phone_inside_a_record_with_dated_model_names_is_still_found() -> None:
    r = Redactor(pii=["phone", "card"])
    counts: dict[str, int] = {}
    out = r.value({"model": "gpt-4o-2024-08-06", "content": "call me at +1 415-555-0134 today"}, counts)
    assert "555-0134" not in out["content"] and counts == {"phone": 1}


def test_cached_digit_probe_gives_the_same_answer_as_a_fresh_one() -> None:
    r = Redactor(pii=["phone", "card"])
    for _ in range(2):  # the second round is answered from the probe cache
        counts: dict[str, int] = {}
        out = r.value({"model": "gpt-4o-2024-08-06", "a": "ring +1 415-555-0134", "b": "id 2024-08-06"}, counts)
        assert counts == {"phone": 1} and out["b"] == "id 2024-08-06"
        assert r.value({"model": "gpt-4o-2024-08-06"}, {}) == {"model": "gpt-4o-2024-08-06"}


def test_non_ascii_letters_that_lower_case_to_ascii_still_select_rules() -> None:
    # KELVIN SIGN lower-cases to "k": the record-level scan must see "api_key" as str.lower() does.
    counts: dict[str, int] = {}
    out = Redactor(apply_pii=False).value({"args": "api_\u212aey=hunter2hunter2"}, counts)
    assert "hunter2" not in out["args"] and counts == {"generic_secret": 1}


def _names(scope: tuple[tuple[Rule, ...], bool]) -> tuple[list[str], bool]:
    return [r.name for r in scope[0]], scope[1]


@pytest.mark.parametrize("patterns", [None, {"ticket": r"TICKET-\d{6}"}])
def test_one_record_scan_gives_the_scopes_of_two(patterns: dict[str, str] | None) -> None:
    """``record_scopes`` (one pass over metadata and content) equals a scan of each; metadata never gets PII rules."""
    import random

    import orjson

    r = Redactor(patterns=patterns, pii=["email", "phone", "card"], upstream_key=UPSTREAM)
    no_pii = Redactor(patterns=patterns, apply_pii=False, upstream_key=UPSTREAM)
    pieces = [*SECRETS.values(), "plain", "bob@example.com", "+1 415-555-0134", "2024-08-06", "é ünï", "api_\u212aey=x", "İ", "\u212a"]
    rng = random.Random(5)
    for _ in range(300):
        meta = orjson.dumps({"h": " ".join(rng.choice(pieces) for _ in range(rng.randint(0, 3)))})
        content = orjson.dumps([" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 3)))])
        got_meta, got_content = r.record_scopes(meta, [content])
        assert _names(got_meta) == _names(r.active_raw(meta, pii=False)) == _names(no_pii.active_raw(meta))
        assert _names(got_content) == _names(r.active_raw(content))


def test_an_upstream_key_with_digits_selects_its_rule_only_where_it_is() -> None:
    """The byte automaton sees every digit as "0": a needle with digits is checked against the text."""
    r = Redactor(upstream_key="20240806-key-abcdefghijklmnop", apply_pii=False)
    assert _names(r.active_raw(b'{"n":"number 12345678-KEY-x"}')) == ([], False)
    assert _names(r.active_raw(b'{"n":"it is 20240806-KEY-x"}')) == (["upstream_key"], False)
    assert _names(r.record_scopes(b'{"n":"12345678-key"}', [b'"20240806-key"'])[1]) == (["upstream_key"], False)
    assert _names(r.record_scopes(b'{"n":"20240806-key"}', [b'"12345678-key"'])[0]) == (["upstream_key"], False)
    counts: dict[str, int] = {}
    assert r.value({"n": "it is 20240806-key-abcdefghijklmnop"}, counts) == {"n": "it is [REDACTED:upstream_key]"}
    assert counts == {"upstream_key": 1}


def test_hyperscan_and_the_automata_select_the_same_rules(needle_engine: str) -> None:
    """The needles found by Hyperscan (caseless on ASCII, on str.lower() otherwise) are those the automata find."""
    import random

    import orjson

    if needle_engine != "hyperscan":
        pytest.skip("compares the two engines once")
    pieces = [
        *SECRETS.values(),
        *(v.upper() for v in SECRETS.values()),
        UPSTREAM.swapcase(),
        "20240806-KEY-abcdefghijklmnop",
        "12345678-key",
        "plain",
        "bob@example.com",
        "+1 415-555-0134",
        "2024-08-06",
        "é ünï",
        "api_\u212aey=x",
        "PASSW\u0130RD=x",
        "\u212a",
        "Asia",
        "ACCESS-TOKEN",
        "Private Key",
        "",
    ]
    rng = random.Random(11)
    for key in (UPSTREAM, "20240806-key-abcdefghijklmnop", "Ünïcödé-key-value", None):
        for pii in ([], ["email", "phone", "card", "ssn"]):
            hs = Redactor(pii=pii, upstream_key=key)
            ac = Redactor(pii=pii, upstream_key=key, use_hyperscan=False)
            assert hs._hs is not None and ac._hs is None
            for _ in range(200):
                meta = orjson.dumps({"h": " ".join(rng.choice(pieces) for _ in range(rng.randint(0, 3)))})
                parts = [orjson.dumps([" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 3)))]) for _ in range(rng.randint(0, 3))]
                got = hs.record_scopes(meta, parts)
                want = ac.record_scopes(meta, parts)
                assert (_names(got[0]), _names(got[1])) == (_names(want[0]), _names(want[1])), (meta, parts)
                assert _names(hs.active_raw(meta)) == _names(ac.active_raw(meta))


def test_a_scan_that_finds_the_scratch_space_in_use_takes_its_own() -> None:
    """Two scans at once (another thread; here one started from inside the other) both complete."""
    if redact.hyperscan is None:
        pytest.skip("hyperscan is not installed on this platform")
    r = Redactor(upstream_key=UPSTREAM)
    hs = r._hs
    assert hs is not None
    inner: list[set[int]] = []

    def on_match(i: int, start: int, end: int, flags: int, ctx: object) -> None:
        inner.append(hs.rules_in(b"a bearer token and sk-proj-x"))

    hs.db.scan(b"a slack xoxb- token", match_event_handler=on_match)
    assert inner and {r.rules[i].name for i in inner[0]} == {"bearer", "provider_key"}


# -- every secret Warden holds, by value (rule secret_value) ---------------------------------------

HELD = {
    "admin_token": "admin-bootstrap-token-0123456789abcdef",
    "hs256_secret": "hs256 secret with spaces & symbols: 0123456789",
    "redis_password": "r3dis-pa55word",
    "quoted": 'a "quoted" \\ back\\slash secret',
    "unicode": "Ünïcödé-Sécrèt-Wörd",
    "no_plain_piece": '"\\"\\"\\"\\"\\"',
}


@pytest.mark.parametrize("kind", sorted(HELD))
def test_held_secrets_are_redacted_by_value_in_text_and_values(kind: str) -> None:
    value = HELD[kind]
    r = Redactor(secrets=list(HELD.values()), apply_pii=False)
    counts: dict[str, int] = {}
    assert r.text(f"pasted: {value} (end)", counts) == "pasted: [REDACTED:secret_value] (end)"
    assert counts == {"secret_value": 1}
    counts = {}
    out = r.value({"messages": [{"content": f"x {value} y {value}"}], value: 1, "h": [value]}, counts)
    assert value not in orjson.dumps(out).decode()
    assert counts == {"secret_value": 4}


def test_held_secrets_select_their_rule_only_where_they_are() -> None:
    r = Redactor(secrets=[HELD["admin_token"], "Ünïcödé-value-0123"], apply_pii=False)
    assert _names(r.active_raw(b'{"m":"nothing to hide here, just text"}')) == ([], False)
    assert _names(r.active_raw(orjson.dumps({"m": f"it is {HELD['admin_token']}"}))) == (["secret_value"], False)
    assert _names(r.active_raw(orjson.dumps({"m": "ÜNÏCÖDÉ-VALUE-0123"}))) == (["secret_value"], False)  # a needle may over-select
    for value in (HELD["no_plain_piece"], HELD["unicode"]):  # no 8 plain ASCII characters in a row
        r2 = Redactor(secrets=[value], apply_pii=False)
        assert _names(r2.active_raw(b'{"m":"anything"}')) == (["secret_value"], False), "without a plain piece the rule is always tried"


def test_short_held_secrets_are_ignored_and_longest_wins() -> None:
    r = Redactor(secrets=["short", "", "1234567", "abcdefgh", "abcdefgh-and-more"], apply_pii=False)
    counts: dict[str, int] = {}
    assert r.text("short 1234567 abcdefgh-and-more abcdefgh", counts) == "short 1234567 [REDACTED:secret_value] [REDACTED:secret_value]"
    assert counts == {"secret_value": 2}


def test_the_upstream_key_keeps_its_own_rule_among_held_secrets() -> None:
    r = Redactor(upstream_key=UPSTREAM, secrets=[UPSTREAM, HELD["admin_token"]], apply_pii=False)
    counts: dict[str, int] = {}
    assert r.text(f"{UPSTREAM} {HELD['admin_token']}", counts) == "[REDACTED:upstream_key] [REDACTED:secret_value]"
    assert r.rule_names[:2] == ["upstream_key", "secret_value"]


def test_a_held_secret_is_named_for_what_it_is_not_for_its_shape() -> None:
    """A held secret shaped like a provider key or inside a bearer header is counted as secret_value, and removed whole."""
    key = "sk-proj-HeldAdminTokenLooksLikeAKey0123"
    r = Redactor(secrets=[key], apply_pii=False)
    counts: dict[str, int] = {}
    assert r.text(f"Authorization: Bearer {key}", counts) == "Authorization: Bearer [REDACTED:secret_value]"
    assert counts == {"secret_value": 1}


def test_with_secrets_keeps_every_other_setting() -> None:
    base = Redactor(patterns={"ticket": r"TICKET-\d+"}, pii=["email"], upstream_key=UPSTREAM)
    r = base.with_secrets([HELD["admin_token"]])
    assert r.rule_names == ["upstream_key", "secret_value", *base.rule_names[1:]]
    counts: dict[str, int] = {}
    out = r.text(f"{HELD['admin_token']} TICKET-42 bob@example.com {UPSTREAM}", counts)
    assert out == "[REDACTED:secret_value] [REDACTED:ticket] [REDACTED:email] [REDACTED:upstream_key]"
    no_pii = Redactor(apply_pii=False).with_secrets([HELD["admin_token"]])
    assert "email" not in no_pii.rule_names


def test_held_secret_needles_select_the_same_rules_with_hyperscan_and_automata(needle_engine: str) -> None:
    import random

    if needle_engine != "hyperscan":
        pytest.skip("hyperscan is not installed on this platform")
    values = list(HELD.values())
    pieces = [*values, *(v.upper() for v in values), *(v[:9] for v in values), "plain text", "0123456789", "r3dis", ""]
    hs = Redactor(secrets=values, upstream_key=UPSTREAM)
    ac = Redactor(secrets=values, upstream_key=UPSTREAM, use_hyperscan=False)
    assert hs._hs is not None and ac._hs is None
    rng = random.Random(5)
    for _ in range(300):
        meta = orjson.dumps({"h": " ".join(rng.choice(pieces) for _ in range(rng.randint(0, 3)))})
        parts = [orjson.dumps([" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 3)))]) for _ in range(rng.randint(0, 3))]
        got, want = hs.record_scopes(meta, parts), ac.record_scopes(meta, parts)
        assert (_names(got[0]), _names(got[1])) == (_names(want[0]), _names(want[1])), (meta, parts)
        counts_hs: dict[str, int] = {}
        counts_ac: dict[str, int] = {}
        assert hs.values_in([orjson.loads(p) for p in parts], parts, got[1], counts_hs)[0] == ac.values_in(
            [orjson.loads(p) for p in parts], parts, want[1], counts_ac
        )[0]
