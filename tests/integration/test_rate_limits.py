"""Rate limits across router replicas on real Ray Serve: the RateLimits replica holds a key to
exactly its limit however Serve's proxy spreads the requests over 2 routers, and what asking it
costs per request (printed: limited key vs unlimited key, interleaved in the same run)."""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deployments.config import APIKeyConfig, AppConfig, AuthConfig, RouterConfig
from tests.integration.conftest import served, simulated_model

pytestmark = pytest.mark.integration

LIMITED, HIGH_LIMIT, UNLIMITED = "sk-bob", "sk-carol", "sk-alice"
PER_MINUTE = 10
LATENCY_SAMPLES = 60


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def two_routers(embedded_model: Path) -> Iterator[str]:
    auth = AuthConfig(
        api_keys=[
            APIKeyConfig(sha256=sha(LIMITED), tenant="bob", requests_per_minute=PER_MINUTE),
            APIKeyConfig(sha256=sha(HIGH_LIMIT), tenant="carol", requests_per_minute=10**6),
            APIKeyConfig(sha256=sha(UNLIMITED), tenant="alice"),
        ]
    )
    config = AppConfig(
        router=RouterConfig(cpus=0.1, num_replicas=2, auth=auth),
        models=[simulated_model(embedded_model, num_replicas=1)],
    )
    with served(config) as url:
        yield url


def complete(http: httpx.Client, key: str) -> httpx.Response:
    return http.post(
        "/v1/completions",
        json={"model": "sim", "prompt": "hi", "max_tokens": 1},
        headers={"Authorization": f"Bearer {key}"},
    )


def test_a_key_gets_exactly_its_limit_across_router_replicas(two_routers: str) -> None:
    # Each router alone would allow 5 per minute (its half), counting down from 4 on its own.
    with httpx.Client(base_url=two_routers, timeout=30) as http:
        answers = [complete(http, LIMITED) for _ in range(PER_MINUTE + 1)]
    assert [a.status_code for a in answers] == [200] * PER_MINUTE + [429], [a.text for a in answers]
    remaining = [int(a.headers["x-ratelimit-remaining-requests"]) for a in answers[:-1]]
    assert remaining == list(range(PER_MINUTE - 1, -1, -1))
    assert answers[-1].json()["error"]["code"] == "rate_limit_exceeded"


def test_what_the_shared_limiter_costs_per_request(two_routers: str) -> None:
    """No assertion on time (a shared 2-core machine): the numbers, for the run's log."""
    latencies: dict[str, list[float]] = {HIGH_LIMIT: [], UNLIMITED: []}
    with httpx.Client(base_url=two_routers, timeout=30) as http:
        for _ in range(LATENCY_SAMPLES):
            for key, samples in latencies.items():  # interleaved: both see the same load
                started = time.perf_counter()
                assert complete(http, key).status_code == 200
                samples.append((time.perf_counter() - started) * 1000)
    shared = statistics.median(latencies[HIGH_LIMIT])
    local = statistics.median(latencies[UNLIMITED])
    print(
        f"\nrequest latency p50 over {LATENCY_SAMPLES}: limited key (asks RateLimits) "
        f"{shared:.1f} ms, unlimited key {local:.1f} ms: +{shared - local:.1f} ms, "
        f"ratio {shared / local:.2f}"
    )
