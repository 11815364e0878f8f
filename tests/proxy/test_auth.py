"""JWT verification against the attack list of RFC 8725 and REFERENCE.md."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from llm_warden.proxy.auth import Authenticator
from llm_warden.proxy.config import AuthConfig
from llm_warden.proxy.errors import ConfigError, Unauthorized
from tests.conftest import AUDIENCE, ISSUER, Keys, make_token


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], sig: bytes = b"") -> str:
    return f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(claims))}.{_b64(sig)}"


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    c = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "tenant": "acme", "groups": ["staff"], "scope": "read write", "exp": now + 600}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


@pytest.fixture
def auth(rsa_keys: Keys) -> Authenticator:
    cfg = AuthConfig(algorithms=["RS256"], issuer=ISSUER, audience=AUDIENCE, public_key_file=str(rsa_keys.public_path))
    return Authenticator(cfg)


async def _refused(auth: Authenticator, token: str, rule: str) -> Unauthorized:
    with pytest.raises(Unauthorized) as ei:
        await auth.authenticate(f"Bearer {token}")
    assert ei.value.rule == rule, ei.value.to_dict()
    assert ei.value.status == 401
    return ei.value


async def test_valid_token_gives_principal(auth: Authenticator, rsa_keys: Keys) -> None:
    p = await auth.authenticate("Bearer " + make_token(rsa_keys, groups=["billing", "staff"], scope="a b"))
    assert (p.tenant, p.subject, p.groups, p.scopes) == ("acme", "alice", frozenset({"billing", "staff"}), frozenset({"a", "b"}))


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_variants(auth: Authenticator, alg: str) -> None:
    await _refused(auth, _forge({"alg": alg, "typ": "JWT"}, _claims()), "auth.algorithms")


async def test_hs256_signed_with_the_public_key_is_refused(auth: Authenticator, rsa_keys: Keys) -> None:
    header = _b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    payload = _b64(orjson.dumps(_claims()))
    sig = hmac.new(rsa_keys.public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    await _refused(auth, f"{header}.{payload}.{_b64(sig)}", "auth.algorithms")


async def test_expired(auth: Authenticator, rsa_keys: Keys) -> None:
    err = await _refused(auth, make_token(rsa_keys, exp_in=-3600), "auth.exp")
    assert err.code == "token_expired"


async def test_nbf_in_future(auth: Authenticator, rsa_keys: Keys) -> None:
    await _refused(auth, make_token(rsa_keys, nbf=int(time.time()) + 3600), "auth.nbf")


async def test_wrong_issuer_and_audience(auth: Authenticator, rsa_keys: Keys) -> None:
    await _refused(auth, make_token(rsa_keys, iss="https://evil.test"), "auth.issuer")
    await _refused(auth, make_token(rsa_keys, aud="another-service"), "auth.audience")


@pytest.mark.parametrize("claim", ["exp", "iss", "aud"])
async def test_missing_required_claim(auth: Authenticator, rsa_keys: Keys, claim: str) -> None:
    claims = _claims()
    del claims[claim]
    await _refused(auth, jwt.encode(claims, rsa_keys.private_pem, algorithm="RS256"), "auth.claims")


@pytest.mark.parametrize("hdr", [{"jku": "https://evil.test/jwks"}, {"x5u": "https://evil.test/cert"}, {"jwk": {"kty": "oct", "k": "AAAA"}}])
async def test_key_url_headers_refused(auth: Authenticator, rsa_keys: Keys, hdr: dict[str, Any]) -> None:
    token = jwt.encode(_claims(), rsa_keys.private_pem, algorithm="RS256", headers=hdr)
    await _refused(auth, token, "auth.header")


@pytest.mark.parametrize("token", ["not-a-token", "a.b.c", "!!!.@@@.###", "eyJhbGciOiJSUzI1NiJ9.eyJ.sig", "...."])
async def test_malformed(auth: Authenticator, token: str) -> None:
    with pytest.raises(Unauthorized) as ei:
        await auth.authenticate(f"Bearer {token}")
    assert ei.value.rule in {"auth.malformed", "auth.jwe", "auth.algorithms"}


async def test_stripped_and_tampered_signature(auth: Authenticator, rsa_keys: Keys) -> None:
    good = make_token(rsa_keys)
    h, p, _ = good.split(".")
    await _refused(auth, f"{h}.{p}.", "auth.signature")
    tampered_payload = _b64(orjson.dumps(_claims(tenant="other-tenant")))
    await _refused(auth, f"{h}.{tampered_payload}.{good.split('.')[2]}", "auth.signature")


async def test_jwe_and_oversized(auth: Authenticator) -> None:
    await _refused(auth, "a.b.c.d.e", "auth.jwe")
    await _refused(auth, "a." + "b" * 9000 + ".c", "auth.max_token_bytes")


@pytest.mark.parametrize(
    "over,rule",
    [
        ({"groups": "admins"}, "auth.groups_claim"),
        ({"groups": [1, 2]}, "auth.groups_claim"),
        ({"tenant": None}, "auth.tenant_claim"),
        ({"tenant": 42}, "auth.tenant_claim"),
        ({"sub": ""}, "auth.subject_claim"),
        ({"scope": {"a": 1}}, "auth.scopes_claim"),
    ],
)
async def test_wrong_claim_types(auth: Authenticator, rsa_keys: Keys, over: dict[str, Any], rule: str) -> None:
    await _refused(auth, jwt.encode(_claims(**over), rsa_keys.private_pem, algorithm="RS256"), rule)


async def test_another_key_is_refused(auth: Authenticator) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    await _refused(auth, jwt.encode(_claims(), pem, algorithm="RS256"), "auth.signature")


async def test_cache_never_serves_past_exp(auth: Authenticator, rsa_keys: Keys) -> None:
    auth.cfg.leeway_s = 0
    token = make_token(rsa_keys, exp_in=2)
    assert (await auth.authenticate(f"Bearer {token}")).subject == "alice"
    assert len(auth._cache) == 1
    await asyncio.sleep(2.1)
    await _refused(auth, token, "auth.exp")


async def test_missing_and_wrong_scheme(auth: Authenticator) -> None:
    with pytest.raises(Unauthorized) as ei:
        await auth.authenticate(None)
    assert ei.value.code == "missing_token"
    with pytest.raises(Unauthorized) as ei:
        await auth.authenticate("Basic dXNlcjpwYXNz")
    assert ei.value.rule == "auth.scheme"


def test_config_refuses_short_hs_secret_and_mixing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORT_SECRET", "too-short")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        Authenticator(AuthConfig(algorithms=["HS256"], issuer="i", audience="a", hs256_secret_env="SHORT_SECRET"))
    from llm_warden.proxy.config import load_config

    with pytest.raises(ConfigError, match="cannot be mixed"):
        load_config({"auth": {"algorithms": ["HS256", "RS256"], "issuer": "i", "audience": "a", "public_key_file": "k.pem"}}, {})


def test_config_refuses_key_of_the_wrong_family(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.pem"
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match="does not match"):
        Authenticator(AuthConfig(algorithms=["RS256"], issuer="i", audience="a", public_key_file=str(path)))


async def test_es256_and_hs256_work_when_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.pem"
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    a = Authenticator(AuthConfig(algorithms=["ES256"], issuer=ISSUER, audience=AUDIENCE, public_key_file=str(path)))
    assert (await a.authenticate("Bearer " + jwt.encode(_claims(), key, algorithm="ES256"))).tenant == "acme"
    secret = "s" * 40
    monkeypatch.setenv("HS_SECRET", secret)
    h = Authenticator(AuthConfig(algorithms=["HS256"], issuer=ISSUER, audience=AUDIENCE, hs256_secret_env="HS_SECRET"))
    assert (await h.authenticate("Bearer " + jwt.encode(_claims(), secret, algorithm="HS256"))).subject == "alice"


async def test_jwks_refetch_on_unknown_kid_is_rate_limited(rsa_keys: Keys) -> None:
    from aiohttp import web

    from llm_warden.proxy.auth import JWKSCache  # noqa: F401  (the cache under test)

    pub = serialization.load_pem_public_key(rsa_keys.public_pem)
    jwk = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(pub))  # type: ignore[arg-type]
    state = {"fetches": 0, "keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}

    async def jwks(request: web.Request) -> web.Response:
        state["fetches"] += 1
        return web.json_response({"keys": state["keys"]})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/jwks"
    try:
        a = Authenticator(AuthConfig(algorithms=["RS256"], issuer=ISSUER, audience=AUDIENCE, jwks_url=url, jwks_min_refresh_s=60))
        tok = jwt.encode(_claims(), rsa_keys.private_pem, algorithm="RS256", headers={"kid": "k1"})
        assert (await a.authenticate(f"Bearer {tok}")).subject == "alice"
        assert state["fetches"] == 1
        for i in range(20):
            bad = jwt.encode(_claims(sub=f"u{i}"), rsa_keys.private_pem, algorithm="RS256", headers={"kid": f"random-{i}"})
            with pytest.raises(Unauthorized) as ei:
                await a.authenticate(f"Bearer {bad}")
            assert ei.value.rule == "auth.kid"
        assert state["fetches"] == 1, "random kids must not trigger a fetch each"
        a._jwks.fetched_at -= 61  # type: ignore[union-attr]
        state["keys"].append({**jwk, "kid": "k2", "use": "sig", "alg": "RS256"})
        tok2 = jwt.encode(_claims(), rsa_keys.private_pem, algorithm="RS256", headers={"kid": "k2"})
        assert (await a.authenticate(f"Bearer {tok2}")).subject == "alice"
        assert state["fetches"] == 2, "a rotated key is picked up after the refresh interval"
        # k1 is withdrawn: once the JWKS cache lifetime has passed, a cached token signed with it is refused
        state["keys"] = [k for k in state["keys"] if k["kid"] != "k1"]
        cached_until = [until for _, until in a._cache.values()]
        assert all(u <= time.time() + a.cfg.jwks_cache_s + 1 for u in cached_until), "cached no longer than the JWKS lifetime"
        for key, (p, _) in list(a._cache.items()):  # let that lifetime pass
            a._cache[key] = (p, time.time() - 1)
        a._jwks.fetched_at -= a.cfg.jwks_cache_s + 1  # type: ignore[union-attr]
        with pytest.raises(Unauthorized) as ei:
            await a.authenticate(f"Bearer {tok}")
        assert ei.value.rule == "auth.kid"
        await a.close()
    finally:
        await runner.cleanup()


async def test_refusals_through_the_server_are_openai_errors(warden: Any, rsa_keys: Keys, fake: Any) -> None:
    import aiohttp

    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    cases = [
        (None, "missing_token"),
        ("Bearer " + make_token(rsa_keys, exp_in=-100), "token_expired"),
        ("Bearer " + _forge({"alg": "none"}, _claims()), "invalid_token"),
    ]
    async with aiohttp.ClientSession() as s:
        for header, code in cases:
            headers = {"Authorization": header} if header else {}
            async with s.post(f"{warden.base_url}/chat/completions", json=body, headers=headers) as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert r.headers["x-request-id"]
                err = (await r.json())["error"]
                assert err["code"] == code and err["type"] == "authentication_error"
                assert "rule: auth." in err["message"]
    assert fake.chat_requests() == [], "nothing reaches the provider without a valid token"
