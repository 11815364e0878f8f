"""Wire-format checks and SSE parsing: the cost per answer and per stream event.

    python bench/wire.py                     # defaults: 200000 iterations per case, best of 5 runs
    python bench/wire.py --iterations 1000000 --repeat 7

``proxy.wire.check_completion`` runs once per non-streamed answer and
``check_chunk`` once per stream event, on the hot path; each is timed on
already-parsed answers shaped like real ones (so the ``orjson.loads`` the
chat flow does anyway is shown beside it, for scale).  ``SSEParser.feed`` is
timed on a typical stream (one event per read, as providers flush) and on one
large event arriving in 1 KiB reads.  Figures are µs per call, best of
``--repeat`` runs (the minimum is the least disturbed by other work on the
machine).
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_warden.proxy.sse import SSEParser  # noqa: E402
from llm_warden.proxy.wire import check_chunk, check_completion  # noqa: E402

TEXT_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-2024-08-06",
    "system_fingerprint": "fp_1",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The capital of France is Paris. " * 20, "refusal": None}, "logprobs": None, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 40,
        "completion_tokens": 140,
        "total_tokens": 180,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    },
}
TOOLS_ANSWER: dict[str, Any] = {
    **TEXT_ANSWER,
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": f"call_{i}", "type": "function", "function": {"name": f"tool_{i}", "arguments": '{"invoice_id":"INV-1","amount":12.5,"reason":"other"}'}}
                    for i in range(8)
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


CONTENT_CHUNK = _chunk({"content": " Paris"})
TOOL_CHUNK = _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"invoice'}}]})
FINISH_CHUNK = _chunk({}, "stop")
USAGE_CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 140, "total_tokens": 180}}


def _best(fn: Any, n: int, repeat: int) -> float:
    """µs per call, best of ``repeat`` runs of ``n`` calls."""
    return min(timeit.repeat(fn, number=n, repeat=repeat)) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n, r = args.iterations, args.repeat

    print(f"\nwire-format checks, {n} calls per case, best of {r} (µs per call)\n")
    print("| value | check | µs | orjson.loads of the same bytes, µs |")
    print("|---|---|---|---|")
    for label, obj, check in [
        ("text answer (1 choice, 640 chars, usage with details)", TEXT_ANSWER, check_completion),
        ("answer with 8 tool calls", TOOLS_ANSWER, check_completion),
        ("content chunk", CONTENT_CHUNK, check_chunk),
        ("tool-call arguments chunk", TOOL_CHUNK, check_chunk),
        ("finish chunk", FINISH_CHUNK, check_chunk),
        ("usage chunk (choices: [])", USAGE_CHUNK, check_chunk),
    ]:
        raw = orjson.dumps(obj)
        parsed = orjson.loads(raw)
        assert check(parsed) is None, label
        t_check = _best(lambda c=check, p=parsed: c(p), n, r)
        t_loads = _best(lambda b=raw: orjson.loads(b), n, r)
        print(f"| {label} | {check.__name__} | {t_check:.2f} | {t_loads:.2f} |")

    events = [b"data: " + orjson.dumps(CONTENT_CHUNK) + b"\n\n"] * 100
    big = b"data: " + b"x" * (900 * 1024) + b"\n\n"
    reads = [big[i : i + 1024] for i in range(0, len(big), 1024)]

    def stream() -> None:
        p = SSEParser()
        for e in events:
            p.feed(e)

    def large() -> None:
        p = SSEParser()
        for c in reads:
            p.feed(c)

    m = max(1, n // 1000)
    print(f"\nSSE parsing, best of {r}\n")
    print("| input | µs |")
    print("|---|---|")
    print(f"| one content event per read, per event | {_best(stream, m, r) / len(events):.2f} |")
    print(f"| one 900 KiB event in 1 KiB reads, whole event | {_best(large, max(1, m // 10), r):.0f} |")


if __name__ == "__main__":
    main()
