"""The OpenAI API over an in-process simulated engine: shapes, usage, streaming and errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.api.openai_app import OpenAIApp
from deployments.config import AppConfig, ModelConfig, RouterConfig
from deployments.engines.profiles import ZERO_LATENCY
from deployments.engines.simulated import SimulatedEngine
from deployments.tokenizer import PromptTokenizer
from tests.support import EngineBackend, parse_sse

MODEL = "tiny"
MAX_MODEL_LEN = 1024


@pytest.fixture
async def client(embedded_model: Path) -> AsyncIterator[httpx.AsyncClient]:
    tokenizer = PromptTokenizer(str(embedded_model))
    engine = SimulatedEngine(
        ZERO_LATENCY, seed=1, detokenize=tokenizer.decode, vocab_size=tokenizer.vocab_size
    )
    await engine.start()
    config = AppConfig(
        router=RouterConfig(max_body_bytes=64 * 1024),
        models=[
            ModelConfig(
                name=MODEL,
                engine="simulated",
                source=str(embedded_model),
                device="cpu",
                max_model_len=MAX_MODEL_LEN,
            )
        ],
    )
    api = OpenAIApp(config, {MODEL: EngineBackend(engine)})
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http
    stats = engine.stats()
    await engine.shutdown()
    # No request may outlive its response (leak check at teardown).
    assert stats.num_running == 0 and stats.num_waiting == 0


def chat(content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def test_models(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
    assert (await client.get("/v1/models/nope")).status_code == 404


async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "models": [MODEL]}


async def test_completion_usage_and_length(client: httpx.AsyncClient, embedded_model: Path) -> None:
    prompt = "The quick brown fox jumps over the lazy dog"
    response = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 7}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    expected_prompt = len(PromptTokenizer(str(embedded_model)).encode_text(prompt))
    assert body["usage"] == {
        "prompt_tokens": expected_prompt,
        "completion_tokens": 7,
        "total_tokens": expected_prompt + 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert body["choices"][0]["finish_reason"] == "length"


async def test_token_id_prompt_and_n(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 3, "n": 2}
    )
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 4
    assert body["usage"]["completion_tokens"] == 6


async def test_completion_logprobs(client: httpx.AsyncClient) -> None:
    body = (
        await client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "hi", "max_tokens": 4, "logprobs": 2},
        )
    ).json()
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 4
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0


async def test_repeated_prefix_reports_cached_tokens(client: httpx.AsyncClient) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(80))
    first = (await client.post("/v1/chat/completions", json=chat(long_prompt, max_tokens=2))).json()
    second = (
        await client.post("/v1/chat/completions", json=chat(long_prompt, max_tokens=2))
    ).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < second["usage"]["prompt_tokens"]
    assert cached % ZERO_LATENCY.block_size == 0


async def test_chat_stream_with_usage(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions",
        json=chat(max_tokens=5, stream=True, stream_options={"include_usage": True}),
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events, done = parse_sse(response.text)
    assert done
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    content_chunks = [e for e in events if e["choices"]]
    assert content_chunks[-1]["choices"][0]["finish_reason"] == "length"
    usage = events[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


async def test_completion_stream_without_usage(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "a b c", "max_tokens": 4, "stream": True}
    )
    events, done = parse_sse(response.text)
    assert done
    assert all(e["usage"] is None for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    return str(error["message"])


@pytest.mark.parametrize(
    ("path", "payload", "status", "param"),
    [
        ("/v1/chat/completions", chat(max_tokens=0), 400, "max_tokens"),
        ("/v1/chat/completions", chat(temperature=3), 400, "temperature"),
        ("/v1/chat/completions", chat(top_p=0), 400, "top_p"),
        ("/v1/chat/completions", chat(n=0), 400, "n"),
        ("/v1/chat/completions", chat(stop=[""]), 400, "stop"),
        ("/v1/chat/completions", chat(stream_options={"include_usage": True}), 400, None),
        ("/v1/chat/completions", chat(top_logprobs=2), 400, None),
        ("/v1/chat/completions", chat(response_format={"type": "json_object"}), 400, None),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "x"}]}, 400, None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}, 400, "model"),
        ("/v1/chat/completions", chat(max_tokens="ten"), 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "echo": True}, 400, None),
    ],
)
async def test_bad_requests_get_400_in_openai_shape(
    client: httpx.AsyncClient, path: str, payload: dict[str, Any], status: int, param: str | None
) -> None:
    assert_error(await client.post(path, json=payload), status, param)


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={**chat(), "model": "gpt-9"})
    assert "gpt-9" in assert_error(response, 404, "model")
    assert response.json()["error"]["code"] == "model_not_found"


async def test_context_length_names_both_numbers(client: httpx.AsyncClient) -> None:
    long_prompt = " ".join(f"w{i}" for i in range(400))
    message = assert_error(
        await client.post("/v1/completions", json={"model": MODEL, "prompt": long_prompt}),
        400,
        "prompt",
    )
    assert str(MAX_MODEL_LEN) in message and "tokens" in message
    message = assert_error(
        await client.post("/v1/chat/completions", json=chat("hi", max_tokens=MAX_MODEL_LEN)),
        400,
        "max_tokens",
    )
    assert str(MAX_MODEL_LEN) in message and f"max_tokens is {MAX_MODEL_LEN}" in message


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"', b""])
async def test_unparseable_bodies(client: httpx.AsyncClient, content: bytes) -> None:
    response = await client.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert_error(response, 400)


async def test_nan_temperature_is_refused(client: httpx.AsyncClient) -> None:
    body = json.dumps(chat())[:-1] + ', "temperature": NaN}'
    response = await client.post("/v1/chat/completions", content=body)
    assert_error(response, 400, "temperature")


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat("x" * 70_000))
    assert_error(response, 413)


async def test_unknown_route_is_404_in_openai_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v2/whatever"), 404)
