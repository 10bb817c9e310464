"""Chaos on real Ray Serve with simulated engines: replicas killed, routers killed, a scale-down
and 200 clients leaving at once, each under load from `loadtest` (`make test-chaos`), behind the
HAProxy ingress that `serve` runs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve

from cluster import runtime
from deployments.config import AppConfig, RouterConfig
from tests.chaos.harness import (
    ChaosCounts,
    kill_actor,
    load_during,
    replica_actors,
    wait_for_fleet,
    wait_for_idle_engines,
)
from tests.integration.conftest import (
    free_port,
    simulated_model,
    start_local_ray,
    wait_for_no_routing_state,
)
from tests.support import ingress_environment

pytestmark = pytest.mark.chaos

LLM_REPLICAS, ROUTER_REPLICAS = 3, 2
# Load that keeps every stream a few seconds long without saturating a 2-core machine (at 20/s
# with 200 tokens, requests queued for 20 s and a 20 s graceful shutdown cut them).
COUNT, RATE, OUTPUT_LEN, KILL_AT_S = 80, 8.0, 120, 3.0


def app_config(embedded_model: Path, llm_replicas: int) -> AppConfig:
    return AppConfig(
        router=RouterConfig(cpus=0.1, num_replicas=ROUTER_REPLICAS),
        models=[simulated_model(embedded_model, num_replicas=llm_replicas)],
    )


@pytest.fixture(scope="module")
def cluster(embedded_model: Path, metrics_port: int) -> Iterator[str]:
    with ingress_environment():
        start_local_ray(metrics_port)
    port = free_port()
    try:
        runtime.deploy(
            app_config(embedded_model, LLM_REPLICAS), host="127.0.0.1", port=port, timeout_s=180
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        runtime.stop_ray()  # and the HAProxy folder


def check_invariants(
    counts: ChaosCounts, metrics_port: int, llm_replicas: int = LLM_REPLICAS
) -> None:
    print(counts.summary())  # the numbers, for the run's log
    assert counts.requests > 0 and counts.ok > 0, counts.summary()
    assert not counts.failed_before_streaming, counts.failed_before_streaming[:5]
    assert not counts.streams_cut, counts.streams_cut[:5]
    wait_for_idle_engines()
    wait_for_fleet({"LLMServer": llm_replicas, "Router": ROUTER_REPLICAS})
    wait_for_no_routing_state(metrics_port)


async def test_kill_an_llm_server_replica_under_load(cluster: str, metrics_port: int) -> None:
    async def fault() -> None:
        await asyncio.sleep(KILL_AT_S)
        kill_actor(replica_actors("LLMServer")[0])

    counts, _ = await load_during(
        cluster, fault, count=COUNT, rate=RATE, output_len=OUTPUT_LEN, seed=1
    )
    check_invariants(counts, metrics_port)


async def test_kill_a_router_replica_under_load(cluster: str, metrics_port: int) -> None:
    """HAProxy re-sends a request whose router replica died before its first byte to the other
    router: none of them fails. A stream already flowing through the killed replica cannot get
    an error event from a dead process; it must still end (its connection closes, it does not
    hang). Those are counted apart: only streams open at the kill can be cut. Requests sent
    after the kill all succeed, and nothing leaks."""

    async def fault() -> None:
        await asyncio.sleep(KILL_AT_S)
        kill_actor(replica_actors("Router")[0])

    counts, records = await load_during(
        cluster, fault, count=COUNT, rate=RATE, output_len=OUTPUT_LEN, seed=2
    )
    print(counts.summary())
    assert counts.requests > 0 and counts.ok > 0, counts.summary()
    assert not counts.failed_before_streaming, counts.failed_before_streaming[:5]
    hung = [e for e in counts.streams_cut if e.startswith("timed out")]
    assert not hung, hung[:5]
    later = [r for r in records if r.start_s > KILL_AT_S + 2.0]
    assert later and all(r.ok for r in later), [r.error for r in later if not r.ok][:5]
    wait_for_idle_engines()
    wait_for_fleet({"LLMServer": LLM_REPLICAS, "Router": ROUTER_REPLICAS})
    wait_for_no_routing_state(metrics_port)


async def test_scale_down_under_load(cluster: str, metrics_port: int, embedded_model: Path) -> None:
    async def fault() -> None:
        await asyncio.sleep(KILL_AT_S)
        smaller = app_config(embedded_model, LLM_REPLICAS - 1)
        port = int(cluster.rsplit(":", 1)[1])
        await asyncio.to_thread(runtime.deploy, smaller, host="127.0.0.1", port=port, timeout_s=120)

    counts, _ = await load_during(
        cluster, fault, count=COUNT, rate=RATE, output_len=OUTPUT_LEN, seed=3
    )
    check_invariants(counts, metrics_port, llm_replicas=LLM_REPLICAS - 1)


async def test_200_clients_disconnect_at_once_mid_stream(cluster: str, metrics_port: int) -> None:
    payload = {"model": "sim", "prompt": "go " * 32, "max_tokens": 2000, "stream": True}
    started = asyncio.Event()
    leave = asyncio.Event()
    first_chunks = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal first_chunks
        async with http.stream("POST", "/v1/completions", json=payload) as response:
            assert response.status_code == 200
            async for _ in response.aiter_bytes():
                first_chunks += 1
                if first_chunks == 200:
                    started.set()
                break
            await leave.wait()
        # Leaving the block closes the connection mid-stream (2000 tokens take ~10 s).

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=cluster, timeout=60, limits=limits) as http:
        tasks = [asyncio.create_task(client(http)) for _ in range(200)]
        await asyncio.wait_for(started.wait(), timeout=60)
        leave.set()
        await asyncio.gather(*tasks)
    assert first_chunks == 200
    # Each disconnect must reach its engine as an abort, well before 2000 tokens are generated.
    wait_for_idle_engines(timeout_s=8)
    wait_for_no_routing_state(metrics_port)
