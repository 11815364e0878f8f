"""The fake provider's native Anthropic Messages wire, checked by the official ``anthropic`` SDK pointed straight at it."""

from __future__ import annotations

import anthropic
import pytest

from tests.fakeprovider import FakeProvider, Reply


def sdk(fake: FakeProvider, api_key: str = "sk-ant-test") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=fake.base_url.removesuffix("/v1"), api_key=api_key, max_retries=0, timeout=10)


async def test_the_sdk_accepts_a_message_with_text_and_tool_use(fake: FakeProvider) -> None:
    fake.push(Reply(content="Looking.", tool_calls=[{"name": "get_weather", "arguments": '{"city": "Paris"}', "id": "toolu_01"}], usage={"prompt_tokens": 12, "completion_tokens": 7}))
    async with sdk(fake) as client:
        msg = await client.messages.create(model="claude-x", max_tokens=50, messages=[{"role": "user", "content": "Weather?"}])
    assert msg.stop_reason == "tool_use" and msg.model == "claude-x"
    assert msg.content[0].type == "text" and msg.content[0].text == "Looking."
    assert msg.content[1].type == "tool_use" and msg.content[1].input == {"city": "Paris"} and msg.content[1].id == "toolu_01"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (12, 7)
    sent = fake.anthropic_requests()[-1]
    assert sent.headers["Authorization"] == "Bearer sk-ant-test" and sent.headers["anthropic-version"]


async def test_the_sdk_accumulates_the_stream(fake: FakeProvider) -> None:
    fake.push(Reply(content="one two three", tool_calls=[{"name": "lookup", "arguments": '{"q": "abc", "n": 3}'}], usage={"prompt_tokens": 5, "completion_tokens": 9}))
    async with sdk(fake) as client:
        async with client.messages.stream(model="claude-x", max_tokens=50, messages=[{"role": "user", "content": "go"}]) as stream:
            texts = [t async for t in stream.text_stream]
            final = await stream.get_final_message()
    assert "".join(texts) == "one two three"
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[1].input == {"q": "abc", "n": 3}
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 9 and final.usage.input_tokens == 5


@pytest.mark.parametrize(("status", "cls"), [(529, anthropic.InternalServerError), (429, anthropic.RateLimitError), (400, anthropic.BadRequestError)])
async def test_the_sdk_reads_the_error_bodies(fake: FakeProvider, status: int, cls: type[Exception]) -> None:
    fake.push(Reply(status=status, error="nope"))
    async with sdk(fake) as client:
        with pytest.raises(cls) as info:
            await client.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert "nope" in str(info.value)
    if status == 529:
        assert isinstance(info.value, anthropic.APIStatusError) and info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


async def test_a_request_without_the_version_header_is_refused_as_anthropic_does(fake: FakeProvider) -> None:
    async with sdk(fake) as client:
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "x"}], extra_headers={"anthropic-version": ""})


async def test_the_sdk_counts_tokens(fake: FakeProvider) -> None:
    async with sdk(fake) as client:
        count = await client.messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "count these words please"}])
    assert count.input_tokens > 0
