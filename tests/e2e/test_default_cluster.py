"""The embedded default on real vLLM CPU replicas, through the real `openai` client."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from tests.integration.conftest import engine_counts

pytestmark = pytest.mark.e2e
MODEL = "tiny-llama"


@pytest.fixture
def client(default_cluster: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{default_cluster}/v1", api_key="unused", max_retries=0)


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_completion(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 12
    assert response.usage.prompt_tokens > 0
    assert response.choices[0].text


def test_chat(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("length", "stop")
    assert response.usage is not None and 0 < response.usage.completion_tokens <= 8


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to ten"}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 10
    assert chunks[-1].choices == []
    assert text


def test_repeated_prompt_reports_cached_tokens(client: openai.OpenAI) -> None:
    prompt = "A long shared system prompt. " * 60  # > 2 blocks of 128 tokens
    cached = []
    for _ in range(4):
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
        assert response.usage is not None
        details = response.usage.prompt_tokens_details
        cached.append(details.cached_tokens if details else 0)
    # 4 requests over 2 replicas: at least one repeat lands where the prefix is cached.
    assert cached[0] == 0 and max(cached) >= 128


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
    assert error.value.status_code == 404
    assert "nope" in str(error.value)


def test_too_long_prompt_is_400_with_both_numbers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="word " * 5000, max_tokens=1)
    assert "2048" in str(error.value)
    assert error.value.status_code == 400


async def test_disconnect_mid_stream_frees_the_engine(default_cluster: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{default_cluster}/v1", api_key="x", max_retries=0)
    max_tokens = 2000
    stream = await client.completions.create(
        model=MODEL,
        prompt="go",
        max_tokens=max_tokens,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    started = time.monotonic()
    received = 0
    async for _ in stream:
        received += 1
        if received == 20:
            break
    per_token_s = (time.monotonic() - started) / received
    assert any(running > 0 for running, _ in await asyncio.to_thread(engine_counts))
    await stream.close()  # the client goes away mid-generation
    left = time.monotonic()
    # Had the engine kept generating, the remaining tokens would take this long: it must be
    # idle well before that.
    remaining_s = (max_tokens - received) * per_token_s
    while any(running > 0 for running, _ in await asyncio.to_thread(engine_counts)):
        waited = time.monotonic() - left
        assert waited < max(2.0, remaining_s / 2), (waited, remaining_s)
        await asyncio.sleep(0.2)
    await client.close()
