"""Helpers shared by the test suites."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest

from cluster import ingress
from cluster.config import IngressConfig
from deployments.api.openai_app import ModelBackend, OpenAIApp, SharedLimiter
from deployments.config import AppConfig, ModelConfig, RouterConfig
from deployments.engines.base import Engine, EngineOutput, EngineRequest, EngineStats
from deployments.engines.profiles import ZERO_LATENCY
from deployments.engines.simulated import SimulatedEngine
from deployments.tokenizer import PromptTokenizer


@contextmanager
def ingress_environment(config: IngressConfig | None = None) -> Iterator[None]:
    """The environment a local Ray started in this block serves HTTP with: HAProxy in front of
    the routers by default, as `serve` runs it (cluster/ingress.py). Ray's processes read it
    when they start, so it is only needed around ray.init."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in ingress.ray_env(config or IngressConfig()).items():
            env.setenv(name, value)
        yield


API_MODEL = "tiny"
API_MAX_MODEL_LEN = 1024


class EngineBackend:
    """A ModelBackend over an in-process engine: the API without Ray."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineOutput]]:
        # Closing the engine's stream when this one closes early is what aborts the request.
        async with aclosing(self.engine.generate(request)) as outputs:
            async for output in outputs:
                yield [output]

    async def stats(self) -> EngineStats:
        await self.engine.check_health()
        return self.engine.stats()


def parse_sse(body: str) -> tuple[list[dict], bool]:
    """The JSON events of an SSE body, and whether it ended with [DONE]."""
    events = [line.removeprefix("data: ") for line in body.split("\n\n") if line.strip()]
    done = bool(events) and events[-1] == "[DONE]"
    return [json.loads(e) for e in events if e != "[DONE]"], done


@asynccontextmanager
async def simulated_api(
    model_path: Path,
    router: RouterConfig,
    backend: Callable[[SimulatedEngine], ModelBackend] = EngineBackend,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[tuple[httpx.AsyncClient, SimulatedEngine]]:
    """The OpenAI app over one zero-latency simulated engine (model `tiny`), in process.

    `backend` wraps the engine (to record or inject faults); the teardown checks that no request
    outlived its response.
    """
    async with simulated_app(model_path, router, backend, clock) as (http, engine, _):
        yield http, engine


@asynccontextmanager
async def simulated_app(
    model_path: Path,
    router: RouterConfig,
    backend: Callable[[SimulatedEngine], ModelBackend] = EngineBackend,
    clock: Callable[[], float] = time.monotonic,
    shared_limiter: SharedLimiter | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, SimulatedEngine, OpenAIApp]]:
    """simulated_api, with the app itself (to drive it as the Serve adapter does) and the
    shared rate limiter of a router replica."""
    tokenizer = PromptTokenizer(str(model_path))
    engine = SimulatedEngine(
        ZERO_LATENCY, seed=1, detokenize=tokenizer.decode, vocab_size=tokenizer.vocab_size
    )
    await engine.start()
    config = AppConfig(
        router=router,
        models=[
            ModelConfig(
                name=API_MODEL,
                engine="simulated",
                source=str(model_path),
                device="cpu",
                max_model_len=API_MAX_MODEL_LEN,
            )
        ],
    )
    api = OpenAIApp(
        config, {API_MODEL: backend(engine)}, clock=clock, shared_limiter=shared_limiter
    )
    transport = httpx.ASGITransport(app=api.app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http, engine, api
        stats = engine.stats()
        # No request may outlive its response (leak check at teardown).
        assert stats.num_running == 0 and stats.num_waiting == 0, stats
    finally:
        await engine.shutdown()
