"""Property-based fuzzing of the JWT front end (:meth:`proxy.auth.Authenticator.authenticate`).

The invariant, for every input: ``authenticate`` returns a
:class:`~proxy.exchange.Principal` only for a token validly signed with the
configured key whose header and claims pass every check, and otherwise raises
:class:`~proxy.errors.Unauthorized` (401, an ``auth.*`` rule); never any other
exception, and never through its fallback for unforeseen failures (which
logs one warning on ``warden.auth``: a warning there fails the test).

Five targets:

- arbitrary ``Authorization`` values (any code point, lone surrogates as
  aiohttp makes of undecodable bytes included);
- token-shaped strings (base64url runs and dots);
- a valid token mutated (characters replaced, inserted or deleted in one
  segment, segments swapped, dropped or repeated): only the unchanged token
  may be accepted, since a signature segment has one canonical spelling;
- random JSON claims under a valid header, and random JSON headers over
  valid-looking claims, signed with the right HS256 key: accepted exactly
  when an independent oracle (written from the rules in the
  :mod:`proxy.auth` docstring, not from its code) says the token is valid.

The in-suite run is short (300 examples per target, no deadline, a few
seconds in all).  To fuzz longer, set ``WARDEN_FUZZ_EXAMPLES``; a seed can
be fixed with ``WARDEN_FUZZ_SEED``::

    WARDEN_FUZZ_EXAMPLES=50000 .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=0 tests/proxy/test_auth_fuzz.py

(``--timeout=0`` lifts the suite's 120 s per-test limit; 10,000 examples
per target take one to two minutes each.)

A failing example is printed by Hypothesis; add it to
``tests/proxy/test_auth_hostile.py`` as a regression test.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from llm_warden.proxy.auth import Authenticator
from llm_warden.proxy.config import AuthConfig
from llm_warden.proxy.errors import Unauthorized
from llm_warden.proxy.exchange import Principal

ISS = "https://issuer.fuzz"
AUD = "warden-fuzz"
SECRET = "fuzzing-secret-that-is-long-enough-0123456789"
EXAMPLES = int(os.environ.get("WARDEN_FUZZ_EXAMPLES", "300"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
_SEED = os.environ.get("WARDEN_FUZZ_SEED")


def _seeded(f: Any) -> Any:
    return seed(int(_SEED))(f) if _SEED else f


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(header_seg: str, payload_seg: str) -> str:
    signing_input = f"{header_seg}.{payload_seg}"
    return f"{signing_input}.{b64(hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest())}"


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def harness() -> Iterator[tuple[Authenticator, asyncio.AbstractEventLoop, _Warnings]]:
    old = os.environ.get("FUZZ_HS_SECRET")
    os.environ["FUZZ_HS_SECRET"] = SECRET
    auth = Authenticator(AuthConfig(algorithms=["HS256"], issuer=ISS, audience=AUD, hs256_secret_env="FUZZ_HS_SECRET", leeway_s=0))
    loop = asyncio.new_event_loop()
    warnings = _Warnings()
    logger = logging.getLogger("warden.auth")
    logger.addHandler(warnings)
    try:
        yield auth, loop, warnings
    finally:
        logger.removeHandler(warnings)
        loop.close()
        if old is None:
            del os.environ["FUZZ_HS_SECRET"]
        else:
            os.environ["FUZZ_HS_SECRET"] = old


def run(h: tuple[Authenticator, asyncio.AbstractEventLoop, _Warnings], header_value: str) -> Principal | Unauthorized:
    """Authenticate; any exception but Unauthorized propagates (and fails the property), as does the fallback's warning."""
    auth, loop, warnings = h
    auth._cache.clear()  # every example is verified, never answered from the cache of an earlier one
    try:
        result: Principal | Unauthorized = loop.run_until_complete(auth.authenticate(header_value))
    except Unauthorized as e:
        assert e.status == 401 and e.rule is not None and e.rule.startswith("auth."), e.to_dict()
        result = e
    assert not warnings.records, f"unforeseen failure: {warnings.records[0].getMessage()}"
    return result


