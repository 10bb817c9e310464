"""A model that scales to zero: the router holds a request for a bounded time, then 503s."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from deployments.api.openai_app import OpenAIApp
from deployments.config import AppConfig, ModelConfig
from deployments.engines.profiles import ZERO_LATENCY
from deployments.engines.simulated import SimulatedEngine
from deployments.tokenizer import PromptTokenizer
from tests.support import EngineBackend

HOLD_S = 0.3


class ColdBackend(EngineBackend):
    """An engine behind a replica that becomes ready `start_delay_s` after the first request."""

    def __init__(self, engine: SimulatedEngine, start_delay_s: float) -> None:
        super().__init__(engine)
        self.start_delay_s = start_delay_s
        self.held = 0
        self.cancelled = 0

    async def generate(self, request):  # type: ignore[no-untyped-def, override]
        self.held += 1
        try:
            await asyncio.sleep(self.start_delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        async for batch in super().generate(request):
            yield batch


async def app(embedded_model: Path, start_delay_s: float) -> tuple[OpenAIApp, ColdBackend]:
    tokenizer = PromptTokenizer(str(embedded_model))
    engine = SimulatedEngine(ZERO_LATENCY, seed=1, vocab_size=tokenizer.vocab_size)
    await engine.start()
    model = ModelConfig(
        name="m",
        engine="simulated",
        source=str(embedded_model),
        device="cpu",
        max_model_len=512,
        autoscaling={"enabled": True, "min_replicas": 0, "cold_start_timeout_s": HOLD_S},
    )
    backend = ColdBackend(engine, start_delay_s)
    return OpenAIApp(AppConfig(models=[model]), {"m": backend}), backend


async def post(api: OpenAIApp, stream: bool) -> httpx.Response:
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        body = {"model": "m", "prompt": "hello", "max_tokens": 4, "stream": stream}
        return await http.post("/v1/completions", json=body)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_is_held_until_the_replica_is_ready(
    embedded_model: Path, stream: bool
) -> None:
    api, backend = await app(embedded_model, start_delay_s=HOLD_S / 3)
    response = await post(api, stream)
    assert response.status_code == 200, response.text
    assert backend.held == 1 and backend.cancelled == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_beyond_the_hold_503_with_retry_after_and_the_request_is_dropped(
    embedded_model: Path, stream: bool
) -> None:
    api, backend = await app(embedded_model, start_delay_s=10 * HOLD_S)
    response = await post(api, stream)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "10"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "no replica ready after 0.3 s" in error["message"]
    assert backend.cancelled == 1  # the waiting handle call is cancelled, not left queued


async def test_a_model_that_just_served_queues_its_requests_under_the_deadline(
    embedded_model: Path,
) -> None:
    """Once a replica answered within the idle period the model is up: a request that waits
    longer than the hold (queued behind busy replicas) is served, not a 503 "starting from
    zero" (every request of a scale-to-zero model had the cold start's bound)."""
    api, backend = await app(embedded_model, start_delay_s=0.0)
    assert (await post(api, stream=False)).status_code == 200  # the model is up
    backend.start_delay_s = 3 * HOLD_S  # now a busy replica, not a cold start
    response = await post(api, stream=True)
    assert response.status_code == 200, response.text
    assert backend.cancelled == 0
