"""Integration fixtures: a real local Ray + Serve running the app on simulated engines."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray
from ray import serve

from cluster import runtime
from deployments.config import AppConfig, ModelConfig, RouterConfig

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def simulated_model(embedded_model: Path, **overrides: object) -> ModelConfig:
    fields: dict[str, object] = {
        "name": "sim",
        "engine": "simulated",
        "source": str(embedded_model),
        "device": "cpu",
        "max_model_len": 4096,
        "num_replicas": 3,
        "cpus_per_worker": 0.1,
        "replica_cpus": 0.0,
        "simulated": {"profile": "llama-8b-h100", "seed": 7},
    }
    return ModelConfig.model_validate({**fields, **overrides})


def engine_counts() -> list[tuple[int, int]]:
    """(running, waiting) of every LLMServer replica; fails if a replica gave no stats."""
    replicas = [
        r for d in runtime.cluster_status() if d.name.startswith("LLMServer") for r in d.replicas
    ]
    assert replicas and all(r.stats is not None for r in replicas), replicas
    return [(r.stats["num_running"], r.stats["num_waiting"]) for r in replicas if r.stats]


@contextmanager
def served(config: AppConfig) -> Iterator[str]:
    """A local Ray serving `config`: its base URL; asserts no request leaked at teardown."""
    ray.init(address="local", num_cpus=4, logging_level="ERROR", include_dashboard=False)
    port = free_port()
    runtime.deploy(config, host="127.0.0.1", port=port, timeout_s=180)
    try:
        yield f"http://127.0.0.1:{port}"
        assert all(counts == (0, 0) for counts in engine_counts()), engine_counts()
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def simulated_app(embedded_model: Path) -> Iterator[str]:
    """Base URL of the app with 3 simulated replicas."""
    config = AppConfig(router=RouterConfig(cpus=0.1), models=[simulated_model(embedded_model)])
    with served(config) as url:
        yield url