# -- strategies ----------------------------------------------------------------------------------

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
ANY_CHAR = st.one_of(
    st.characters(exclude_categories=()),  # every code point, lone surrogates included
    st.sampled_from(["\r", "\n", "\x00", "\x85", "\u2028", "\udcff", "é", " ", "\t", ".", "=", "+", "/"]),
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(ANY_CHAR, max_size=12),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12
)


NOW = int(time.time())
"""Time claims are drawn around this fixed instant (strategies must not depend on the clock); the oracle reads the clock.

Future instants are at least a day ahead and past ones stay past, so a run
shorter than a day never sees a drawn instant cross the clock: the same
example gets the same verdict when Hypothesis replays or shrinks it.
"""
DAY = 86400


def _valid_claims() -> dict[str, Any]:
    now = NOW
    return {"iss": ISS, "aud": AUD, "sub": "alice", "tenant": "acme", "groups": ["staff"], "scope": "read", "iat": now - 10, "exp": now + 2 * DAY}


ONE_IN_FIVE = st.sampled_from([False, False, False, False, True])
"""A rare branch (Hypothesis draws small integers far more often than 1 in n)."""


_OTHER_ALGS = st.one_of(st.sampled_from(["none", "None", "RS256", "HS512", "", "hs256", "HS256 "]), JSON_SCALARS)
_TYP = st.one_of(st.just("JWT"), JSON_SCALARS)
_HEADER_NAMES = st.lists(st.sampled_from(["kid", "cty", "crit", "jku", "x5u", "jwk", "x5c", "b64", "zip", "enc", "x5t"]), max_size=3, unique=True)
_EXTRA_HEADERS = st.dictionaries(st.text(ANY_CHAR, max_size=5), JSON_VALUES, max_size=2)


@st.composite
def headers(draw: st.DrawFn) -> Any:
    """A header with ``alg: HS256``, sometimes another ``alg``; other parameters added at random; sometimes not an object."""
    if draw(ONE_IN_FIVE):
        return draw(JSON_VALUES)
    h: dict[str, Any] = {"alg": "HS256"}
    if draw(ONE_IN_FIVE):
        h["alg"] = draw(_OTHER_ALGS)
    if draw(st.booleans()):
        h["typ"] = draw(_TYP)
    for name in draw(_HEADER_NAMES):
        h[name] = draw(JSON_VALUES)
    if draw(st.booleans()):
        h.update(draw(_EXTRA_HEADERS))
    if draw(ONE_IN_FIVE):
        h.pop("alg", None)
    return h


MAX_DATE = 253402300799
_DATES = st.one_of(
    st.integers(min_value=NOW + DAY, max_value=NOW + 10**8),
    st.integers(min_value=-(10**12), max_value=NOW - 120),
    st.floats(min_value=NOW + DAY, max_value=1e11),
    st.sampled_from([0, -1, 10**400, -(10**400), MAX_DATE, MAX_DATE + 1, 1e300, True, False, "0", str(NOW + 3600), None]),
    JSON_VALUES,
)
_IDENTITY = st.one_of(st.text(ANY_CHAR, min_size=0, max_size=20), st.text(min_size=250, max_size=260, alphabet="ab"), JSON_VALUES)
_CLAIM_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "iss": st.one_of(st.just(ISS), st.just([ISS]), JSON_VALUES),
    "aud": st.one_of(st.just(AUD), st.lists(st.sampled_from([AUD, "other"]), max_size=3), JSON_VALUES),
    "exp": _DATES,
    "nbf": _DATES,
    "iat": _DATES,
    "sub": _IDENTITY,
    "tenant": _IDENTITY,
    "groups": st.one_of(st.lists(_IDENTITY, max_size=4), st.lists(st.just("g"), min_size=255, max_size=258), JSON_VALUES),
    "scope": st.one_of(st.text(ANY_CHAR, max_size=20), st.lists(_IDENTITY, max_size=4), JSON_VALUES),
}
_CLAIM_NAMES = st.lists(st.sampled_from(sorted(_CLAIM_STRATEGIES)), max_size=4, unique=True)
_EXTRA_CLAIMS = st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3)


