"""Structured logs: one JSON line per request from a real ``warden serve``, no secrets, no prompt text."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from llm_warden.proxy.config import LoggingConfig
from llm_warden.proxy.exchange import Citation, Decision, Principal, RetrievalSummary, ToolCall, ToolDecisionRecord
from llm_warden.proxy.logs import JSONFormatter, SecretScrubber, request_line, setup_logging, shutdown_logging
from llm_warden.proxy.testing import make_exchange
from tests.conftest import PROVIDER_KEY, Keys, make_token
from tests.fakeprovider import FakeProvider, Reply
from tests.proxy.test_serve import free_port, start_proc, write_config

PROMPT = "the launch code is tangerine-4471"


async def test_serve_writes_one_json_line_per_request_without_secrets(tmp_path: Path, fake: FakeProvider, rsa_keys: Keys) -> None:
    port, aport = free_port(), free_port()
    cfg = tmp_path / "config.toml"
    write_config(cfg, fake, rsa_keys, port, aport, extra='\n[logging]\nlevel = "info"\naccess_log = true\n')
    p = await start_proc(cfg, port, aport)
    good = make_token(rsa_keys)
    expired = make_token(rsa_keys, exp_in=-3600)
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}]}
            h = {"Authorization": f"Bearer {good}", "x-request-id": "req-log-1", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
            async with s.post(f"{p.base}/chat/completions", json=body, headers=h) as r:
                assert r.status == 200
            async with s.post(f"{p.base}/chat/completions", json={**body, "stream": True}, headers={"Authorization": f"Bearer {good}"}) as r:
                await r.read()
            async with s.post(f"{p.base}/chat/completions", json=body, headers={"Authorization": f"Bearer {expired}"}) as r:
                assert r.status == 401
            async with s.get(f"{p.base}/models?api_key={PROVIDER_KEY}", headers={"Authorization": f"Bearer {good}"}) as r:
                assert r.status == 200
            fake.push(Reply(status=500, error="provider exploded"))
            async with s.post(f"{p.base}/chat/completions", json=body, headers={"Authorization": f"Bearer {good}"}) as r:
                assert r.status == 500
    finally:
        p.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(p.proc.wait(), 15) == 0
    assert p.proc.stdout is not None
    raw = (await p.proc.stdout.read()).decode()
    lines = [orjson.loads(line) for line in raw.splitlines() if line.strip()]
    assert lines, "the process logged"
    for secret in (good, expired, PROVIDER_KEY, PROMPT, "tangerine"):
        assert secret not in raw, f"{secret[:12]}... leaked into the logs"

    reqs = [x for x in lines if x["msg"] == "request"]
    assert len(reqs) == 5
    first = reqs[0]
    assert first["request_id"] == "req-log-1"
    assert first["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert first["tenant"] == "acme" and "subject" not in first
    assert (first["route"], first["model"], first["status"], first["level"]) == ("chat", "m", 200, "info")
    assert first["latency_ms"] > 0 and first["upstream_ms"] > 0 and first["tokens_in"] > 0
    assert reqs[1]["stream"] is True and reqs[1]["ttft_ms"] > 0
    assert reqs[2]["status"] == 401 and reqs[2]["rule"] == "auth.exp" and reqs[2].get("tenant") is None
    assert reqs[3]["route"] == "models" and reqs[3]["path"] == "/v1/models"
    assert reqs[4]["status"] == 500 and reqs[4]["level"] == "warning" and reqs[4]["error"] == "upstream_error"
    for x in lines:
        assert {"ts", "level", "logger", "msg"} <= x.keys()


def test_request_line_fields_and_opt_in_subject() -> None:
    ex = make_exchange({"model": "m", "messages": [{"role": "user", "content": PROMPT}]}, principal=Principal(tenant="acme", subject="alice"))
    ex.tool_decisions.append(ToolDecisionRecord(turn=0, call=ToolCall(id="c1", name="delete_all", arguments='{"really": true}'), decision=Decision.deny("tools.policy", "no")))
    ex.retrieval = RetrievalSummary(query=PROMPT, mode="hybrid", top_k=4, candidates=3, injected=2, excluded={"acl": 1})
    ex.citations = [Citation(1, True, "doc-1", "doc-1#0"), Citation(7, False)]
    ex.response_text = "secret answer"
    line = request_line(ex, 200, 0.0123, 0.01, LoggingConfig())
    assert line["decisions"] == [{"tool": "delete_all", "decision": "deny", "rule": "tools.policy", "turn": 0}]
    assert line["retrieval"] == {"injected": 2, "excluded": {"acl": 1}}, "counts only: never the query"
    assert line["citations_invalid"] == 1
    assert line["latency_ms"] == 12.3
    text = orjson.dumps(line).decode()
    assert PROMPT not in text and "secret answer" not in text and "really" not in text and "alice" not in text
    assert request_line(ex, 200, 0.01, 0.0, LoggingConfig(include_subject=True))["subject"] == "alice"
    ex.retrieval = RetrievalSummary(skipped="header", query=PROMPT)
    assert request_line(ex, 200, 0.01, 0.0, LoggingConfig())["retrieval"] == {"skipped": "header"}


def test_scrubber_masks_tokens_keys_and_registered_secrets() -> None:
    scrub = SecretScrubber()
    scrub.add("my-provider-secret-value")
    scrub.add("short")
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
    text = f"auth Bearer abc.def.ghi-123456 then {jwt} and sk-proj-ABCDEFGHIJKLMNOPQRST and my-provider-secret-value, short words stay"
    out = scrub(text)
    for s in ("abc.def.ghi", jwt, "sk-proj-ABCD", "my-provider-secret-value"):
        assert s not in out
    assert "short words stay" in out
    assert scrub("nothing to hide: task-force back-end") == "nothing to hide: task-force back-end"


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    shutdown_logging()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_background_writer_level_and_exceptions(restore_root_logging: None) -> None:
    out = io.StringIO()
    setup_logging("warning", stream=out)
    log = logging.getLogger("warden.test")
    log.info("dropped below the level")
    log.warning("kept", extra={"tenant": "acme"})
    try:
        raise RuntimeError("upstream said Bearer eyJabcdef.eyJghijkl.signature")
    except RuntimeError:
        log.exception("failed")
    shutdown_logging()
    lines = [orjson.loads(x) for x in out.getvalue().splitlines()]
    assert [x["msg"] for x in lines] == ["kept", "failed"]
    assert lines[0]["tenant"] == "acme" and lines[0]["level"] == "warning"
    assert "RuntimeError" in lines[1]["exc"] and "eyJabcdef" not in lines[1]["exc"]


def test_formatter_keeps_extra_types() -> None:
    rec = logging.LogRecord("warden", logging.INFO, __file__, 1, "m %s", ("x",), None)
    extra: dict[str, Any] = {"n": 3, "ok": True, "items": [1, 2], "obj": object()}
    rec.__dict__.update(extra)
    out = orjson.loads(JSONFormatter().format(rec))
    assert out["msg"] == "m x" and out["n"] == 3 and out["ok"] is True and out["items"] == [1, 2]
    assert isinstance(out["obj"], str)


def test_scrubber_is_linear_on_hostile_token_shaped_text() -> None:
    import time

    started = time.perf_counter()
    SecretScrubber()("/v1/" + "eyJ" * 40_000)
    assert time.perf_counter() - started < 1.0
