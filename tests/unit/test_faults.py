"""Backend faults through the OpenAI app (in process): retries before the first output, error
events after it, overload and deadlines. The teardown checks that no engine request leaked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deployments.api.openai_app import OverloadedError, UnavailableError
from deployments.config import RouterConfig
from deployments.engines.base import EngineDeadError, EngineOutput, EngineRequest, EngineStats
from deployments.engines.profiles import LLAMA_8B_H100
from deployments.engines.simulated import SimulatedEngine
from deployments.tokenizer import PromptTokenizer
from tests.support import API_MODEL, EngineBackend, parse_sse, simulated_api, simulated_app


class FaultyBackend(EngineBackend):
    """Fails its first `early_failures` attempts before any output (as a replica that died),
    or raises `late_failure` after the first output, or stalls `stall_s` between outputs."""

    def __init__(
        self,
        engine: SimulatedEngine,
        early_failures: int = 0,
        early_error: type[Exception] = UnavailableError,
        late_failure: Exception | None = None,
        stall_s: float = 0.0,
    ) -> None:
        super().__init__(engine)
        self.early_failures = early_failures
        self.early_error = early_error
        self.late_failure = late_failure
        self.stall_s = stall_s
        self.attempts = 0
        self.called = asyncio.Event()

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineOutput]]:
        self.attempts += 1
        self.called.set()
        if self.attempts <= self.early_failures:
            raise self.early_error("replica died")
        # Closing the engine's stream on the way out is what the Serve backend's cancel does.
        async with aclosing(super().generate(request)) as outputs:
            async for batch in outputs:
                yield batch
                if self.late_failure is not None:
                    raise self.late_failure
                await asyncio.sleep(self.stall_s)


def chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": API_MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        **extra,
    }


Backend = TypeVar("Backend", bound=EngineBackend)


def backend_of(
    kind: Callable[..., Backend], **kwargs: Any
) -> tuple[list[Backend], Callable[[SimulatedEngine], Backend]]:
    """A backend factory for simulated_api, and the list that will hold the backend it made."""
    made: list[Backend] = []

    def factory(engine: SimulatedEngine) -> Backend:
        made.append(kind(engine, **kwargs))
        return made[0]

    return made, factory


@pytest.mark.parametrize("error", [UnavailableError, EngineDeadError])
@pytest.mark.parametrize("stream", [False, True])
async def test_failures_before_the_first_output_are_retried(
    embedded_model: Path, error: type[Exception], stream: bool
) -> None:
    made, factory = backend_of(FaultyBackend, early_failures=2, early_error=error)
    async with simulated_api(embedded_model, RouterConfig(retry_attempts=3), factory) as (http, _):
        response = await http.post("/v1/chat/completions", json=chat(stream=stream))
        assert response.status_code == 200, response.text
        if stream:
            events, done = parse_sse(response.text)
            assert done and all("error" not in e for e in events)
    assert made[0].attempts == 3


async def test_retries_are_bounded(embedded_model: Path) -> None:
    made, factory = backend_of(FaultyBackend, early_failures=10)
    async with simulated_api(embedded_model, RouterConfig(retry_attempts=2), factory) as (http, _):
        response = await http.post("/v1/chat/completions", json=chat())
    assert response.status_code == 503 and "retry-after" in response.headers
    assert response.json()["error"]["code"] == "service_unavailable"
    assert made[0].attempts == 2


async def test_overload_is_503_with_retry_after_and_not_retried(embedded_model: Path) -> None:
    made, factory = backend_of(FaultyBackend, early_failures=1, early_error=OverloadedError)
    config = RouterConfig(overload_retry_after_s=7)
    async with simulated_api(embedded_model, config, factory) as (http, _):
        response = await http.post("/v1/chat/completions", json=chat())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert response.json()["error"] == {
        "message": response.json()["error"]["message"],
        "type": "server_error",
        "param": None,
        "code": "overloaded",
    }
    assert made[0].attempts == 1


async def test_failure_after_the_first_byte_ends_the_stream_with_an_error_event(
    embedded_model: Path,
) -> None:
    made, factory = backend_of(
        FaultyBackend, late_failure=UnavailableError("replica died mid-stream")
    )
    async with simulated_api(embedded_model, RouterConfig(), factory) as (http, _):
        response = await http.post("/v1/chat/completions", json=chat(stream=True))
        assert response.status_code == 200
        events, done = parse_sse(response.text)
        assert not done
        assert set(events[-1]["error"]) == {"message", "type", "param", "code"}
        assert events[-1]["error"]["code"] == "service_unavailable"
        assert made[0].attempts == 1  # output was already sent: never retried
        # Without streaming nothing was sent yet, but the failure is still after output: 503.
        response = await http.post("/v1/chat/completions", json=chat())
        assert response.status_code == 503


class StandsStillAfterFirstStep:
    """An engine clock that lets the first step (prefill and the first token) pass, then stands
    still: from there on the engine request runs until someone aborts it."""

    def __init__(self) -> None:
        self.steps = 0

    def now(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        self.steps += 1
        if self.steps > 1:
            await asyncio.Event().wait()
        await asyncio.sleep(0)


@pytest.mark.parametrize("stream", [False, True])
async def test_deadline_is_504_and_aborts_the_engine_request(
    embedded_model: Path, stream: bool
) -> None:
    tokenizer = PromptTokenizer(str(embedded_model))
    engine = SimulatedEngine(
        LLAMA_8B_H100,
        detokenize=tokenizer.decode,
        vocab_size=tokenizer.vocab_size,
        clock=StandsStillAfterFirstStep(),
    )
    config = RouterConfig(request_timeout_s=0.3)

    def backend(_: SimulatedEngine) -> EngineBackend:
        return EngineBackend(engine)

    try:
        async with simulated_api(embedded_model, config, backend) as (http, _):
            response = await asyncio.wait_for(
                http.post("/v1/chat/completions", json=chat(stream=stream)), timeout=10
            )
            if stream:  # the first token went out: the deadline ends the stream with an event
                events, done = parse_sse(response.text)
                assert not done and events[-1]["error"]["code"] == "request_timeout"
            else:
                assert response.status_code == 504
                assert response.json()["error"]["code"] == "request_timeout"
            # The engine gave one token and stood still: only the abort that closing the backend
            # stream sends ends its request.
            stats = engine.stats()
            assert stats.num_running == 0 and stats.num_waiting == 0, stats
    finally:
        await engine.shutdown()


async def test_a_draining_router_refuses_new_requests_and_finishes_those_in_flight(
    embedded_model: Path,
) -> None:
    """SIGTERM on `serve` drains (deployments/router.py starts it): a new request is a 503 with
    Retry-After, /health says draining, and the request already in flight completes."""
    made, factory = backend_of(FaultyBackend, stall_s=0.01)
    router = RouterConfig(drain_retry_after_s=7)
    async with simulated_app(embedded_model, router, factory) as (http, _, api):
        in_flight = asyncio.create_task(http.post("/v1/chat/completions", json=chat(max_tokens=30)))
        await asyncio.wait_for(made[0].called.wait(), 10)
        api.start_draining()
        for path, body in (
            ("/v1/chat/completions", chat()),
            ("/v1/completions", {"model": API_MODEL, "prompt": "hello", "max_tokens": 4}),
        ):
            refused = await http.post(path, json=body)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "7"
            assert refused.json()["error"]["code"] == "draining"
        health = await http.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "draining"
        answered = await in_flight
        assert answered.status_code == 200, answered.text
        assert answered.json()["usage"]["completion_tokens"] == 30
        assert made[0].attempts == 1  # the refused requests never reached the backend


class FlakyStats(EngineBackend):
    """A model whose stats() fails `failures` times (replicas that died) and then answers, or,
    with `hang`, never answers (a hung replica)."""

    def __init__(self, engine: SimulatedEngine, failures: int = 0, hang: bool = False) -> None:
        super().__init__(engine)
        self.failures = failures
        self.hang = hang
        self.calls = 0

    async def stats(self) -> EngineStats:
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        if self.calls <= self.failures:
            raise UnavailableError("replica died")
        return await super().stats()


async def test_health_retries_a_dead_replica(embedded_model: Path) -> None:
    made, factory = backend_of(FlakyStats, failures=2)
    async with simulated_api(embedded_model, RouterConfig(retry_attempts=3), factory) as (http, _):
        response = await http.get("/health")
    assert response.status_code == 200, response.text
    assert made[0].calls == 3


async def test_health_waits_for_a_hung_replica_once(embedded_model: Path) -> None:
    """health_check_timeout_s is the whole wait: the retries for dead replicas share it, so a
    hung one is not waited for retry_attempts times over."""
    made, factory = backend_of(FlakyStats, hang=True)
    config = RouterConfig(retry_attempts=3, health_check_timeout_s=0.2)
    async with simulated_api(embedded_model, config, factory) as (http, _):
        response = await asyncio.wait_for(http.get("/health"), timeout=10)
    assert response.status_code == 503
    assert "no replica answered within 0.2 s" in response.json()["error"]["message"]
    assert made[0].calls == 1