@st.composite
def claim_sets(draw: st.DrawFn) -> dict[str, Any]:
    """Valid claims with up to four of them replaced by anything (or removed), and extra claims."""
    c = _valid_claims()
    for name in draw(_CLAIM_NAMES):
        if draw(ONE_IN_FIVE):
            c.pop(name, None)
        else:
            c[name] = draw(_CLAIM_STRATEGIES[name])
    if draw(st.booleans()):
        c.update(draw(_EXTRA_CLAIMS))
    return c


VALID_HEADERS = st.sampled_from([{"alg": "HS256"}, {"alg": "HS256", "typ": "JWT"}, {"alg": "HS256", "kid": "k1", "typ": "at+jwt"}])
_PRINTABLE = st.characters(categories=["L", "M", "N", "P", "S"])
_IDENT = st.text(_PRINTABLE | st.just(" "), min_size=1, max_size=24).filter(str.isprintable) | st.sampled_from(["t" * 256, "é" * 256, "x y"])
_WORD = st.text(_PRINTABLE, min_size=1, max_size=30)
_VALID_OPTIONAL: tuple[tuple[str, st.SearchStrategy[Any]], ...] = (
    ("nbf", st.one_of(st.integers(-MAX_DATE, NOW - 600), st.floats(-float(MAX_DATE), NOW - 600.0))),
    ("iat", st.integers(0, NOW - 600)),
    ("groups", st.lists(_IDENT, max_size=8)),
    ("scope", st.one_of(st.lists(_WORD, max_size=8).map(" ".join), st.lists(_WORD, max_size=8))),
)
_VALID_AUD = st.one_of(st.just(AUD), st.lists(st.text(max_size=8), max_size=3).map(lambda a: [*a, AUD]))
_VALID_EXP = st.one_of(st.integers(NOW + DAY, MAX_DATE), st.floats(NOW + DAY, float(MAX_DATE)))


@st.composite
def valid_claim_sets(draw: st.DrawFn) -> dict[str, Any]:
    """Claims the rules should accept: random printable identities, lists within bounds, dates well inside the window."""
    c: dict[str, Any] = {"iss": ISS, "aud": draw(_VALID_AUD), "exp": draw(_VALID_EXP), "tenant": draw(_IDENT), "sub": draw(_IDENT)}
    for name, strategy in _VALID_OPTIONAL:
        if draw(st.booleans()):
            c[name] = draw(strategy)
    for k, v in draw(_EXTRA_CLAIMS).items():
        c.setdefault(k, v)
    return c


# -- the oracle ----------------------------------------------------------------------------------


def _is_date(v: Any) -> bool:
    return type(v) in (int, float) and -MAX_DATE <= v <= MAX_DATE


