"""Audit completeness as a property: whatever headers and body a client sends, every answered request that
reached authentication has its one full exchange record, and ``verify`` passes over the log.

Random header values (any bytes HTTP allows in a field, undecodable ones included), request ids, paths and
bodies (valid JSON of any shape and depth, or arbitrary bytes) go through the real server over raw
sockets.  The in-suite run is short; ``WARDEN_FUZZ_EXAMPLES=2000`` runs it longer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_warden.proxy.audit.verify import verify_db
from tests.conftest import WardenFactory
from tests.fakeprovider import FakeProvider
from tests.proxy.test_governed import raw_request

EXAMPLES = int(os.environ.get("WARDEN_FUZZ_EXAMPLES", "40"))

# Field values: visible bytes, spaces and tabs, and obs-text (0x80-0xFF, not UTF-8 on its own).
field_bytes = st.binary(min_size=0, max_size=64).map(lambda b: bytes(c for c in b if c in (9, 32) or 33 <= c <= 126 or c >= 128).strip())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
deep = st.integers(min_value=1, max_value=400).map(lambda n: b'{"model":"m","messages":[{"role":"user","content":"x"}],"x":' + b"[" * n + b"1" + b"]" * n + b"}")
chat_like = st.fixed_dictionaries(
    {"model": st.text(max_size=300), "messages": st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]), json_values, max_size=3), max_size=3)},
    optional={"stream": st.booleans() | json_values, "tools": json_values, "n": json_values, "extra": json_values},
).map(orjson.dumps)
bodies = chat_like | deep | st.binary(max_size=200) | json_values.map(orjson.dumps)
paths = st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/feedback", "/v1/nope", "/v1/%2e/chat/completions", "/v1//x"])
request_ids = st.one_of(st.none(), field_bytes, st.just(b"sk-live-abcdefghijklmnopqrstuvwxyz012345"), st.text(alphabet="abc-_.:", min_size=1, max_size=200).map(str.encode))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=paths, method=st.sampled_from(["POST", "GET"]), body=bodies, extra=st.dictionaries(st.sampled_from(["x-odd", "user-agent", "x-warden-retrieval", "idempotency-key"]), field_bytes, max_size=3), rid=request_ids)
async def test_every_answered_request_has_its_full_record(
    warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, tmp_path: Path, path: str, method: str, body: bytes, extra: dict[str, bytes], rid: bytes | None
) -> None:
    rw = await _warden(warden_factory, tmp_path)
    headers: dict[str, bytes | str] = {"Authorization": f"Bearer {token()}", "Content-Type": "application/json", **extra}
    if rid is not None:
        headers["x-request-id"] = rid
    status, hdrs, answer = await raw_request(rw.base_url, method, path, headers, body)
    assert 200 <= status < 600
    if status >= 400:
        err = orjson.loads(answer)["error"]
        assert err["message"] and "Traceback" not in err["message"]
    rec = await rw.warden.audit.find(hdrs["x-request-id"])
    assert rec is not None and rec["kind"] == "exchange", (status, answer[:200])
    assert rec["status"] == status
    assert rec["principal"]["tenant"] == "acme"


_RUNNING: dict[str, Any] = {}


async def _warden(warden_factory: WardenFactory, tmp_path: Path) -> Any:
    """One Warden per test run (hypothesis calls the test many times with the same fixtures)."""
    key = str(tmp_path)
    if key not in _RUNNING:
        _RUNNING.clear()
        _RUNNING[key] = await warden_factory({"audit": {"enabled": True, "durability": "sync"}, "server": {"passthrough_routes": []}})
    return _RUNNING[key]


async def test_verify_passes_after_hostile_traffic(warden_factory: WardenFactory, token: Callable[..., str], fake: FakeProvider, tmp_path: Path) -> None:
    rw = await warden_factory({"audit": {"enabled": True, "durability": "sync"}})
    hostile: list[tuple[str, dict[str, bytes | str], bytes]] = [
        ("/v1/chat/completions", {"x-request-id": b"sk-live-abcdefghijklmnopqrstuvwxyz012345"}, b'{"model":"m","messages":[{"role":"user","content":"x"}]}'),
        ("/v1/chat/completions", {"x-odd": b"\xff\xfe\xc3"}, b'{"model":"m","messages":[{"role":"user","content":"x"}]}'),
        ("/v1/chat/completions", {}, b'{"model":"m","messages":[{"role":"user","content":"x"}],"d":' + b"[" * 250 + b"]" * 250 + b"}"),
        ("/v1/chat/completions", {}, b"\xff\xfe not json"),
        ("/v1/chat/completions", {}, b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}'),
        ("/v1/%2e%2e/admin", {}, b"{}"),
    ]
    for path, extra, body in hostile:
        status, hdrs, _ = await raw_request(rw.base_url, "POST", path, {"Authorization": f"Bearer {token()}", "Content-Type": "application/json", **extra}, body)
        rec = await rw.warden.audit.find(hdrs["x-request-id"])
        assert rec is not None and rec["kind"] == "exchange" and rec["status"] == status
    await rw.stop()
    report = await verify_db(Path(rw.warden.config.resolve_path(rw.warden.config.audit.path)))
    assert report.records >= len(hostile) and not report.faults, [f.code for f in report.faults]
