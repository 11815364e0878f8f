"""Builders of realistic exchanges for the audit tests and the benchmark."""

from __future__ import annotations

import contextlib
import itertools
import resource
import time
from collections.abc import Iterator
from typing import Any

import orjson

from llm_warden.proxy.exchange import Decision, Exchange, Principal, ToolCall, ToolDecisionRecord, UpstreamTurn, Usage

_ids = itertools.count(1)

SYSTEM = "You are the ACME support assistant. Answer briefly and cite sources as [n]. " * 4
USER = "Hello, my order did not arrive and I would like to know where it is. Can you check it for me please? " * 4


def make_exchange(
    *,
    tenant: str = "acme",
    subject: str = "alice",
    user_text: str = USER,
    request_id: str | None = None,
    tool: str | None = "lookup_order",
    stream: bool = False,
) -> Exchange:
    """One finished chat exchange with a tool call, a tool result and usage."""
    rid = request_id or f"req_{next(_ids):08d}"
    body = {
        "model": "gpt-4o",
        "temperature": 0.2,
        "max_tokens": 256,
        "stream": stream,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user_text},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_prev", "type": "function", "function": {"name": "lookup_order", "arguments": '{"id": 7}'}}],
            },
            {"role": "tool", "tool_call_id": "call_prev", "content": '{"status": "shipped"}'},
        ],
        "tools": [{"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object"}}}],
    }
    raw = orjson.dumps(body)
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Your order shipped yesterday [1]."}}
        ],
        "usage": {"prompt_tokens": 120, "completion_tokens": 9, "total_tokens": 129},
    }
    ex = Exchange(request_id=rid, route="chat", method="POST", path="/v1/chat/completions")
    ex.wall_time = time.time()
    ex.principal = Principal(tenant=tenant, subject=subject, groups=frozenset({"support"}), scopes=frozenset({"chat"}))
    ex.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    ex.client_ip = "10.0.0.7"
    ex.request_headers = {"user-agent": "openai-python/1.0", "authorization": "Bearer secret-token-value"}
    ex.raw_body = raw
    ex.body = ex.client_body = body
    ex.stream = stream
    ex.model = "gpt-4o"
    ex.response_model = "gpt-4o-2024-08-06"
    ex.turns = [UpstreamTurn(index=0, body=raw, status=200, response=answer, started=ex.started, duration_s=0.012345, ttft_s=0.004)]
    if tool:
        call = ToolCall(id=f"call_{rid}", name=tool, arguments='{"id": 7}', parsed={"id": 7})
        ex.tool_decisions = [ToolDecisionRecord(turn=0, call=call, decision=Decision.allow("tools.lookup_order"))]
    ex.response_body = answer
    ex.response_text = "Your order shipped yesterday [1]."
    ex.finish_reasons = ["stop"]
    ex.usage = Usage(**answer["usage"])
    ex.status = 200
    ex.phase = "record"  # as the pipeline hands a finished exchange to the audit log
    ex.ended = ex.started + 0.0131
    return ex


@contextlib.contextmanager
def writes_fail(log: Any) -> Iterator[None]:
    """While inside, every write of the audit writer process fails as on a full disk.

    The process's file-size limit is lowered to one byte (``prlimit``): each
    write to the database or its WAL past offset 0 fails with EFBIG, which
    SQLite reports like a full disk.  Reads still work.  The limit is put back
    on the way out.
    """
    pid = log.writer_pid
    assert pid is not None, "the audit writer process is not running"
    old = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, old[1]))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, old)
