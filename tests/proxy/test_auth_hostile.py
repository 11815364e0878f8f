"""Hostile input at the JWT front end: every case is a typed 401 naming its rule, never a 500.

The security review's reproductions (a non-string ``kid``, a ``crit`` header,
a non-ASCII character in the token, ``nbf: "0"``) and the RFC 8725 attack list,
first against :class:`~proxy.auth.Authenticator` directly, then through both
listeners of a running Warden (the data plane and the admin API): an
OpenAI-format 401 that names an ``auth.*`` rule, no traceback in the log,
and the token never echoed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from llm_warden.proxy.auth import Authenticator
from llm_warden.proxy.config import AuthConfig, load_config
from llm_warden.proxy.errors import ConfigError, Unauthorized
from llm_warden.proxy.exchange import Principal
from tests.conftest import AUDIENCE, ISSUER, Keys, WardenFactory

HS_SECRET = "hostile-input-test-secret-0123456789abcdef"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def enc(value: Any) -> str:
    """JSON (the stdlib's: it writes big ints and Infinity, which orjson refuses) as a base64url segment."""
    return b64(json.dumps(value).encode())


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "tenant": "acme", "groups": ["staff"], "scope": "read", "iat": now, "exp": now + 600}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def hs_sign(header: Any, payload: Any, secret: str = HS_SECRET) -> str:
    """A compact JWS signed with HMAC-SHA256 over whatever header and payload are given (no checks)."""
    signing_input = f"{enc(header)}.{enc(payload)}"
    return f"{signing_input}.{b64(hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest())}"


def hs_sign_raw(header_seg: str, payload_seg: str, secret: str = HS_SECRET) -> str:
    signing_input = f"{header_seg}.{payload_seg}"
    return f"{signing_input}.{b64(hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest())}"


def rs_sign(keys: Keys, header: Any, payload: Any) -> str:
    """A compact JWS signed with RS256 over whatever header and payload are given (no checks)."""
    priv = serialization.load_pem_private_key(keys.private_pem, password=None)
    assert isinstance(priv, rsa.RSAPrivateKey)
    signing_input = f"{enc(header)}.{enc(payload)}"
    return f"{signing_input}.{b64(priv.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()))}"


@pytest.fixture
def hs_auth(monkeypatch: pytest.MonkeyPatch) -> Authenticator:
    monkeypatch.setenv("HOSTILE_HS_SECRET", HS_SECRET)
    return Authenticator(AuthConfig(algorithms=["HS256"], issuer=ISSUER, audience=AUDIENCE, hs256_secret_env="HOSTILE_HS_SECRET", leeway_s=0))


@pytest.fixture
def rs_auth(rsa_keys: Keys) -> Authenticator:
    return Authenticator(AuthConfig(algorithms=["RS256"], issuer=ISSUER, audience=AUDIENCE, public_key_file=str(rsa_keys.public_path), leeway_s=0))


async def refused(auth: Authenticator, header_value: str, rule: str) -> Unauthorized:
    """Authenticating ``header_value`` raises a 401 naming ``rule``, and its message echoes no part of the token."""
    with pytest.raises(Unauthorized) as ei:
        await auth.authenticate(header_value)
    err = ei.value
    assert (err.status, err.rule) == (401, rule), err.to_dict()
    assert err.to_dict()["error"]["type"] == "authentication_error"
    token = header_value.partition(" ")[2].strip()
    message = err.to_dict()["error"]["message"]
    for part in token.split("."):
        if len(part) >= 4:
            assert part not in message, "a refusal must not echo the token"
    return err


# -- the review's reproductions ------------------------------------------------------------------

H = {"alg": "HS256", "typ": "JWT"}


@pytest.mark.parametrize("kid", [5, 1.5, True, None, ["k1"], {"k": "v"}])
async def test_a_kid_that_is_not_a_string_is_refused(hs_auth: Authenticator, kid: Any) -> None:
    await refused(hs_auth, "Bearer " + hs_sign({**H, "kid": kid}, claims()), "auth.kid")


