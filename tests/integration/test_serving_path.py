"""The app on real Ray Serve with simulated engines: concurrency, usage, streaming, health."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings

from tests import fuzz
from tests.integration.conftest import engine_counts

pytestmark = pytest.mark.integration


async def test_50_concurrent_requests_complete_with_correct_usage(simulated_app: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{simulated_app}/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> tuple[int, int, int]:
        max_tokens = 5 + i % 7
        messages = [{"role": "user", "content": f"request {i}: " + "tell me a story " * (i % 5)}]
        if i % 2:
            stream = await client.chat.completions.create(
                model="sim",
                messages=messages,
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
            finish = None
            usage = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    usage = chunk.usage
            assert finish == "length" and usage is not None
        else:
            response = await client.chat.completions.create(
                model="sim", messages=messages, max_tokens=max_tokens
            )
            assert response.choices[0].finish_reason == "length"
            usage = response.usage
            assert usage is not None
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        return max_tokens, usage.completion_tokens, usage.prompt_tokens

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert all(asked == got for asked, got, _ in results)
    assert all(prompt > 0 for _, _, prompt in results)
    await client.close()


async def test_repeated_prompts_hit_the_prefix_cache(simulated_app: str) -> None:
    prompt = "shared system prompt " * 40
    async with httpx.AsyncClient(base_url=simulated_app, timeout=60) as http:
        cached = []
        for _ in range(6):
            body = (
                await http.post(
                    "/v1/completions", json={"model": "sim", "prompt": prompt, "max_tokens": 2}
                )
            ).json()
            cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
    # The default routing (cache_load) sends every repeat to the replica that holds the prompt.
    assert cached[0] == 0
    assert all(c > 0 for c in cached[1:]), cached


async def test_request_id_is_echoed_once_or_generated(simulated_app: str) -> None:
    async with httpx.AsyncClient(base_url=simulated_app) as http:
        echoed = await http.get("/v1/models", headers={"X-Request-Id": "abc-123"})
        generated = await http.get("/v1/models")
    assert echoed.headers.get_list("x-request-id") == ["abc-123"]
    assert len(generated.headers.get_list("x-request-id")) == 1


async def test_health_reports_every_model(simulated_app: str) -> None:
    async with httpx.AsyncClient(base_url=simulated_app) as http:
        response = await http.get("/health")
    assert response.status_code == 200
    assert response.json()["models"] == ["sim"]


async def test_disconnect_mid_stream_frees_the_engine(simulated_app: str) -> None:
    async with httpx.AsyncClient(base_url=simulated_app, timeout=30) as http:
        payload = {
            "model": "sim",
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 3000,
            "stream": True,
        }
        async with http.stream("POST", "/v1/chat/completions", json=payload) as response:
            chunks = 0
            async for _ in response.aiter_lines():
                chunks += 1
                if chunks > 5:
                    break
        # The stream is closed here mid-generation. 3000 tokens at ~5 ms each end by themselves
        # after 16-19 s: an engine idle within 5 s was aborted.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(running == 0 for running, _ in await asyncio.to_thread(engine_counts)):
            return
        await asyncio.sleep(0.5)
    pytest.fail(f"engine still running after the client left: {engine_counts()}")


@settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(request=fuzz.requests("sim"))
def test_fuzzed_requests_over_http_never_get_a_5xx(
    simulated_app: str, request: tuple[str, dict[str, Any]]
) -> None:
    """The in-process fuzz (tests/unit/test_fuzz_api.py), fewer cases, through Serve's proxy."""
    path, body = request
    with httpx.Client(base_url=simulated_app, timeout=60) as http:
        response = http.post(
            path, content=fuzz.encode(body), headers={"content-type": "application/json"}
        )
    fuzz.check_answer(response.status_code, response.headers.get("content-type", ""), response.text)
