"""The Anthropic upstream's translation ([upstream] api = "anthropic"): CPU per request, per answer and per stream.

    python bench/upstream_anthropic.py               # defaults: 20000 iterations per case, best of 5 runs

Three cases on the path of every upstream turn over an Anthropic provider,
timed in one process with ``time.process_time`` (CPU time: the least
disturbed by other work on a shared machine), best of ``--repeat`` runs:

- the internal chat body (bench/overhead.py's conversation) as a Messages
  request, serialized;
- a non-streamed Messages answer parsed, checked, translated into a
  ``chat.completion`` and serialized;
- an 11-event Messages stream (start, ping, a text block of 5 deltas, stop,
  message_delta, message_stop) split into events, checked and translated
  into chat chunks.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_warden.proxy.sse import SSEParser  # noqa: E402
from llm_warden.proxy.upstream_anthropic import messages_request  # noqa: E402
from llm_warden.proxy.upstream_anthropic_answer import MessagesStream, completion_of  # noqa: E402

MESSAGES: list[dict[str, Any]] = [{"role": "system", "content": "You are a helpful assistant." * 4}] + [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"Message number {i} with some words to make the body realistic. " * 3} for i in range(6)
]
BODY = {"model": "gpt-bench", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
MESSAGE = orjson.dumps(
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [{"type": "text", "text": "Hello from the fake provider."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 100, "output_tokens": 7},
    }
)


def _event(kind: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **obj}) + b"\n\n"


STREAM = [
    _event("message_start", {"message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [], "usage": {"input_tokens": 100, "output_tokens": 1}}}),
    _event("ping", {}),
    _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
    *[_event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": " word"}}) for _ in range(5)],
    _event("content_block_stop", {"index": 0}),
    _event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 7}}),
    _event("message_stop", {}),
]


def request() -> None:
    orjson.dumps(messages_request(BODY, 4096))


def answer() -> None:
    completion, _ = completion_of(orjson.loads(MESSAGE))
    orjson.dumps(completion)


def stream() -> None:
    parser, translator = SSEParser(), MessagesStream()
    for read in STREAM:  # one event per read, as providers flush
        for ev in parser.feed(read):
            translator.feed(ev)
    assert translator.done


def best(fn: Callable[[], None], iterations: int, repeat: int) -> float:
    """µs of CPU per call, the best of ``repeat`` runs."""
    for _ in range(min(1000, iterations)):
        fn()
    runs = []
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(iterations):
            fn()
        runs.append((time.process_time() - t0) / iterations * 1e6)
    return min(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print("| case | µs per call (CPU, best of runs) |")
    print("|---|---|")
    for name, fn in (
        ("chat body → Messages request (translate + serialize)", request),
        ("Messages answer → chat.completion (parse + check + translate + serialize)", answer),
        ("11-event Messages stream → chat chunks (SSE split + check + translate)", stream),
    ):
        print(f"| {name} | {best(fn, args.iterations, args.repeat):.2f} |")


if __name__ == "__main__":
    main()
