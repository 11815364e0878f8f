"""The provider wire-format checks: real providers' answers pass, each defect is named."""

from __future__ import annotations

import copy
from typing import Any

import aiohttp
import orjson
import pytest

from llm_warden.proxy.sse import DONE, SSEParser
from llm_warden.proxy.wire import check_chunk, check_completion
from tests.fakeprovider import MALFORMED, FakeProvider, Reply, malformed_payload

# --- answers real providers send (shapes taken from their documented/observed output) ---

OPENAI_TEXT: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-2024-08-06",
    "system_fingerprint": "fp_1",
    "service_tier": "default",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi.", "refusal": None, "annotations": []}, "logprobs": None, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 9,
        "completion_tokens": 2,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    },
}
OPENAI_TOOLS: dict[str, Any] = {
    **OPENAI_TEXT,
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                    {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
}
OPENAI_LEGACY = {**OPENAI_TEXT, "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}, "finish_reason": "function_call"}]}
VLLM: dict[str, Any] = {
    "id": "chatcmpl-2",
    "object": "chat.completion",
    "created": 1,
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "reasoning_content": None, "content": "ok", "tool_calls": []}, "logprobs": None, "finish_reason": "stop", "stop_reason": None}
    ],
    "usage": {"prompt_tokens": 5, "total_tokens": 6, "completion_tokens": 1, "prompt_tokens_details": None},
    "prompt_logprobs": None,
}
VLLM_TOOL_WITH_STOP = copy.deepcopy(VLLM)
VLLM_TOOL_WITH_STOP["choices"][0]["message"]["tool_calls"] = [{"id": "chatcmpl-tool-1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
OLLAMA = {
    "id": "chatcmpl-3",
    "object": "chat.completion",
    "created": 1,
    "model": "llama3.2",
    "system_fingerprint": "fp_ollama",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
AZURE = {
    **OPENAI_TEXT,
    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}}}],
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi."},
            "finish_reason": "stop",
            "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}},
        }
    ],
}
MISTRAL_PARTS = {
    **OLLAMA,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": [{"type": "thinking", "thinking": [{"type": "text", "text": "hm"}]}, {"type": "text", "text": "4"}]},
            "finish_reason": "model_length",
        }
    ],
}
TGI_OLD = {**OLLAMA, "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "logprobs": None, "finish_reason": "eos_token"}]}
GROQ = {**OLLAMA, "usage": {"queue_time": 0.01, "prompt_tokens": 3, "prompt_time": 0.001, "completion_tokens": 1, "completion_time": 0.002, "total_tokens": 4, "total_time": 0.003}, "x_groq": {"id": "req_1"}}
NO_ROLE = {**OLLAMA, "choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": None}]}
TWO_CHOICES = {**OLLAMA, "choices": [{"index": 0, "message": {"content": "a"}, "finish_reason": "stop"}, {"index": 1, "message": {"content": "b"}, "finish_reason": "length"}]}


@pytest.mark.parametrize(
    "answer",
    [OPENAI_TEXT, OPENAI_TOOLS, OPENAI_LEGACY, VLLM, VLLM_TOOL_WITH_STOP, OLLAMA, AZURE, MISTRAL_PARTS, TGI_OLD, GROQ, NO_ROLE, TWO_CHOICES],
    ids=["openai", "openai-tools", "openai-legacy", "vllm", "vllm-tool-stop", "ollama", "azure", "mistral-parts", "tgi-eos", "groq", "no-role", "n2"],
)
def test_real_provider_answers_are_well_formed(answer: dict[str, Any]) -> None:
    assert check_completion(orjson.loads(orjson.dumps(answer))) is None


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **top: Any) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": delta if delta is not None else {}, "logprobs": None, "finish_reason": finish}
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice], **top}