@pytest.mark.parametrize("crit", [["exp"], [], ["b64"], "exp", None, [5], ["kid"]])
async def test_every_crit_header_is_refused(hs_auth: Authenticator, crit: Any) -> None:
    """RFC 7515 §4.1.11: an extension listed in ``crit`` that is not understood must be refused; none is understood."""
    await refused(hs_auth, "Bearer " + hs_sign({**H, "crit": crit}, claims()), "auth.header")


async def test_b64_false_is_refused_with_or_without_crit(hs_auth: Authenticator) -> None:
    await refused(hs_auth, "Bearer " + hs_sign({**H, "b64": False}, claims()), "auth.header")
    await refused(hs_auth, "Bearer " + hs_sign({**H, "b64": False, "crit": ["b64"]}, claims()), "auth.header")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: "é" + t,
        lambda t: t + "é",
        lambda t: t.replace(".", ".é", 1),
        lambda t: "\udcff" + t,  # what aiohttp hands over for an undecodable byte (surrogateescape)
        lambda t: t[:10] + "\x00" + t[10:],
        lambda t: t[:10] + " " + t[10:],
        lambda t: t[:10] + "\t" + t[10:],
        lambda t: t + "=",
        lambda t: t.replace("-", "+").replace("_", "/") + "+/",
        lambda t: "\ufeff" + t,
        lambda t: t.replace("e", "е"),  # Cyrillic small ie, a look-alike
    ],
)
async def test_characters_outside_base64url_are_refused_before_decoding(hs_auth: Authenticator, mangle: Callable[[str], str]) -> None:
    await refused(hs_auth, "Bearer " + mangle(hs_sign(H, claims())), "auth.malformed")


@pytest.mark.parametrize("around", ["\r", "\n", "\x85", "\u2028", "\x0b", "\x1c", "\u3000"])
async def test_only_http_whitespace_around_a_token_is_ignored(hs_auth: Authenticator, around: str) -> None:
    """Fuzzer finding: str.strip() removed any Unicode whitespace around the token, which was then accepted."""
    token = hs_sign(H, claims())
    await refused(hs_auth, f"Bearer {around}{token}", "auth.malformed")
    await refused(hs_auth, f"Bearer {token}{around}", "auth.malformed")
    assert (await hs_auth.authenticate(f"Bearer \t {token} \t")).subject == "alice"


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "json_value",
    ['"0"', '"1700000000"', "true", "false", "null", "[1]", '{"t": 1}', "1" + "0" * 400, "-1" + "0" * 400, "1e400", "-1e400", "3e14", "-3e14"],
)
async def test_numeric_date_claims_of_the_wrong_type_are_refused(hs_auth: Authenticator, name: str, json_value: str) -> None:
    """``nbf: "0"`` was accepted while other type errors were refused; ``exp: 1e400`` (inf) or a 400-digit int crashed."""
    payload = json.dumps(claims(**{name: "@VALUE@"})).replace('"@VALUE@"', json_value)
    await refused(hs_auth, "Bearer " + hs_sign_raw(enc(H), b64(payload.encode())), "auth.claims")


async def test_numeric_dates_may_be_floats_and_negative_nbf_iat(hs_auth: Authenticator) -> None:
    now = time.time()
    p = await hs_auth.authenticate("Bearer " + hs_sign(H, claims(exp=now + 60.5, nbf=-5, iat=now - 0.25)))
    assert p.subject == "alice"


# -- claims that become header values and log fields ---------------------------------------------

CONTROL = ["\r\n", "\n", "\r", "\x00", "\x1b[31m", "\x7f", "\x85", "\x9b", "\u2028", "\u2029", "\u200b", "\ud800", "\udcff"]


@pytest.mark.parametrize("bad", CONTROL)
@pytest.mark.parametrize(
    "claim,rule",
    [("tenant", "auth.tenant_claim"), ("sub", "auth.subject_claim"), ("groups", "auth.groups_claim"), ("scope", "auth.scopes_claim")],
)
async def test_unprintable_characters_in_identity_claims_are_refused(hs_auth: Authenticator, bad: str, claim: str, rule: str) -> None:
    value: Any = f"evil{bad}x-injected: 1"
    if claim == "groups":
        value = ["staff", value]
    elif claim == "scope":
        value = ["read", value]
    await refused(hs_auth, "Bearer " + hs_sign(H, claims(**{claim: value})), rule)


