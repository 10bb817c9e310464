"""What the router's request record (its metrics, span status and access log) says a request's
outcome was: a client that leaves is a 499, a stream that fails after its first token counts with
its error's status, a refusal of a served model counts under that model, TPOT is per choice, and
every latency the defaults allow fits a histogram bucket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.api.openai_app import ModelBackend, UnavailableError
from deployments.config import ModelAutoscalingConfig, RouterConfig
from deployments.engines.base import EngineOutput, EngineRequest
from deployments.engines.simulated import SimulatedEngine
from deployments.observability.config import AccessLogConfig, TracingConfig
from deployments.observability.metrics import E2E_MS_BOUNDARIES, TTFT_MS_BOUNDARIES
from deployments.observability.middleware import ObservedApp
from deployments.observability.record import RequestRecord
from deployments.observability.tracing import tracer, tracer_provider
from tests.support import (
    API_MAX_MODEL_LEN,
    API_MODEL,
    CMPL,
    EngineBackend,
    asgi_post_scope,
    observed_client,
    parse_sse,
    simulated_app,
)


class FailsAfterFirstOutput(EngineBackend):
    """The replica dies once the first output is out: the stream already answered 200."""

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineOutput]]:
        yield [EngineOutput(request_id=request.request_id, token_ids=(5,))]
        raise UnavailableError("the replica died")


class HangsAfterFirstOutput(EngineBackend):
    """A long generation: the first output, then nothing until the caller goes."""

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineOutput]]:
        yield [EngineOutput(request_id=request.request_id, token_ids=(5,))]
        await asyncio.Event().wait()


@asynccontextmanager
async def observed(
    embedded_model: Path, backend: Callable[[SimulatedEngine], ModelBackend] = EngineBackend
) -> AsyncIterator[tuple[httpx.AsyncClient, list[RequestRecord]]]:
    async with (
        simulated_app(embedded_model, RouterConfig(), backend) as (_, _, api),
        observed_client(
            api.app,
            tracer(tracer_provider(TracingConfig(), "router")),
            AccessLogConfig(enabled=False),
        ) as (http, finished),
    ):
        yield http, finished


def body(**fields: Any) -> dict[str, Any]:
    return {"model": API_MODEL, "prompt": "hello", "max_tokens": 4, **fields}


async def test_a_stream_that_fails_after_its_first_token_counts_with_its_error(
    embedded_model: Path,
) -> None:
    """It answered 200 before it failed; counted as 200, the 5xx share (and its alert) never
    saw a streamed failure."""
    async with observed(embedded_model, FailsAfterFirstOutput) as (http, finished):
        response = await http.post("/v1/completions", json=body(stream=True))
        events, done = parse_sse(response.text)
        assert response.status_code == 200 and not done and events[-1]["error"]
        assert finished[-1].status == 503
        response = await http.post("/v1/completions", json=body())  # the same, not streamed
        assert response.status_code == 503 and finished[-1].status == 503


async def test_a_client_that_leaves_is_a_499(embedded_model: Path) -> None:
    """Serve cancels the request's task when the client goes: it was counted as a 500."""
    async with observed(embedded_model, HangsAfterFirstOutput) as (http, finished):
        for stream in (False, True):
            request = asyncio.create_task(http.post("/v1/completions", json=body(stream=stream)))
            await asyncio.sleep(0.1)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            assert finished[-1].status == 499, stream


async def test_a_stream_the_client_left_is_a_499_not_a_200(embedded_model: Path) -> None:
    """A client gone mid-stream reaches the app as an `http.disconnect`: Starlette's streaming
    response then stops and returns normally, with no cancellation, and the request counted as
    a 200 (in the metrics behind the 5xx alert, the span and the access log)."""
    finished: list[RequestRecord] = []

    class Sink:
        def request_finished(self, record: RequestRecord) -> None:
            finished.append(record)

    request = {"type": "http.request", "body": json.dumps(body(stream=True)).encode()}
    first_chunk = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if request:
            message = dict(request)
            request.clear()
            return message
        await first_chunk.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    async with simulated_app(embedded_model, RouterConfig(), HangsAfterFirstOutput) as (_, _, api):
        router_tracer = tracer(tracer_provider(TracingConfig(), "router"))
        app = ObservedApp(api.app, router_tracer, Sink(), AccessLogConfig(enabled=False))
        await asyncio.wait_for(app(asgi_post_scope(CMPL), receive, send), timeout=30)
    assert first_chunk.is_set() and finished[-1].status == 499


async def test_a_refusal_of_a_served_model_counts_under_it(embedded_model: Path) -> None:
    async with observed(embedded_model) as (http, finished):
        too_long = body(max_tokens=API_MAX_MODEL_LEN + 1)
        assert (await http.post("/v1/completions", json=too_long)).status_code == 400
        assert (finished[-1].status, finished[-1].model) == (400, API_MODEL)
        unknown = {**body(), "model": "nope"}
        assert (await http.post("/v1/completions", json=unknown)).status_code == 404
        assert (finished[-1].status, finished[-1].model) == (404, None)


async def test_tpot_is_per_choice(embedded_model: Path) -> None:
    """The n choices decode side by side: over all their tokens, n = 4 read 4x faster."""
    async with observed(embedded_model) as (http, finished):
        request = body(max_tokens=8, ignore_eos=True, temperature=1.0)
        await http.post("/v1/completions", json={**request, "n": 4})
        record = finished[-1]
        assert record.completion_tokens == 32 and max(record.choice_tokens.values()) == 8
        assert record.first_token is not None and record.end is not None
        assert record.tpot_ms == pytest.approx((record.end - record.first_token) * 1000 / 7)


def test_the_latency_buckets_reach_the_default_timeouts() -> None:
    """Past the last bound a value is only 'above it': a model's cold start (up to
    cold_start_timeout_s) and a long request (up to request_timeout_s) read as that bound."""
    assert TTFT_MS_BOUNDARIES[-1] >= ModelAutoscalingConfig().cold_start_timeout_s * 1000
    assert E2E_MS_BOUNDARIES[-1] >= RouterConfig().request_timeout_s * 1000