def _ident_ok(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 256 and v.isprintable()


def expected_valid(header: Any, claims: Any, token: str) -> bool | None:
    """Whether the rules accept this token; ``None`` when a time claim falls where the clock may pass it during the run."""
    if len(token) > 8192 or not isinstance(header, dict) or not isinstance(claims, dict):
        return False
    if header.get("alg") != "HS256" or any(k in header for k in ("crit", "jku", "x5u", "jwk", "x5c", "b64")):
        return False
    if any(k in header and not isinstance(header[k], str) for k in ("typ", "cty", "kid")):
        return False
    if any(k not in claims for k in ("exp", "iss", "aud")):
        return False
    if any(k in claims and not _is_date(claims[k]) for k in ("exp", "nbf", "iat")):
        return False
    for k in ("exp", "nbf", "iat"):
        # Before NOW is past for the whole run; the clock may cross [NOW, NOW + DAY) during it. A fixed window keeps
        # the verdict (and the assume() on it) the same when Hypothesis replays an example.
        if k in claims and NOW <= claims[k] < NOW + DAY:
            return None
    now = time.time()
    if claims["exp"] <= now or claims.get("nbf", 0) > now or claims.get("iat", 0) > now:
        return False
    if claims["iss"] != ISS:
        return False
    aud = claims["aud"]
    if not (aud == AUD or (isinstance(aud, list) and all(isinstance(a, str) for a in aud) and AUD in aud)):
        return False
    if not _ident_ok(claims.get("tenant")) or not _ident_ok(claims.get("sub")):
        return False
    groups = claims.get("groups", [])
    if not isinstance(groups, list) or len(groups) > 256 or not all(_ident_ok(g) for g in groups):
        return False
    scope = claims.get("scope", "")
    scopes = scope.split() if isinstance(scope, str) else scope
    return isinstance(scopes, list) and len(scopes) <= 256 and all(_ident_ok(s) for s in scopes)


def _json(v: Any) -> str:
    return json.dumps(v, allow_nan=False)


def _finite(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(_finite(x) for x in v)
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    return True


# -- the properties ------------------------------------------------------------------------------


@_seeded
@SETTINGS
@given(prefix=st.sampled_from(["", "Bearer ", "bearer ", "BEARER  ", "Basic "]), text=st.text(ANY_CHAR, max_size=200))
def test_arbitrary_authorization_values(harness: Any, prefix: str, text: str) -> None:
    assert isinstance(run(harness, prefix + text), Unauthorized)


@_seeded
@SETTINGS
@given(parts=st.lists(st.text(alphabet=B64URL + "=", max_size=60), min_size=1, max_size=6))
def test_token_shaped_strings(harness: Any, parts: list[str]) -> None:
    assert isinstance(run(harness, "Bearer " + ".".join(parts)), Unauthorized)


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, str]:
    good = sign(b64(_json({"alg": "HS256", "typ": "JWT"}).encode()), b64(_json(_valid_claims()).encode()))
    segs = good.split(".")
    kind = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "swap", "drop", "repeat"]))
    i = draw(st.integers(0, 2))
    s = segs[i]
    if kind in ("replace", "insert", "delete", "truncate"):
        pos = draw(st.integers(0, max(0, len(s) - 1)))
        char = draw(st.one_of(st.sampled_from(B64URL), ANY_CHAR))
        if kind == "replace":
            s = s[:pos] + char + s[pos + 1 :]
        elif kind == "insert":
            s = s[:pos] + char + s[pos:]
        elif kind == "delete":
            s = s[:pos] + s[pos + 1 :]
        else:
            s = s[:pos]
        segs[i] = s
    elif kind == "swap":
        j = draw(st.integers(0, 2))
        segs[i], segs[j] = segs[j], segs[i]
    elif kind == "drop":
        del segs[i]
    else:
        segs.insert(i, segs[i])
    return good, ".".join(segs)


@_seeded
@SETTINGS
@given(case=mutations())
def test_mutated_valid_tokens(harness: Any, case: tuple[str, str]) -> None:
    good, mutated = case
    result = run(harness, "Bearer " + mutated)
    if mutated.strip(" \t") == good:  # spaces or tabs around the token are HTTP whitespace, not part of it
        assert isinstance(result, Principal) and result.tenant == "acme"
    else:
        assert isinstance(result, Unauthorized), "only the token as signed is accepted"


def _check_signed(harness: Any, header: Any, claims: Any) -> None:
    assume(_finite(header) and _finite(claims))
    token = sign(b64(_json(header).encode()), b64(_json(claims).encode()))
    want = expected_valid(header, claims, token)
    assume(want is not None)
    result = run(harness, "Bearer " + token)
    if want:
        assert isinstance(result, Principal), result.to_dict() if isinstance(result, Unauthorized) else result
        assert (result.tenant, result.subject) == (claims["tenant"], claims["sub"])
    else:
        assert isinstance(result, Unauthorized), f"accepted a token the rules refuse: {header!r} {claims!r}"


@_seeded
@SETTINGS
@given(header=VALID_HEADERS, claims=st.one_of(claim_sets(), valid_claim_sets(), JSON_VALUES))
def test_random_claims_signed_with_the_right_key(harness: Any, header: Any, claims: Any) -> None:
    _check_signed(harness, header, claims)


@_seeded
@SETTINGS
@given(header=headers(), claims=st.one_of(claim_sets(), valid_claim_sets()))
def test_random_headers_signed_with_the_right_key(harness: Any, header: Any, claims: Any) -> None:
    _check_signed(harness, header, claims)