@pytest.mark.parametrize(
    "over,rule",
    [
        ({"tenant": ""}, "auth.tenant_claim"),
        ({"sub": ["alice"]}, "auth.subject_claim"),
        ({"groups": [""]}, "auth.groups_claim"),
        ({"groups": ["a", None]}, "auth.groups_claim"),
        ({"groups": {"a": 1}}, "auth.groups_claim"),
        ({"scope": ["read", ""]}, "auth.scopes_claim"),
        ({"scope": 7}, "auth.scopes_claim"),
    ],
)
async def test_identity_claims_of_the_wrong_shape_are_refused(hs_auth: Authenticator, over: dict[str, Any], rule: str) -> None:
    await refused(hs_auth, "Bearer " + hs_sign(H, claims(**over)), rule)


@pytest.fixture
def roomy_auth(monkeypatch: pytest.MonkeyPatch) -> Authenticator:
    """HS256 with room for 256 groups of 256 characters (the default token cap would refuse those first)."""
    monkeypatch.setenv("HOSTILE_HS_SECRET", HS_SECRET)
    return Authenticator(
        AuthConfig(algorithms=["HS256"], issuer=ISSUER, audience=AUDIENCE, hs256_secret_env="HOSTILE_HS_SECRET", max_token_bytes=1 << 20)
    )


async def test_identity_claims_are_bounded(roomy_auth: Authenticator) -> None:
    a = roomy_auth
    at_limit = await a.authenticate("Bearer " + hs_sign(H, claims(tenant="t" * 256, sub="s" * 256, groups=[f"{i:03d}" + "g" * 253 for i in range(256)])))
    assert (len(at_limit.tenant), len(at_limit.subject), len(at_limit.groups)) == (256, 256, 256)
    await refused(a, "Bearer " + hs_sign(H, claims(tenant="t" * 257)), "auth.max_claim_chars")
    await refused(a, "Bearer " + hs_sign(H, claims(sub="s" * 257)), "auth.max_claim_chars")
    await refused(a, "Bearer " + hs_sign(H, claims(groups=["g" * 257])), "auth.max_claim_chars")
    await refused(a, "Bearer " + hs_sign(H, claims(groups=[f"g{i}" for i in range(257)])), "auth.max_claim_items")
    await refused(a, "Bearer " + hs_sign(H, claims(scope=" ".join(f"s{i}" for i in range(257)))), "auth.max_claim_items")
    await refused(a, "Bearer " + hs_sign(H, claims(scope=["x" * 257])), "auth.max_claim_chars")


# -- token size ----------------------------------------------------------------------------------


async def test_token_size_cap_is_exact_and_comes_before_decoding(hs_auth: Authenticator) -> None:
    limit = hs_auth.cfg.max_token_bytes
    assert limit == 8192, "the documented default"
    # A valid token of exactly the cap is accepted (a filler claim grows it one base64 character at a time).
    token = ""
    for n in range(5000, 7000):
        token = hs_sign(H, claims(filler="f" * n))
        if len(token) == limit:
            break
    assert len(token) == limit
    assert (await hs_auth.authenticate(f"Bearer {token}")).subject == "alice"
    longer = hs_sign(H, claims(filler="f" * (n + 3)))
    assert len(longer) > limit
    await refused(hs_auth, f"Bearer {longer}", "auth.max_token_bytes")
    # Garbage that decoding would call malformed is refused for its size: the size test runs first.
    await refused(hs_auth, "Bearer " + "é" * (limit + 1), "auth.max_token_bytes")
    await refused(hs_auth, "Bearer " + "." * (limit + 1), "auth.max_token_bytes")