REAL_CHUNKS = {
    "role": _chunk({"role": "assistant", "content": "", "refusal": None}, usage=None),
    "content": _chunk({"content": "Hel"}),
    "tool-first": _chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
    "tool-args": _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
    "parallel-tools": _chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f"}}, {"index": 1, "id": "b", "function": {"name": "g"}}]}),
    "same-call-twice-in-one-chunk": _chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"arguments": "{"}}, {"index": 0, "id": "a", "function": {"arguments": "}"}}]}),
    "finish": _chunk({}, "tool_calls"),
    "usage": {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
    "azure-first": {"choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]},
    "azure-filter-no-delta": {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "finish_reason": None, "content_filter_offsets": {}, "content_filter_results": {}}]},
    "gemini-no-index": _chunk({"role": "assistant", "tool_calls": [{"id": "fc_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
    "ollama-whole-call": _chunk({"role": "assistant", "content": "", "tool_calls": [{"id": "call_x", "index": 0, "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]}),
    "legacy": _chunk({"function_call": {"name": "f", "arguments": ""}}),
    "legacy-args": _chunk({"function_call": {"arguments": "{}"}}),
    "vllm-reasoning": _chunk({"reasoning_content": "hm", "content": None}),
    "tgi-old": {**_chunk({"role": "assistant", "content": "x"}, "stop_sequence"), "object": "text_completion"},
    "no-delta-null": {"id": "c", "choices": [{"index": 0, "delta": None, "finish_reason": "stop"}]},
}


@pytest.mark.parametrize("name", sorted(REAL_CHUNKS))
def test_real_provider_chunks_are_well_formed(name: str) -> None:
    assert check_chunk(orjson.loads(orjson.dumps(REAL_CHUNKS[name]))) is None


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with the dotted ``path`` set to ``value`` (``_DEL`` deletes it)."""
    obj = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = obj
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is _DEL:
        del node[int(last) if isinstance(node, list) else last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return obj


_DEL = object()
TC = "choices.0.message.tool_calls"

BAD_COMPLETIONS = [
    ([], "the answer is not a JSON object"),
    ("x", "the answer is not a JSON object"),
    (_with(OPENAI_TOOLS, "error", {"message": "boom"}), "an error object in a 2xx answer"),
    (_with(OPENAI_TEXT, "error", "boom"), "an error object in a 2xx answer"),
    (_with(OPENAI_TEXT, "choices", _DEL), "choices is missing"),
    (_with(OPENAI_TEXT, "choices", {"0": {}}), "choices is not a list"),
    (_with(OPENAI_TEXT, "choices", []), "choices is empty"),
    (_with(OPENAI_TEXT, "choices.0", "x"), "choices[0] is not an object"),
    (_with(OPENAI_TEXT, "choices.0.index", _DEL), "choices[0].index is missing"),
    (_with(OPENAI_TEXT, "choices.0.index", True), "choices[0].index is not a non-negative integer"),
    (_with(OPENAI_TEXT, "choices.0.index", -1), "choices[0].index is not a non-negative integer"),
    (_with(TWO_CHOICES, "choices.1.index", 0), "choices[1].index repeats an earlier choice's index"),
    (_with(OPENAI_TEXT, "choices.0.message", _DEL), "choices[0].message is missing"),
    (_with(OPENAI_TEXT, "choices.0.message", []), "choices[0].message is not an object"),
    (_with(OPENAI_TEXT, "choices.0.message.role", "tool"), "choices[0].message.role is 'tool', not 'assistant'"),
    (_with(OPENAI_TEXT, "choices.0.message.role", "x" * 100), "choices[0].message.role is not 'assistant'"),
    (_with(OPENAI_TEXT, "choices.0.message.content", 1), "choices[0].message.content is not a string, null or a list of parts"),
    (_with(OPENAI_TEXT, "choices.0.message.content", ["x"]), "choices[0].message.content[0] is not an object"),
    (_with(OPENAI_TEXT, "choices.0.message.content", [{"text": "x"}]), "choices[0].message.content[0].type is not a string"),
    (_with(OPENAI_TEXT, "choices.0.message.content", [{"type": "text", "text": 1}]), "choices[0].message.content[0].text is not a string"),
    (_with(OPENAI_TEXT, "choices.0.message.refusal", False), "choices[0].message.refusal is not a string"),
    (_with(OPENAI_TOOLS, TC, {"0": {}}), "choices[0].message.tool_calls is not a list"),
    (_with(OPENAI_TOOLS, f"{TC}.1", "call"), "choices[0].message.tool_calls[1] is not an object"),
    (_with(OPENAI_TOOLS, f"{TC}.1.id", _DEL), "choices[0].message.tool_calls[1].id is not a string"),
    (_with(OPENAI_TOOLS, f"{TC}.1.id", "call_a"), "choices[0].message.tool_calls[1].id repeats an earlier call's id"),
    (_with(OPENAI_TOOLS, f"{TC}.1.type", "custom"), "choices[0].message.tool_calls[1].type is not 'function'"),
    (_with(OPENAI_TOOLS, f"{TC}.1.type", _DEL), "choices[0].message.tool_calls[1].type is not 'function'"),
    (_with(OPENAI_TOOLS, f"{TC}.1.function", "f"), "choices[0].message.tool_calls[1].function is not an object"),
    (_with(OPENAI_TOOLS, f"{TC}.1.function.name", None), "choices[0].message.tool_calls[1].function.name is not a string"),
    (_with(OPENAI_TOOLS, f"{TC}.1.function.arguments", {"a": 1}), "choices[0].message.tool_calls[1].function.arguments is not a string"),
    (_with(OPENAI_LEGACY, "choices.0.message.function_call", "f"), "choices[0].message.function_call is not an object"),
    (_with(OPENAI_LEGACY, "choices.0.message.function_call.name", 1), "choices[0].message.function_call.name is not a string"),
    (_with(OPENAI_LEGACY, "choices.0.message.function_call.arguments", {}), "choices[0].message.function_call.arguments is not a string"),
    (_with(OPENAI_TEXT, "choices.0.finish_reason", "xyz"), "unknown finish_reason 'xyz' in choices[0]"),
    (_with(OPENAI_TEXT, "choices.0.finish_reason", "no such\nreason"), "unknown finish_reason in choices[0]"),
    (_with(OPENAI_TEXT, "choices.0.finish_reason", ["stop"]), "choices[0].finish_reason is not a string"),
    (_with(OPENAI_TEXT, "choices.0.finish_reason", "abort"), "choices[0].finish_reason 'abort': the provider did not complete the answer"),
    (_with(OPENAI_TEXT, "choices.0.finish_reason", "error"), "choices[0].finish_reason 'error': the provider did not complete the answer"),
    (_with(OPENAI_TEXT, "usage", [1]), "usage is not an object"),
    (_with(OPENAI_TEXT, "usage.prompt_tokens", -1), "usage.prompt_tokens is not a token count (an integer from 0 to 2**53-1)"),
    (_with(OPENAI_TEXT, "usage.completion_tokens", 1.5), "usage.completion_tokens is not a token count (an integer from 0 to 2**53-1)"),
    (_with(OPENAI_TEXT, "usage.total_tokens", "11"), "usage.total_tokens is not a token count (an integer from 0 to 2**53-1)"),
    (_with(OPENAI_TEXT, "usage.total_tokens", 2**63), "usage.total_tokens is not a token count (an integer from 0 to 2**53-1)"),
    (_with(OPENAI_TEXT, "usage.total_tokens", True), "usage.total_tokens is not a token count (an integer from 0 to 2**53-1)"),
    (_with(GROQ, "usage.queue_time", -0.5), "usage.queue_time is negative"),
    (_with(OPENAI_TEXT, "usage.prompt_tokens_details.cached_tokens", -3), "usage.prompt_tokens_details.cached_tokens is negative"),
    (_with(OPENAI_TEXT, "model", 5), "model is not a string"),
    (_with(OPENAI_TEXT, "object", {}), "object is not a string"),
]


@pytest.mark.parametrize(("answer", "reason"), BAD_COMPLETIONS, ids=[r for _, r in BAD_COMPLETIONS])
def test_each_completion_defect_is_named(answer: Any, reason: str) -> None:
    assert check_completion(answer) == reason


D = "choices.0.delta"
TOOL_DELTA = REAL_CHUNKS["tool-first"]
BAD_CHUNKS = [
    (None, "the stream event is not a JSON object"),
    (_with(REAL_CHUNKS["content"], "error", {"message": "overloaded"}), "an error object in a stream event"),
    ({"error": {"message": "x"}}, "an error object in a stream event"),
    (_with(REAL_CHUNKS["content"], "choices", _DEL), "choices is missing"),
    (_with(REAL_CHUNKS["content"], "choices", "x"), "choices is not a list"),
    (_with(REAL_CHUNKS["content"], "choices.0", 0), "choices[0] is not an object"),
    (_with(REAL_CHUNKS["content"], "choices.0.index", "0"), "choices[0].index is not a non-negative integer"),
    ({"choices": [{"index": 0, "delta": {}}, {"index": 0, "delta": {}}]}, "choices[1].index repeats an earlier choice's index"),
    (_with(REAL_CHUNKS["content"], D, "text"), "choices[0].delta is not an object"),
    (_with(REAL_CHUNKS["content"], f"{D}.role", "user"), "choices[0].delta.role is 'user', not 'assistant'"),
    (_with(REAL_CHUNKS["content"], f"{D}.content", {"text": "x"}), "choices[0].delta.content is not a string, null or a list of parts"),
    (_with(REAL_CHUNKS["content"], f"{D}.refusal", 1), "choices[0].delta.refusal is not a string"),
    (_with(TOOL_DELTA, f"{D}.tool_calls", {"index": 0}), "choices[0].delta.tool_calls is not a list"),
    (_with(TOOL_DELTA, f"{D}.tool_calls.0", "x"), "choices[0].delta.tool_calls[0] is not an object"),
    (_with(TOOL_DELTA, f"{D}.tool_calls.0.index", "0"), "choices[0].delta.tool_calls[0].index is not a non-negative integer"),
    (_with(TOOL_DELTA, f"{D}.tool_calls.0.index", -1), "choices[0].delta.tool_calls[0].index is not a non-negative integer"),
    (_with(TOOL_DELTA, f"{D}.tool_calls.0.index", False), "choices[0].delta.tool_calls[0].index is not a non-negative integer"),
    (_with(TOOL_DELTA, f"{D}.tool_calls.0.id", 7), "choices[0].delta.tool_calls[0].id is not a string"),
    (_with(TOOL_DELTA, f"{D}.tool_calls.0.type", "custom"), "choices[0].delta.tool_calls[0].type is not 'function'"),
    (_with(TOOL_DELTA, f"{D}.tool_calls.0.function", []), "choices[0].delta.tool_calls[0].function is not an object"),
    (_with(TOOL_DELTA, f"{D}.tool_calls.0.function.name", 1), "choices[0].delta.tool_calls[0].function.name is not a string"),
    (_with(TOOL_DELTA, f"{D}.tool_calls.0.function.arguments", {}), "choices[0].delta.tool_calls[0].function.arguments is not a string"),
    (_with(REAL_CHUNKS["parallel-tools"], f"{D}.tool_calls.1.id", "a"), "choices[0].delta.tool_calls[1].id names another call of the same chunk"),
    (_with(REAL_CHUNKS["legacy"], f"{D}.function_call", "f"), "choices[0].delta.function_call is not an object"),
    (_with(REAL_CHUNKS["legacy"], f"{D}.function_call.arguments", 1), "choices[0].delta.function_call.arguments is not a string"),
    (_with(REAL_CHUNKS["finish"], "choices.0.finish_reason", "eos"), "unknown finish_reason 'eos' in choices[0]"),
    (_with(REAL_CHUNKS["finish"], "choices.0.finish_reason", "abort"), "choices[0].finish_reason 'abort': the provider did not complete the answer"),
    (_with(REAL_CHUNKS["usage"], "usage.prompt_tokens", -2), "usage.prompt_tokens is not a token count (an integer from 0 to 2**53-1)"),
    (_with(REAL_CHUNKS["usage"], "usage", "1"), "usage is not an object"),
    (_with(REAL_CHUNKS["content"], "model", ["m"]), "model is not a string"),
]


@pytest.mark.parametrize(("chunk", "reason"), BAD_CHUNKS, ids=[r for _, r in BAD_CHUNKS])
def test_each_chunk_defect_is_named(chunk: Any, reason: str) -> None:
    assert check_chunk(chunk) == reason


def test_a_completion_is_not_a_chunk_and_a_chunk_is_not_a_completion() -> None:
    """A provider that streams when asked not to (or the reverse) is caught by the shape, not by ``object``."""
    assert check_completion(REAL_CHUNKS["content"]) == "choices[0].message is missing"
    assert check_chunk(OPENAI_TEXT) is None  # a message in a chunk is an unknown key; the empty delta carries nothing


def test_reasons_never_echo_provider_text() -> None:
    secret = "sk-live-SECRET-" + "z" * 40
    cases = [
        _with(OPENAI_TEXT, "choices.0.finish_reason", secret),
        _with(OPENAI_TEXT, "choices.0.message.role", secret),
        _with(OPENAI_TOOLS, f"{TC}.0.function.arguments", {secret: secret}),
        _with(OPENAI_TEXT, "error", {"message": secret}),
    ]
    for c in cases:
        reason = check_completion(c)
        assert reason is not None and "SECRET" not in reason and len(reason) < 120


# --- the fake provider's malformed answers, over HTTP ---

EXPECTED: dict[str, tuple[str | None, str | None]] = {
    # name: (non-streamed reason, streamed reason); "json" = not parseable at all
    "error_beside_tool_calls": ("an error object in a 2xx answer", "an error object in a stream event"),
    "error_only": ("an error object in a 2xx answer", "an error object in a stream event"),
    "not_an_object": ("the answer is not a JSON object", "the stream event is not a JSON object"),
    "choices_object": ("choices is not a list", "choices is not a list"),
    "choices_missing": ("choices is missing", "choices is missing"),
    "choices_empty": ("choices is empty", None),
    "choice_index_string": ("choices[0].index is not a non-negative integer", "choices[0].index is not a non-negative integer"),
    "message_missing": ("choices[0].message is missing", "choices[0].delta is not an object"),
    "role_not_assistant": ("choices[0].message.role is 'system', not 'assistant'", "choices[0].delta.role is 'system', not 'assistant'"),
    "content_number": ("choices[0].message.content is not a string, null or a list of parts", "choices[0].delta.content is not a string, null or a list of parts"),
    "tool_calls_object": ("choices[0].message.tool_calls is not a list", "choices[0].delta.tool_calls is not a list"),
    "tool_call_id_number": ("choices[0].message.tool_calls[0].id is not a string", "choices[0].delta.tool_calls[0].id is not a string"),
    "tool_call_type_custom": ("choices[0].message.tool_calls[0].type is not 'function'", "choices[0].delta.tool_calls[0].type is not 'function'"),
    "arguments_not_string": (
        "choices[0].message.tool_calls[0].function.arguments is not a string",
        "choices[0].delta.tool_calls[0].function.arguments is not a string",
    ),
    "duplicate_tool_call_ids": ("choices[0].message.tool_calls[1].id repeats an earlier call's id", "choices[0].delta.tool_calls[1].id names another call of the same chunk"),
    "tool_call_index_negative": (None, "choices[0].delta.tool_calls[0].index is not a non-negative integer"),
    "unknown_finish_reason": ("unknown finish_reason 'xyz' in choices[0]", "unknown finish_reason 'xyz' in choices[0]"),
    "abort_finish_reason": ("choices[0].finish_reason 'abort': the provider did not complete the answer",) * 2,
    "negative_usage": ("usage.prompt_tokens is not a token count (an integer from 0 to 2**53-1)",) * 2,
    "truncated_json": ("json", "json"),
}


def test_every_fake_malformed_answer_has_an_expectation() -> None:
    assert set(EXPECTED) == set(MALFORMED)
    with pytest.raises(ValueError, match="unknown malformed answer"):
        Reply(malformed="no_such_defect")


def _judge(data: bytes, check: Any) -> str | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "json"
    reason: str | None = check(obj)
    return reason


@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_fake_provider_malformed_non_streamed(fake: FakeProvider, name: str) -> None:
    fake.push(Reply(malformed=name))
    async with aiohttp.ClientSession() as s, s.post(f"{fake.base_url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status == (201 if name == "error_beside_tool_calls" else 200)
        body = await r.read()
    assert _judge(body, check_completion) == EXPECTED[name][0]


@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_fake_provider_malformed_stream_goes_bad_mid_way(fake: FakeProvider, name: str) -> None:
    fake.push(Reply(malformed=name, malformed_after=2))
    req = {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s, s.post(f"{fake.base_url}/chat/completions", json=req) as r:
        assert r.status == 200
        parser = SSEParser()
        events = [ev for chunk in [await r.read()] for ev in parser.feed(chunk)] + parser.close()
    payloads = [ev.data for ev in events if ev.data is not None and ev.data != DONE]
    verdicts = [_judge(p, check_chunk) for p in payloads]
    assert events[-1].data == DONE
    assert verdicts[:2] == [None, None]  # the good start of the stream
    assert verdicts[2] == EXPECTED[name][1]
    assert all(v is None for v in verdicts[3:])  # the rest of the normal stream


def test_malformed_payload_is_usable_without_a_server() -> None:
    out = malformed_payload("choices_object", copy.deepcopy(OPENAI_TEXT), "message")
    assert check_completion(orjson.loads(out)) == "choices is not a list"
    assert check_completion(OPENAI_TEXT) is None  # the deep copy kept the original intact
