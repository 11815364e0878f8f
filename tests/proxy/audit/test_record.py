"""The projection of an exchange: stored bytes stay canonical whatever shortcut made them."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

import orjson
import pytest

from llm_warden.proxy.audit.chain import CANONICAL_OPTS, canonical
from llm_warden.proxy.audit.record import Projector, _iso
from llm_warden.proxy.audit.redact import json_default
from llm_warden.proxy.exchange import Decision, Exchange
from tests.proxy.audit.helpers import make_exchange

UPSTREAM = "sk-upstream-secret-0123456789abcdefXYZ"


@pytest.mark.parametrize("mode", ["full", "redacted", "hashes"])
@pytest.mark.parametrize(
    "user_text",
    [
        "plain question with no secret at all, about order 7",
        f"my key is {UPSTREAM} and mail bob@example.com or call +1 415-555-0134",
        "dates 2024-08-06 and 2025-01-02 are not phones",
    ],
)
def test_stored_bytes_are_the_canonical_form_of_the_record(mode: str, user_text: str) -> None:
    pj = Projector(mode, pii=["email", "phone", "card"], upstream_key=UPSTREAM, provider="openai")  # type: ignore[arg-type]
    ex = make_exchange(user_text=user_text)
    body = pj.exchange(ex).body
    assert body == canonical(orjson.loads(body))
    assert UPSTREAM.encode() not in body


class _Key(str):
    pass


@pytest.mark.parametrize(
    "record",
    [
        {"b": 1, "a": {"z": [1.5, None, True], "é": "ü", "\U0001f600": 2, "\uffff": 3}},
        {"annotations": {7: "int key", "s": {"b", "a"}}},
        {"k": {True: 1, None: 2, 1.5: 3}},
        {"raw": b"bytes \xff", "decision": Decision.allow("x"), "other": ValueError("str() of it")},
        {_Key("sub"): 1, "a": 2},
    ],
)
def test_canonical_gives_the_bytes_of_the_full_orjson_call(record: dict[str, object]) -> None:
    """The str-key fast path and the fallback both store exactly what the full call would."""
    assert canonical(record) == orjson.dumps(record, option=CANONICAL_OPTS, default=json_default)


def test_hashes_mode_hashes_the_canonical_bytes_of_a_request() -> None:
    import hashlib

    pj = Projector("hashes", upstream_key=UPSTREAM)
    ex = make_exchange(user_text="nothing to redact here")
    rec = orjson.loads(pj.exchange(ex).body)
    want = canonical(ex.body or {})
    assert rec["turns"][0]["request"] == {"sha256": hashlib.sha256(want).hexdigest(), "bytes": len(want)}


def test_iso_timestamps_match_datetime_formatting() -> None:
    def ref(ts_us: int) -> str:
        return datetime.fromtimestamp(ts_us / 1_000_000, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")

    rng = random.Random(3)
    now = int(time.time() * 1_000_000)
    samples = [0, 1, 999_999, 1_000_000, now, now + 1, *(rng.randrange(0, 4_102_444_800_000_000) for _ in range(2000))]
    samples += [now + i * 333_331 for i in range(50)]
    for ts in samples:
        assert _iso(ts) == ref(ts), ts


def test_metadata_gets_secret_rules_and_content_also_pii_from_one_scan() -> None:
    """The metadata is redacted without PII rules and the content with them, though both are scanned at once."""
    pj = Projector("redacted", pii=["email", "phone"], upstream_key=UPSTREAM)
    ex = make_exchange(subject="bob@example.com", user_text="mail bob@example.com or ring +1 415-555-0134")
    ex.request_headers = {"x-note": f"key {UPSTREAM}"}
    rec = orjson.loads(pj.exchange(ex).body)
    assert rec["principal"]["subject"] == "bob@example.com"
    assert rec["request_headers"]["x-note"] == "key [REDACTED:upstream_key]"
    assert "bob@example.com" not in orjson.dumps(rec["turns"]).decode()
    assert rec["redaction"]["rules"] == {"upstream_key": 1, "email": 1, "phone": 1}


def test_free_text_about_the_exchange_is_redacted_too() -> None:
    """Upstream errors, refusal reasons and details, parse errors and tool-result names can quote secrets and PII."""
    key = "sk-proj-" + "A1b2C3d4" * 4
    card = "4111 1111 1111 1111"
    ex = make_exchange()
    ex.turns[0].error = f"upstream said: invalid key {key}"
    d = ex.tool_decisions[0]
    d.decision = Decision(kind="deny", rule="tools.lookup_order.schema", reason=f"'{card}' is not of type 'integer'", details={"value": key})
    ex.tool_results = [{"tool_call_id": "call_prev", "name": f"lookup {key}", "content": "ok"}]
    rec = orjson.loads(Projector("redacted", pii=["card"]).exchange(ex).body)
    text = orjson.dumps(rec).decode()
    assert key not in text and card not in text
    assert "[REDACTED:provider_key]" in rec["turns"][0]["error"]
    assert rec["tool_calls"][0]["reason"].startswith("'[REDACTED:card]'")
    assert rec["tool_calls"][0]["details"] == {"value": "[REDACTED:provider_key]"}
    assert rec["redaction"]["rules"]["provider_key"] >= 3 and rec["redaction"]["rules"]["card"] >= 1
    # In full mode PII stays, secrets still go.
    full = orjson.loads(Projector("full").exchange(ex).body)
    assert card in full["tool_calls"][0]["reason"] and key not in orjson.dumps(full).decode()


def test_system_hash_cache_is_keyed_by_the_text_and_bounded() -> None:
    """Cached digests are those of the very text asked about; the cache empties itself at its bounds."""
    import hashlib

    from llm_warden.proxy.audit.record import _HashCache

    cache = _HashCache()
    texts = [f"system prompt {i}" for i in range(_HashCache.MAX_ENTRIES * 3)]
    for rnd in range(2):
        for t in texts:
            assert cache.sha256(t) == hashlib.sha256(t.encode()).hexdigest(), (rnd, t)
            assert len(cache.digests) <= _HashCache.MAX_ENTRIES
            assert cache.chars == sum(map(len, cache.digests)) <= _HashCache.MAX_CHARS
    big = "x" * (_HashCache.MAX_CHARS // 2 + 1)
    cache.sha256(big)
    cache.sha256(big + "y")
    assert cache.chars <= _HashCache.MAX_CHARS and big not in cache.digests
    huge = "z" * (_HashCache.MAX_CHARS + 1)
    assert cache.sha256(huge) == hashlib.sha256(huge.encode()).hexdigest()
    assert huge not in cache.digests
    # Text that cannot be encoded fails every time: it is never cached.
    for _ in range(2):
        with pytest.raises(UnicodeEncodeError):
            cache.sha256("lone \ud800 surrogate")


def test_system_prompt_hash_follows_the_prompt_across_records() -> None:
    """The same projector hashes each record's own system prompt (no stale digest from an earlier record).

    The prompt hashed is the one sent upstream in the first turn: its payload when Warden built
    it, else its bytes parsed.
    """
    import hashlib

    def sent(messages: list[dict[str, object]], as_payload: bool) -> Exchange:
        ex = make_exchange()
        assert ex.body is not None
        body = {**ex.body, "messages": messages}
        if as_payload:
            ex.turns[0].payload = body
        else:
            ex.turns[0].body = orjson.dumps(body)
        return ex

    pj = Projector("redacted", pii=["email"])
    for n, i in enumerate([0, 1, 0, 2, 1]):
        ex = sent([{"role": "system", "content": f"You are assistant {i}."}, {"role": "user", "content": "hi"}], as_payload=n % 2 == 0)
        rec = orjson.loads(pj.exchange(ex).body)
        assert rec["prompt"]["system_sha256"] == hashlib.sha256(f"You are assistant {i}.".encode()).hexdigest()
    ex = sent([{"role": "system", "content": "a"}, {"role": "developer", "content": [{"text": "b"}, {"text": 3}]}], as_payload=True)
    rec = orjson.loads(pj.exchange(ex).body)
    assert rec["prompt"]["system_sha256"] == hashlib.sha256(b"a\nb").hexdigest()
    # A request hook's system prompt is what the model saw; the client's is not what is hashed.
    ex = sent([{"role": "system", "content": "set by a hook"}], as_payload=True)
    assert ex.client_body is not None and ex.client_body["messages"][0]["content"] != "set by a hook"
    rec = orjson.loads(pj.exchange(ex).body)
    assert rec["prompt"]["system_sha256"] == hashlib.sha256(b"set by a hook").hexdigest()