def test_token_and_claim_bounds_are_validated_config_keys() -> None:
    base = {"algorithms": ["HS256"], "issuer": "i", "audience": "a", "hs256_secret_env": "X"}
    for key, value in [("max_token_bytes", 255), ("max_token_bytes", (1 << 20) + 1), ("max_claim_chars", 0), ("max_claim_items", 0), ("max_claim_items", 10001)]:
        with pytest.raises(ConfigError, match=f"auth.{key}"):
            load_config({"auth": {**base, key: value}, "plugins": {"enabled": []}}, {})
    cfg = load_config({"auth": base, "plugins": {"enabled": []}}, {})
    assert (cfg.auth.max_token_bytes, cfg.auth.max_claim_chars, cfg.auth.max_claim_items) == (8192, 256, 256)
    example = (Path(__file__).resolve().parents[2] / "config.example.toml").read_text()
    for line in ("max_token_bytes = 8192", "max_claim_chars = 256", "max_claim_items = 256"):
        assert line in example


# -- the attack list -----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", "", None, 5, ["HS256"]])
@pytest.mark.parametrize("sig", ["", "c2lnbmF0dXJl"])
async def test_alg_none_and_non_string_algs(hs_auth: Authenticator, rs_auth: Authenticator, alg: Any, sig: str) -> None:
    token = f"{enc({'alg': alg, 'typ': 'JWT'})}.{enc(claims())}.{sig}"
    for a in (hs_auth, rs_auth):
        await refused(a, f"Bearer {token}", "auth.algorithms")


async def test_an_unplain_alg_is_not_echoed(hs_auth: Authenticator) -> None:
    err = await refused(hs_auth, "Bearer " + hs_sign({"alg": "\r\nX-Evil: 1"}, claims()), "auth.algorithms")
    assert "Evil" not in err.message
    err = await refused(hs_auth, "Bearer " + hs_sign({"alg": "RS256"}, claims()), "auth.algorithms")
    assert "'RS256'" in err.message


async def test_algorithm_confusion_hs256_signed_with_the_rsa_public_key(rs_auth: Authenticator, rsa_keys: Keys) -> None:
    for pem in (rsa_keys.public_pem, rsa_keys.public_pem.strip()):
        signing_input = f"{enc({'alg': 'HS256', 'typ': 'JWT'})}.{enc(claims())}"
        sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        await refused(rs_auth, f"Bearer {signing_input}.{b64(sig)}", "auth.algorithms")


async def test_an_rs256_token_is_refused_by_an_hs256_configuration(hs_auth: Authenticator, rsa_keys: Keys) -> None:
    await refused(hs_auth, "Bearer " + rs_sign(rsa_keys, {"alg": "RS256"}, claims()), "auth.algorithms")


async def test_time_claims(hs_auth: Authenticator) -> None:
    now = int(time.time())
    err = await refused(hs_auth, "Bearer " + hs_sign(H, claims(exp=now - 1)), "auth.exp")
    assert err.code == "token_expired"
    await refused(hs_auth, "Bearer " + hs_sign(H, claims(nbf=now + 3600)), "auth.nbf")
    await refused(hs_auth, "Bearer " + hs_sign(H, claims(iat=now + 3600)), "auth.iat")


@pytest.mark.parametrize(
    "over,rule",
    [
        ({"iss": "https://evil.test"}, "auth.issuer"),
        ({"iss": [ISSUER]}, "auth.issuer"),
        ({"iss": 1}, "auth.issuer"),
        ({"aud": "another"}, "auth.audience"),
        ({"aud": ["another", "more"]}, "auth.audience"),
        ({"aud": [AUDIENCE, 5]}, "auth.audience"),
        ({"aud": []}, "auth.audience"),
        ({"aud": {"a": AUDIENCE}}, "auth.audience"),
    ],
)
async def test_wrong_issuer_and_audience(hs_auth: Authenticator, over: dict[str, Any], rule: str) -> None:
    await refused(hs_auth, "Bearer " + hs_sign(H, claims(**over)), rule)


async def test_audience_list_holding_ours_is_accepted(hs_auth: Authenticator) -> None:
    assert (await hs_auth.authenticate("Bearer " + hs_sign(H, claims(aud=["other", AUDIENCE])))).tenant == "acme"


