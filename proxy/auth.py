"""Caller identity: verify a JWT and derive a :class:`Principal`.

Follows RFC 8725: algorithms come from configuration only, ``none`` is never
accepted, key type must match the algorithm family, keys are never fetched
from URLs named in a token, and ``exp``/``iss``/``aud`` are always required.
Verified tokens are cached (keyed by a hash of the token, bounded, never past
``exp``) so a signature is checked once per token, not once per request.

The token is hostile input until its signature is checked, so it is parsed
here, strictly, before PyJWT sees it: at most ``[auth] max_token_bytes``
characters of the base64url alphabet and dots (anything else, a non-ASCII
character included, is refused before decoding), canonical base64url
segments, JSON objects without duplicate members or non-finite numbers, and
a header without ``crit`` (no extension is understood, so RFC 7515 §4.1.11
requires refusing every one), ``b64`` or a key URL.  PyJWT then checks the
signature only; the claims are validated here, with exact types
(``exp``/``nbf``/``iat`` are numbers, never strings or booleans).  Claims
that become header values and log fields (tenant, subject, groups, scopes)
must be printable and bounded (``max_claim_chars``, ``max_claim_items``).
Every refusal is a :class:`~proxy.errors.Unauthorized` naming its rule; the
token is never echoed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from llm_warden.proxy.config import AuthConfig, Config
from llm_warden.proxy.errors import ConfigError, Unauthorized, WardenError
from llm_warden.proxy.exchange import Principal

log = logging.getLogger("warden.auth")

_FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c")
"""Header parameters that name or carry a key: keys come from configuration only (RFC 8725 §3.10)."""
_MIN_HS_SECRET = 32
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_.\-]+")
"""A compact JWS: base64url segments separated by dots (ASCII only; no padding, no spaces)."""
_ALG_ECHO = re.compile(r"[A-Za-z0-9]{1,16}")
"""An ``alg`` value short and plain enough to quote in a refusal (anything else is not echoed)."""
_MAX_NUMERIC_DATE = 253402300799
"""9999-12-31T23:59:59Z: a NumericDate beyond this (either sign) is refused as malformed, never converted."""
_JWKS_MAX_BYTES = 1 << 20
"""The most a JWKS answer may hold; a larger one is treated as a failed fetch."""


def _family(alg: str) -> str:
    if alg.startswith("HS"):
        return "hmac"
    if alg.startswith(("RS", "PS")):
        return "rsa"
    if alg.startswith("ES"):
        return "ec"
    return "okp"


def _key_family(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec"
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "okp"
    if isinstance(key, bytes):
        return "hmac"
    return "unknown"


def _malformed(what: str) -> Unauthorized:
    return Unauthorized(f"malformed token: {what}", rule="auth.malformed")


def _segment(seg: str, what: str) -> bytes:
    """Decode one base64url segment; only the canonical (unpadded, zero trailing bits) encoding is accepted.

    Canonical only, so one signature has one spelling: a token cannot be
    altered into another string that verifies (and caches) the same.
    """
    if len(seg) % 4 == 1:
        raise _malformed(f"the {what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
    except (binascii.Error, ValueError):
        raise _malformed(f"the {what} is not base64url") from None
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != seg.encode():
        raise _malformed(f"the {what} is not canonical base64url")
    return raw


class _DuplicateMember(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        # Parsers disagree on which duplicate wins; a token meaning two things is refused (RFC 7515 §4).
        raise _DuplicateMember
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    """A segment's JSON object: strict UTF-8, no duplicate members, no NaN/Infinity, bounded nesting."""
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateMember:
        raise _malformed(f"the {what} has a duplicate member") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _malformed(f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise _malformed(f"the {what} is not a JSON object")
    return value


def _numeric_date(claims: dict[str, Any], name: str) -> float | None:
    """The ``name`` NumericDate claim (RFC 7519 §2), ``None`` when absent; a wrong type is refused."""
    if name not in claims:
        return None
    v = claims[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (-_MAX_NUMERIC_DATE <= v <= _MAX_NUMERIC_DATE):
        # The range test also refuses NaN and infinities, and compares huge ints exactly (no float overflow).
        raise Unauthorized(f"claim '{name}' must be a NumericDate (seconds since the epoch)", rule="auth.claims")
    return float(v)


class JWKSCache:
    """Keys from a JWKS URL: fetched with aiohttp, cached, refetched on an
    unknown ``kid`` at most once per ``min_refresh_s`` (so random ``kid``s
    cannot turn Warden into a request amplifier)."""

    def __init__(self, url: str, ttl_s: float, min_refresh_s: float, algorithms: list[str]) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.min_refresh_s = min_refresh_s
        self.algorithms = algorithms
        self.keys: dict[str, Any] = {}
        self.fetched_at = 0.0
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _fetch(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self.fetched_at = time.monotonic()
        try:
            async with self._session.get(self.url) as resp:
                if resp.status != 200:
                    raise Unauthorized(f"JWKS endpoint answered {resp.status}", rule="auth.jwks_url")
                body = await resp.content.read(_JWKS_MAX_BYTES + 1)
            if len(body) > _JWKS_MAX_BYTES:
                raise ValueError(f"the answer is larger than {_JWKS_MAX_BYTES} bytes")
            data = json.loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as e:
            log.warning("JWKS fetch from %s failed: %s", self.url, type(e).__name__ if isinstance(e, RecursionError) else e)
            raise Unauthorized("signing keys are unavailable", rule="auth.jwks_url") from None
        entries = data.get("keys") if isinstance(data, dict) else None
        keys: dict[str, Any] = {}
        for jwk in entries if isinstance(entries, list) else []:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            if not isinstance(kid, str):
                continue
            try:
                pk = jwt.PyJWK(jwk)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError, AttributeError):
                continue
            keys[kid] = pk.key
        self.keys = keys

    async def get(self, kid: str | None) -> Any:
        if kid is None:
            raise Unauthorized("token has no 'kid' header but keys come from a JWKS", rule="auth.kid")
        now = time.monotonic()
        stale = now - self.fetched_at > self.ttl_s
        if kid in self.keys and not stale:
            return self.keys[kid]
        async with self._lock:
            if kid in self.keys and time.monotonic() - self.fetched_at <= self.ttl_s:
                return self.keys[kid]
            if stale or time.monotonic() - self.fetched_at >= self.min_refresh_s:
                await self._fetch()
        if kid not in self.keys:
            raise Unauthorized("unknown signing key id", rule="auth.kid")
        return self.keys[kid]


class Authenticator:
    """Turns an ``Authorization`` header into a :class:`Principal`, or refuses."""

    def __init__(self, cfg: AuthConfig, base_dir_cfg: Config | None = None) -> None:
        self.cfg = cfg
        self.mode = cfg.mode
        self._cache: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()
        self._key: Any = None
        self._jwks: JWKSCache | None = None
        self._jws = jwt.PyJWS()
        self.dev_principal = Principal(
            tenant=cfg.dev_tenant, subject=cfg.dev_subject, groups=frozenset(cfg.dev_groups), scopes=frozenset()
        )
        if cfg.mode == "none":
            return
        if cfg.hs256_secret_env:
            secret = os.environ.get(cfg.hs256_secret_env, "")
            if not secret:
                raise ConfigError("auth.hs256_secret_env", f"environment variable {cfg.hs256_secret_env} is not set")
            if len(secret.encode()) < _MIN_HS_SECRET:
                raise ConfigError("auth.hs256_secret_env", f"the secret must be at least {_MIN_HS_SECRET} bytes")
            self._key = secret.encode()
        elif cfg.public_key_file:
            path = base_dir_cfg.resolve_path(cfg.public_key_file) if base_dir_cfg else cfg.public_key_file
            try:
                with open(path, "rb") as f:
                    key = load_pem_public_key(f.read())
            except (OSError, ValueError) as e:
                raise ConfigError("auth.public_key_file", f"cannot load a PEM public key from {path}: {e}") from None
            fam = _key_family(key)
            for alg in cfg.algorithms:
                if _family(alg) != fam:
                    raise ConfigError("auth.algorithms", f"{alg} does not match the {fam} key in public_key_file")
            self._key = key
        else:
            self._jwks = JWKSCache(cfg.jwks_url, cfg.jwks_cache_s, cfg.jwks_min_refresh_s, cfg.algorithms)

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of a valid ``Bearer`` token; anything else raises :class:`Unauthorized` (401).

        No other exception escapes for any header value: a failure this
        module did not foresee is logged as one line (its type, never the
        token) and refused as ``auth.malformed``.
        """
        if self.mode == "none":
            return self.dev_principal
        if not authorization:
            raise Unauthorized("missing bearer token in the Authorization header", rule="auth.missing", code="missing_token")
        scheme, _, token = authorization.partition(" ")
        token = token.strip(" \t")  # HTTP optional whitespace only; anything else around a token is refused
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("the Authorization header must be 'Bearer <token>'", rule="auth.scheme")
        if len(token) > self.cfg.max_token_bytes:
            raise Unauthorized("token is too large", rule="auth.max_token_bytes")
        if not _TOKEN_CHARS.fullmatch(token):
            # Also what makes the hash below safe: the token is ASCII (aiohttp hands undecodable bytes over as surrogates).
            raise _malformed("a token holds base64url characters and dots only")
        digest = hashlib.blake2b(token.encode(), digest_size=20).digest()
        hit = self._cache.get(digest)
        if hit is not None:
            principal, exp = hit
            if time.time() < exp:
                return principal
            del self._cache[digest]
        try:
            principal, exp = await self._verify(token)
        except WardenError:
            raise
        except Exception as e:  # fail closed: hostile input must never become a 500
            log.warning("token refused after an unexpected %s while verifying it", type(e).__name__)
            raise _malformed("the token cannot be verified") from None
        if self.cfg.cache_size > 0:
            # With a JWKS, a key can be withdrawn: re-verify at least once per JWKS cache lifetime.
            until = exp if self._jwks is None else min(exp, time.time() + self.cfg.jwks_cache_s)
            self._cache[digest] = (principal, until)
            if len(self._cache) > self.cfg.cache_size:
                self._cache.popitem(last=False)
        return principal

    def _header(self, token: str) -> dict[str, Any]:
        """The checked JOSE header of a compact token (before its signature is verified)."""
        dots = token.count(".")
        if dots == 4:
            raise Unauthorized("encrypted tokens (JWE) are not accepted", rule="auth.jwe")
        if dots != 2:
            raise _malformed("a token has three dot-separated parts")
        header = _json_object(_segment(token[: token.index(".")], "header"), "header")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.cfg.algorithms:
            shown = f" {alg!r}" if isinstance(alg, str) and _ALG_ECHO.fullmatch(alg) else ""
            raise Unauthorized(f"token algorithm{shown} is not accepted", rule="auth.algorithms")
        for h in _FORBIDDEN_HEADERS:
            if h in header:
                raise Unauthorized(f"token header '{h}' is not accepted; keys come from configuration only", rule="auth.header")
        if "crit" in header:
            raise Unauthorized("token header 'crit' is not accepted; no JWS extension is supported", rule="auth.header")
        if "b64" in header:
            raise Unauthorized("token header 'b64' is not accepted; the payload must be base64url", rule="auth.header")
        for name in ("typ", "cty"):
            if name in header and not isinstance(header[name], str):
                raise Unauthorized(f"token header '{name}' must be a string", rule="auth.header")
        kid = header.get("kid")
        if "kid" in header and not isinstance(kid, str):
            raise Unauthorized("token 'kid' must be a string", rule="auth.kid")
        return header

    async def _verify(self, token: str) -> tuple[Principal, float]:
        header = self._header(token)
        head, payload_seg, sig_seg = token.split(".")
        payload_raw = _segment(payload_seg, "payload")
        _segment(sig_seg, "signature")
        alg: str = header["alg"]
        key = self._key if self._jwks is None else await self._jwks.get(header.get("kid"))
        if _key_family(key) != _family(alg):
            raise Unauthorized("the signing key does not fit the token algorithm", rule="auth.key")
        try:
            # Signature only: the header was checked above and the claims are checked below, with exact types.
            self._jws.decode_complete(token, key, algorithms=self.cfg.algorithms)
        except jwt.InvalidAlgorithmError:
            raise Unauthorized("token algorithm is not accepted", rule="auth.algorithms") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("token signature is invalid", rule="auth.signature") from None
        except (jwt.InvalidKeyError, jwt.PyJWKError):
            raise Unauthorized("token cannot be verified with the configured key", rule="auth.key") from None
        except jwt.PyJWTError as e:
            raise _malformed(type(e).__name__) from None
        claims = _json_object(payload_raw, "payload")
        exp = self._check_registered_claims(claims)
        return self._principal(claims), exp

    def _check_registered_claims(self, claims: dict[str, Any]) -> float:
        """``exp``, ``iss``, ``aud`` required; ``exp``/``nbf``/``iat`` NumericDates within ``leeway_s``; returns ``exp``."""
        for name in ("exp", "iss", "aud"):
            if name not in claims:
                raise Unauthorized(f"token is missing the '{name}' claim", rule="auth.claims")
        exp = _numeric_date(claims, "exp")
        nbf = _numeric_date(claims, "nbf")
        iat = _numeric_date(claims, "iat")
        assert exp is not None
        now = time.time()
        leeway = self.cfg.leeway_s
        if exp <= now - leeway:
            raise Unauthorized("token has expired", rule="auth.exp", code="token_expired")
        if nbf is not None and nbf > now + leeway:
            raise Unauthorized("token is not valid yet", rule="auth.nbf")
        if iat is not None and iat > now + leeway:
            raise Unauthorized("token was issued in the future", rule="auth.iat")
        if claims["iss"] != self.cfg.issuer:
            raise Unauthorized("token issuer is not accepted", rule="auth.issuer")
        aud = claims["aud"]
        if isinstance(aud, str):
            ok = aud == self.cfg.audience
        elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            ok = self.cfg.audience in aud
        else:
            ok = False
        if not ok:
            raise Unauthorized("token audience is not accepted", rule="auth.audience")
        return exp

    def _text(self, value: Any, claim: str, rule: str, what: str) -> str:
        """A claim string that can become a header value and a log field: non-empty, bounded, printable."""
        if not isinstance(value, str) or not value:
            raise Unauthorized(f"claim '{claim}' must be {what}", rule=rule)
        if len(value) > self.cfg.max_claim_chars:
            raise Unauthorized(f"claim '{claim}' is longer than {self.cfg.max_claim_chars} characters", rule="auth.max_claim_chars")
        if not value.isprintable():
            # Control characters (CR/LF/NUL, C0/C1), separators, format characters and lone surrogates.
            raise Unauthorized(f"claim '{claim}' holds characters that are not printable", rule=rule)
        return value

    def _list(self, values: list[Any], claim: str, rule: str, what: str) -> list[str]:
        if len(values) > self.cfg.max_claim_items:
            raise Unauthorized(f"claim '{claim}' has more than {self.cfg.max_claim_items} entries", rule="auth.max_claim_items")
        return [self._text(v, claim, rule, what) for v in values]

    def _principal(self, claims: dict[str, Any]) -> Principal:
        c = self.cfg
        tenant = self._text(claims.get(c.tenant_claim), c.tenant_claim, "auth.tenant_claim", "a non-empty string")
        subject = self._text(claims.get(c.subject_claim), c.subject_claim, "auth.subject_claim", "a non-empty string")
        groups_raw = claims.get(c.groups_claim, [])
        if not isinstance(groups_raw, list):
            raise Unauthorized(f"claim '{c.groups_claim}' must be a list of strings", rule="auth.groups_claim")
        groups = self._list(groups_raw, c.groups_claim, "auth.groups_claim", "a list of non-empty strings")
        scopes_raw = claims.get(c.scopes_claim, "")
        if isinstance(scopes_raw, str):
            scopes_list: list[Any] = scopes_raw.split()
        elif isinstance(scopes_raw, list):
            scopes_list = scopes_raw
        else:
            raise Unauthorized(f"claim '{c.scopes_claim}' must be a string or a list of strings", rule="auth.scopes_claim")
        scopes = self._list(scopes_list, c.scopes_claim, "auth.scopes_claim", "a string or a list of non-empty strings")
        return Principal(tenant=tenant, subject=subject, groups=frozenset(groups), scopes=frozenset(scopes), claims=claims)
