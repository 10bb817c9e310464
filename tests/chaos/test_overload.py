"""Overload on real Ray Serve: a burst far beyond a model's queue gets 503s with Retry-After in
OpenAI's shape and never a hang; a request past the deadline gets a 504 (or an error event once
streaming) and its engine request is aborted."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve

from cluster import runtime
from deployments.config import AppConfig, RouterConfig
from tests.chaos.harness import wait_for_idle_engines
from tests.integration.conftest import (
    free_port,
    routing_state,
    simulated_model,
    start_local_ray,
    wait_for_no_routing_state,
)
from tests.support import ingress_environment, parse_sse

pytestmark = pytest.mark.chaos

MAX_ONGOING, MAX_QUEUED, TIMEOUT_S = 4, 8, 4.0


@pytest.fixture(scope="module")
def small_cluster(embedded_model: Path, metrics_port: int) -> Iterator[str]:
    with ingress_environment():  # behind HAProxy, as `serve` runs it
        start_local_ray(metrics_port)
    port = free_port()
    config = AppConfig(
        router=RouterConfig(cpus=0.1, request_timeout_s=TIMEOUT_S, overload_retry_after_s=2),
        models=[
            simulated_model(
                embedded_model,
                num_replicas=1,
                max_ongoing_requests=MAX_ONGOING,
                max_queued_requests=MAX_QUEUED,
            )
        ],
    )
    try:
        runtime.deploy(config, host="127.0.0.1", port=port, timeout_s=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        runtime.stop_ray()  # and the HAProxy folder


async def test_burst_beyond_the_queue_is_503_never_a_hang(
    small_cluster: str, metrics_port: int
) -> None:
    # Short answers: every accepted request finishes well inside the 4 s deadline.
    payload = {"model": "sim", "prompt": "burst " * 16, "max_tokens": 20, "stream": True}

    async def one(http: httpx.AsyncClient) -> tuple[int, str, str | None]:
        async with http.stream("POST", "/v1/completions", json=payload) as response:
            text = (await response.aread()).decode()
            return response.status_code, text, response.headers.get("retry-after")

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=small_cluster, timeout=60, limits=limits) as http:
        results = await asyncio.gather(*(one(http) for _ in range(100)))
    elapsed = time.monotonic() - started
    statuses = Counter(status for status, _, _ in results)
    print(f"burst of 100: {dict(statuses)} in {elapsed:.1f} s")
    assert set(statuses) <= {200, 503}, statuses
    # What the replica runs plus what the queue holds gets through; the rest is refused.
    assert statuses[200] >= MAX_ONGOING + MAX_QUEUED and statuses[503] > 0, statuses
    for status, text, retry_after in results:
        if status == 503:
            error = httpx.Response(503, content=text).json()["error"]
            assert error["code"] == "overloaded" and retry_after == "2", (error, retry_after)
        else:
            events, done = parse_sse(text)
            assert done and events[-1]["choices"][0]["finish_reason"] == "length"
    wait_for_idle_engines()
    wait_for_no_routing_state(metrics_port)


async def test_deadline_is_504_or_an_error_event_and_aborts(
    small_cluster: str, metrics_port: int
) -> None:
    # 3000 tokens take ~15 s on this profile: far past the 4 s deadline.
    long = {"model": "sim", "prompt": "slow", "max_tokens": 3000}
    async with httpx.AsyncClient(base_url=small_cluster, timeout=60) as http:
        response = await http.post("/v1/completions", json=long)
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "request_timeout"
        streamed = await http.post("/v1/completions", json={**long, "stream": True})
        events, done = parse_sse(streamed.text)
        assert not done and events[-1]["error"]["code"] == "request_timeout"
    # Both engine requests were aborted, not left to run their 15 s.
    wait_for_idle_engines(timeout_s=5)
    wait_for_no_routing_state(metrics_port)


async def test_clients_leaving_while_queued_leave_no_routing_state(
    small_cluster: str, metrics_port: int
) -> None:
    """Requests waiting at the handle for a slot (routing decided, nothing sent) whose clients
    leave: their pending decisions must go with them (router_tracked_requests back to 0; with
    that cleanup disabled this test failed with `pending: 3.0` leaked)."""
    long = {"model": "sim", "prompt": "slow", "max_tokens": 3000, "stream": True}
    short = {"model": "sim", "prompt": "queued", "max_tokens": 4}
    async with httpx.AsyncClient(base_url=small_cluster, timeout=60) as http:

        async def hold_a_slot() -> None:  # until the 4 s deadline ends it with an error event
            async with http.stream("POST", "/v1/completions", json=long) as response:
                await response.aread()

        holders = [asyncio.create_task(hold_a_slot()) for _ in range(MAX_ONGOING)]
        await asyncio.sleep(1.0)  # every slot taken
        # They leave at 3.5 s, before the holders' deadline (4 s) frees a slot.
        leaving = [
            asyncio.create_task(http.post("/v1/completions", json=short, timeout=2.5))
            for _ in range(3)
        ]
        seen = []
        for _ in range(8):  # published within 0.5 s of a change, exported every second
            await asyncio.sleep(0.2)
            _, state = await asyncio.to_thread(routing_state, metrics_port)
            seen.append(sum(v for (_, _, kind), v in state.items() if kind == "pending"))
        for task in leaving:
            with pytest.raises(httpx.TimeoutException):
                await task
        await asyncio.gather(*holders)
    print(f"pending decisions seen while the 3 clients waited: {seen}")
    # The premise: some of them waited with a routing decision (2 or 3 in runs here; the rest
    # may still be on their way through the proxy), else the cleanup below tested nothing.
    assert max(seen) > 0, seen
    wait_for_idle_engines(timeout_s=5)
    wait_for_no_routing_state(metrics_port)