@pytest.mark.parametrize("claim", ["exp", "iss", "aud"])
async def test_missing_required_claims(hs_auth: Authenticator, claim: str) -> None:
    c = claims()
    del c[claim]
    await refused(hs_auth, "Bearer " + hs_sign(H, c), "auth.claims")


@pytest.mark.parametrize("hdr", [{"jku": "https://evil.test/jwks"}, {"x5u": "https://evil.test/c"}, {"jwk": {"kty": "oct", "k": "AAAA"}}, {"x5c": ["MIIB"]}])
async def test_key_carrying_headers_are_refused(hs_auth: Authenticator, rs_auth: Authenticator, rsa_keys: Keys, hdr: dict[str, Any]) -> None:
    await refused(hs_auth, "Bearer " + hs_sign({**H, **hdr}, claims()), "auth.header")
    await refused(rs_auth, "Bearer " + rs_sign(rsa_keys, {"alg": "RS256", **hdr}, claims()), "auth.header")


GOOD_H = enc(H)
GOOD_P = enc(claims(exp=4102444800))  # 2100-01-01: the segment stays valid while the test runs
_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def twin(seg: str) -> str:
    """Another spelling of the same bytes: the last character's unused low bits set (needs len % 4 in (2, 3))."""
    assert len(seg) % 4 in (2, 3)
    other = seg[:-1] + _B64URL[_B64URL.index(seg[-1]) ^ 1]
    assert base64.urlsafe_b64decode(other + "=" * (-len(other) % 4)) == base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
    return other


H16 = b64(b'{"alg":"HS256" }')  # 16 bytes: 22 characters, 4 unused bits


@pytest.mark.parametrize(
    "header_seg,payload_seg",
    [
        # header: not base64url, a length no encoding has, not canonical, not UTF-8, not JSON, not an object,
        # duplicate members, NaN, nesting beyond the parser's depth
        ("e", GOOD_P),
        (GOOD_H + "x", GOOD_P),
        (twin(H16), GOOD_P),
        (b64(b"\xff\xfe{}"), GOOD_P),
        (b64(b"{alg: HS256}"), GOOD_P),
        (enc(["HS256"]), GOOD_P),
        (enc("HS256"), GOOD_P),
        (enc(None), GOOD_P),
        (b64(b'{"alg":"HS256","alg":"HS256"}'), GOOD_P),
        (b64(b'{"alg":"HS256","x":NaN}'), GOOD_P),
        (b64(b'{"alg":"HS256","x":' + b"[" * 2000 + b"]" * 2000 + b"}"), GOOD_P),
        ("", GOOD_P),
        # payload: the same for the second segment
        (GOOD_H, "e"),
        (GOOD_H, b64(b"\xc3\x28")),
        (GOOD_H, b64(b"not json")),
        (GOOD_H, enc([claims()])),
        (GOOD_H, enc(42)),
        (GOOD_H, b64(b'{"sub":"alice","sub":"mallory"}')),
        (GOOD_H, b64(b'{"exp":Infinity}')),
        (GOOD_H, b64(b'{"exp":1,"x":' + b"[" * 1500 + b"]" * 1500 + b"}")),
        (GOOD_H, b64(b'{"exp":' + b"9" * 5000 + b"}")),
        (GOOD_H, ""),
        (GOOD_H, twin(GOOD_P) if len(GOOD_P) % 4 in (2, 3) else GOOD_P + "x"),
    ],
)
async def test_malformed_segments_signed_with_the_right_key(hs_auth: Authenticator, header_seg: str, payload_seg: str) -> None:
    """Each segment's encoding and JSON, broken one way at a time, with a valid HMAC over them."""
    await refused(hs_auth, "Bearer " + hs_sign_raw(header_seg, payload_seg), "auth.malformed")


async def test_malformed_signature_segment(hs_auth: Authenticator) -> None:
    good = hs_sign(H, claims())
    h, p, s = good.split(".")
    await refused(hs_auth, f"Bearer {h}.{p}.{s}xx", "auth.malformed")  # 45 characters: no base64 has that length
    # The last character of a 43-character segment carries 2 unused bits: a different character can decode to the
    # same bytes. Only the canonical one is accepted, so a signature has one spelling.
    await refused(hs_auth, f"Bearer {h}.{p}.{twin(s)}", "auth.malformed")
    assert (await hs_auth.authenticate(f"Bearer {good}")).subject == "alice"


