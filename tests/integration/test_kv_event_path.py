"""Engine truth on Ray: a replica's KV cache events reach the router and steer its decisions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve

from cluster import runtime
from deployments.config import AppConfig, RouterConfig, deployment_name
from tests.integration.conftest import served, simulated_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_replica_app(embedded_model: Path) -> Iterator[str]:
    # Load outweighs any cache (decode_weight_tokens), so two concurrent requests with one
    # prefix land on both replicas; fast reports so the engine's events arrive quickly.
    model = simulated_model(
        embedded_model,
        num_replicas=2,
        routing={
            "policy": "cache_load",
            "seed": 5,
            "stats_period_s": 0.2,
            "params": {"decode_weight_tokens": 100_000},
        },
    )
    config = AppConfig(router=RouterConfig(cpus=0.1), models=[model])
    with served(config) as url:
        yield url


def _cached_tokens(http: httpx.Client, prompt: str, max_tokens: int = 2) -> int:
    body = http.post(
        "/v1/completions", json={"model": "sim", "prompt": prompt, "max_tokens": max_tokens}
    ).json()
    return int(body["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_an_engine_eviction_changes_the_next_decision(two_replica_app: str) -> None:
    prefix = "the prefix both replicas will cache " * 40
    with httpx.Client(base_url=two_replica_app, timeout=60) as http:
        # 1. The prefix on both replicas: the second request starts while the first streams.
        with http.stream(
            "POST",
            "/v1/completions",
            json={"model": "sim", "prompt": prefix + "one", "max_tokens": 300, "stream": True},
        ) as first:
            lines = first.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            assert _cached_tokens(http, prefix + "two") == 0  # the other replica, cold
            for _ in lines:
                pass
        # 2. One replica's engine forgets everything (vLLM's reset_prefix_cache); only its
        # KV events tell the router.
        handle = serve.get_deployment_handle(deployment_name("sim"), app_name=runtime.APP_NAME)
        reset = handle.reset_prefix_cache.remote().result(timeout_s=30)
        assert reset["reset"], reset
        time.sleep(1.0)  # several report periods (0.2 s) for the event to reach the router
        # 3. Each request with the prefix now goes to the replica that still holds it. Were
        # the event lost, the router would still credit both, and pick the reset one about
        # every other time (all 12 on the other by chance: 1 in 4096).
        cached = [_cached_tokens(http, prefix + f"question {i}") for i in range(12)]
    assert all(c >= 16 * 10 for c in cached), cached
    # Every routed request's prediction matched what the engine found, summed per replica.
    totals = [
        r.predictions
        for d in runtime.cluster_status()
        if d.name == deployment_name("sim")
        for r in d.replicas
    ]
    assert all(t is not None for t in totals), totals
    predicted = sum(t["predicted_cached_tokens"] for t in totals if t)
    actual = sum(t["actual_cached_tokens"] for t in totals if t)
    assert predicted == actual == sum(cached), (predicted, actual, cached)
