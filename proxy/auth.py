"""Caller identity: verify a JWT and derive a :class:`Principal`.

Follows RFC 8725: algorithms come from configuration only, ``none`` is never
accepted, key type must match the algorithm family, keys are never fetched
from URLs named in a token, and ``exp``/``iss``/``aud`` are always required.
Verified tokens are cached (keyed by a hash of the token, bounded, never past
``exp``) so a signature is checked once per token, not once per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import OrderedDict
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from proxy.config import AuthConfig, Config
from proxy.errors import ConfigError, Unauthorized
from proxy.exchange import Principal

log = logging.getLogger("warden.auth")

_FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c")
_MIN_HS_SECRET = 32


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
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "okp"
    return "unknown"


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
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.warning("JWKS fetch from %s failed: %s", self.url, e)
            raise Unauthorized("signing keys are unavailable", rule="auth.jwks_url") from None
        keys: dict[str, Any] = {}
        for jwk in data.get("keys", []) if isinstance(data, dict) else []:
            try:
                pk = jwt.PyJWK(jwk)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
                continue
            kid = jwk.get("kid")
            if isinstance(kid, str):
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
        self._options = {"require": ["exp", "iss", "aud"], "verify_signature": True}
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
        if self.mode == "none":
            return self.dev_principal
        if not authorization:
            raise Unauthorized("missing bearer token in the Authorization header", rule="auth.missing", code="missing_token")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("the Authorization header must be 'Bearer <token>'", rule="auth.scheme")
        if len(token) > self.cfg.max_token_bytes:
            raise Unauthorized("token is too large", rule="auth.max_token_bytes")
        digest = hashlib.blake2b(token.encode(), digest_size=20).digest()
        hit = self._cache.get(digest)
        if hit is not None:
            principal, exp = hit
            if time.time() < exp:
                return principal
            del self._cache[digest]
        principal, exp = await self._verify(token)
        if self.cfg.cache_size > 0:
            # With a JWKS, a key can be withdrawn: re-verify at least once per JWKS cache lifetime.
            until = exp if self._jwks is None else min(exp, time.time() + self.cfg.jwks_cache_s)
            self._cache[digest] = (principal, until)
            if len(self._cache) > self.cfg.cache_size:
                self._cache.popitem(last=False)
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        dots = token.count(".")
        if dots == 4:
            raise Unauthorized("encrypted tokens (JWE) are not accepted", rule="auth.jwe")
        if dots != 2:
            raise Unauthorized("malformed token", rule="auth.malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise Unauthorized("malformed token", rule="auth.malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.cfg.algorithms:
            raise Unauthorized(f"token algorithm {str(alg)[:16]!r} is not accepted", rule="auth.algorithms")
        for h in _FORBIDDEN_HEADERS:
            if h in header:
                raise Unauthorized(f"token header '{h}' is not accepted; keys come from configuration only", rule="auth.header")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("token 'kid' must be a string", rule="auth.kid")
        key = self._key if self._jwks is None else await self._jwks.get(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=self.cfg.algorithms,
                audience=self.cfg.audience,
                issuer=self.cfg.issuer,
                leeway=self.cfg.leeway_s,
                options=self._options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token has expired", rule="auth.exp", code="token_expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token is not valid yet", rule="auth.nbf") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("token issuer is not accepted", rule="auth.issuer") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("token audience is not accepted", rule="auth.audience") from None
        except jwt.MissingRequiredClaimError as e:
            raise Unauthorized(f"token is missing the '{e.claim}' claim", rule="auth.claims") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthorized("token algorithm is not accepted", rule="auth.algorithms") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("token signature is invalid", rule="auth.signature") from None
        except (jwt.InvalidKeyError, jwt.PyJWKError):
            raise Unauthorized("token cannot be verified with the configured key", rule="auth.key") from None
        except jwt.InvalidTokenError as e:
            raise Unauthorized(f"invalid token: {type(e).__name__}", rule="auth.malformed") from None
        return self._principal(claims), float(claims["exp"])

    def _principal(self, claims: dict[str, Any]) -> Principal:
        c = self.cfg
        tenant = claims.get(c.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise Unauthorized(f"claim '{c.tenant_claim}' must be a non-empty string", rule="auth.tenant_claim")
        subject = claims.get(c.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise Unauthorized(f"claim '{c.subject_claim}' must be a non-empty string", rule="auth.subject_claim")
        groups = claims.get(c.groups_claim, [])
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise Unauthorized(f"claim '{c.groups_claim}' must be a list of strings", rule="auth.groups_claim")
        scopes_raw = claims.get(c.scopes_claim, "")
        if isinstance(scopes_raw, str):
            scopes = scopes_raw.split()
        elif isinstance(scopes_raw, list) and all(isinstance(s, str) for s in scopes_raw):
            scopes = scopes_raw
        else:
            raise Unauthorized(f"claim '{c.scopes_claim}' must be a string or a list of strings", rule="auth.scopes_claim")
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            raise Unauthorized("claim 'exp' must be a number", rule="auth.claims")
        return Principal(tenant=tenant, subject=subject, groups=frozenset(groups), scopes=frozenset(scopes), claims=claims)