async def test_stripped_and_foreign_signatures(hs_auth: Authenticator, rsa_keys: Keys) -> None:
    h, p, _ = hs_sign(H, claims()).split(".")
    await refused(hs_auth, f"Bearer {h}.{p}.", "auth.signature")
    await refused(hs_auth, "Bearer " + hs_sign(H, claims(), secret="another-secret-of-enough-length-0123456789"), "auth.signature")
    await refused(hs_auth, "Bearer " + hs_sign(H, claims())[:-4] + "AAAA", "auth.signature")


@pytest.mark.parametrize("token", ["a.b.c.d.e", f"{enc({'alg': 'RSA-OAEP', 'enc': 'A256GCM'})}.x.y.z.w"])
async def test_jwe_is_refused(hs_auth: Authenticator, token: str) -> None:
    await refused(hs_auth, f"Bearer {token}", "auth.jwe")


@pytest.mark.parametrize("token", ["x", "a.b", "a.b.c.d", "a.b.c.d.e.f", ".", "..", "...", "." * 10])
async def test_wrong_number_of_segments(hs_auth: Authenticator, token: str) -> None:
    await refused(hs_auth, f"Bearer {token}", "auth.malformed")


@pytest.mark.parametrize("header_value", ["Bearer", "Bearer ", "bearer    ", "Basic abc", "Token x.y.z", "Bearer\tx.y.z", "\x00", " " * 100])
async def test_wrong_schemes(hs_auth: Authenticator, header_value: str) -> None:
    await refused(hs_auth, header_value, "auth.scheme")


async def test_typ_and_cty_must_be_strings(hs_auth: Authenticator) -> None:
    await refused(hs_auth, "Bearer " + hs_sign({**H, "typ": 5}, claims()), "auth.header")
    await refused(hs_auth, "Bearer " + hs_sign({**H, "cty": ["JWT"]}, claims()), "auth.header")


async def test_jwks_key_of_another_family_is_refused(rsa_keys: Keys) -> None:
    """A JWKS publishing an HMAC (``oct``) key under a kid must not verify a token: the key family must fit ``alg``."""
    from aiohttp import web

    oct_jwk = {"kty": "oct", "k": b64(HS_SECRET.encode()), "kid": "k-oct"}
    served: list[Any] = [{"keys": [oct_jwk, 5, "x", {"kid": 7}, {"kid": "broken", "kty": "RSA"}]}]

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(served[0])

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/jwks"
    a = Authenticator(AuthConfig(algorithms=["RS256"], issuer=ISSUER, audience=AUDIENCE, jwks_url=url, jwks_min_refresh_s=0))
    try:
        # An RS256 header with the oct key's kid, HMAC-signed with the oct secret: the key does not fit RS256.
        await refused(a, "Bearer " + hs_sign({"alg": "RS256", "kid": "k-oct"}, claims()), "auth.key")
        await refused(a, "Bearer " + rs_sign(rsa_keys, {"alg": "RS256", "kid": "broken"}, claims()), "auth.kid")
        for bad in ({"keys": 5}, {"keys": {"a": 1}}, [1, 2], "keys"):
            served[0] = bad
            a._jwks.fetched_at = 0  # type: ignore[union-attr]
            await refused(a, "Bearer " + rs_sign(rsa_keys, {"alg": "RS256", "kid": "k1"}, claims()), "auth.kid")
    finally:
        await a.close()
        await runner.cleanup()


async def test_a_valid_token_still_works_and_is_cached(hs_auth: Authenticator) -> None:
    token = hs_sign(H, claims(groups=["a", "b"], scope=["x", "y"]))
    p = await hs_auth.authenticate(f"Bearer {token}")
    assert p == Principal(tenant="acme", subject="alice", groups=frozenset({"a", "b"}), scopes=frozenset({"x", "y"}))
    assert len(hs_auth._cache) == 1
    assert await hs_auth.authenticate(f"Bearer  {token}  ") is p


