"""The routing policy inside Ray Serve: our RequestRouter over cache_load, on simulated engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deployments.config import AppConfig, RouterConfig
from tests.integration.conftest import served, simulated_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cache_load_app(embedded_model: Path) -> Iterator[str]:
    model = simulated_model(
        embedded_model, routing={"policy": "cache_load", "seed": 3, "stats_period_s": 0.2}
    )
    config = AppConfig(router=RouterConfig(cpus=0.1), models=[model])
    with served(config) as url:
        yield url


def test_repeats_of_a_prefix_follow_its_cache(cache_load_app: str) -> None:
    # With Ray's default (pow2) over 3 replicas, 5 repeats all landing on the replica that holds
    # the prefix would be luck (about 1 in 80); the cache-aware router sends every one there.
    prompt = "a long shared system prompt " * 40
    cached = []
    with httpx.Client(base_url=cache_load_app, timeout=60) as http:
        for i in range(6):
            body = http.post(
                "/v1/completions",
                json={"model": "sim", "prompt": prompt + f" question {i}", "max_tokens": 2},
            ).json()
            cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached[0] == 0
    assert all(c >= 16 * 10 for c in cached[1:]), cached