async def test_an_unforeseen_failure_is_a_401_and_one_log_line(hs_auth: Authenticator, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: were PyJWT to raise something unforeseen, the caller still gets a 401 (fail closed)."""

    def boom(*a: Any, **k: Any) -> Any:
        raise OverflowError("simulated")

    monkeypatch.setattr(hs_auth._jws, "decode_complete", boom)
    token = hs_sign(H, claims())
    with caplog.at_level(logging.WARNING, logger="warden.auth"):
        await refused(hs_auth, f"Bearer {token}", "auth.malformed")
    lines = [r for r in caplog.records if r.name == "warden.auth"]
    assert len(lines) == 1 and lines[0].exc_info is None and "OverflowError" in lines[0].getMessage()
    assert token.split(".")[1] not in lines[0].getMessage()


# -- through both listeners ----------------------------------------------------------------------


def _review_cases(keys: Keys) -> dict[str, bytes]:
    """The review's reproductions as raw ``Authorization`` values (bytes: some are not valid UTF-8)."""
    good = rs_sign(keys, {"alg": "RS256"}, claims())
    return {
        "kid_int": rs_sign(keys, {"alg": "RS256", "kid": 5}, claims()).encode(),
        "crit": rs_sign(keys, {"alg": "RS256", "crit": ["exp"]}, claims()).encode(),
        "non_ascii": "é".encode() + good.encode(),
        "invalid_utf8": b"\xff" + good.encode(),
        "nbf_string": rs_sign(keys, {"alg": "RS256"}, claims(nbf="0")).encode(),
        "exp_huge": rs_sign(keys, {"alg": "RS256"}, claims(exp=10**400)).encode(),
        "tenant_crlf": rs_sign(keys, {"alg": "RS256"}, claims(tenant="acme\r\nx-evil: 1")).encode(),
        "subject_surrogate": rs_sign(keys, {"alg": "RS256"}, claims(sub="\ud800")).encode(),
        "group_nul": rs_sign(keys, {"alg": "RS256"}, claims(groups=["a\x00b"])).encode(),
        "tenant_long": rs_sign(keys, {"alg": "RS256"}, claims(tenant="t" * 300)).encode(),
        "header_list": f"{enc(['RS256'])}.{enc(claims())}.AAAA".encode(),
    }


async def _raw_get(url: str, path: str, authorization: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (clients refuse to send some of these header values)."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: warden\r\nAuthorization: Bearer " + authorization + b"\r\nConnection: close\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


_CASES = ["kid_int", "crit", "non_ascii", "invalid_utf8", "nbf_string", "exp_huge", "tenant_crlf", "subject_surrogate", "group_nul", "tenant_long", "header_list"]


@pytest.mark.parametrize(
    "listener,case",
    [pytest.param(listener, case) for listener in ("data", "admin") for case in _CASES],
)
async def test_review_cases_through_both_listeners(
    warden_factory: WardenFactory, rsa_keys: Keys, caplog: pytest.LogCaptureFixture, listener: str, case: str
) -> None:
    rw = await warden_factory()
    authorization = _review_cases(rsa_keys)[case]
    url, path = (rw.base_url, "/v1/models") if listener == "data" else (rw.admin_url, "/admin/reload")
    with caplog.at_level(logging.INFO):
        status, body = await _raw_get(url, path, authorization)
    assert status == 401, body[:300]
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["type"] == "authentication_error" and "(rule: auth." in err["message"]
    for part in authorization.split(b"."):
        if len(part) >= 4:
            assert part not in body, "the token must not be echoed"
    # Warden's and its HTTP server's log lines: a client another test leaked can be finalised (and
    # complain on the "asyncio" logger that its loop is closed) at any moment of this one.
    ours = [r for r in caplog.records if r.name.split(".")[0] in ("warden", "aiohttp")]
    assert not [r for r in ours if r.exc_info or r.exc_text or r.levelno >= logging.ERROR], "no traceback, no error line"
