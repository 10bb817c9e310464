"""Integration fixtures: a real local Ray + Serve running the app on simulated engines."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from cluster import runtime
from cluster.runtime import free_port
from deployments.config import AppConfig, ModelConfig, RouterConfig

pytestmark = pytest.mark.integration


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


def start_local_ray(metrics_port: int) -> None:
    """A local Ray for the tests, its Prometheus metrics endpoint on `metrics_port`."""
    ray.init(
        address="local",
        num_cpus=4,
        logging_level="ERROR",
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        # Workers push their metrics to the node's exporter every second (default 10 s).
        _system_config={"metrics_report_interval_ms": 1000},
    )


def routing_state(metrics_port: int) -> tuple[bool, dict[tuple[str, str, str], float]]:
    """Whether any router (live or not) published router_tracked_requests, and the values of
    the live Router replicas by (router, deployment, kind)."""
    routers = {
        name.rsplit("#", 1)[1]
        for name in runtime._replica_actor_names()
        if name.startswith(f"SERVE_REPLICA::{runtime.APP_NAME}#Router#")
    }
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    samples = [
        sample
        for family in text_string_to_metric_families(text)
        if family.name == "ray_router_tracked_requests"
        for sample in family.samples
    ]
    live = {
        (s.labels["router"], s.labels["deployment"], s.labels["kind"]): s.value
        for s in samples
        # A stopped or killed router's last values may stay on the endpoint: only live ones count.
        if s.labels.get("router") in routers
    }
    return bool(samples), live


def wait_for_no_routing_state(metrics_port: int, timeout_s: float = 20) -> None:
    """Until every live router reports no per-request routing state (the gauge is published
    within half a second of a change, exported every second); fails after timeout_s, or when no
    router ever published the gauge (then this check would see nothing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        published, state = routing_state(metrics_port)
        if published and not any(state.values()):
            return
        if time.monotonic() > deadline:
            leaked = {key: value for key, value in state.items() if value}
            raise AssertionError(
                f"routing state leaked: {leaked}" if published else "no router_tracked_requests"
            )
        time.sleep(0.5)


@contextmanager
def served(config: AppConfig) -> Iterator[str]:
    """A local Ray serving `config`: its base URL; asserts at teardown that no request leaked,
    in the engines or in the routers' routing state."""
    metrics_port = free_port()
    start_local_ray(metrics_port)
    port = free_port()
    try:  # a deploy that fails must not leave Ray up for the next module's ray.init
        runtime.deploy(config, host="127.0.0.1", port=port, timeout_s=180)
        yield f"http://127.0.0.1:{port}"
        assert all(counts == (0, 0) for counts in engine_counts()), engine_counts()
        wait_for_no_routing_state(metrics_port)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def simulated_app(embedded_model: Path) -> Iterator[str]:
    """Base URL of the app with 3 simulated replicas."""
    config = AppConfig(router=RouterConfig(cpus=0.1), models=[simulated_model(embedded_model)])
    with served(config) as url:
        yield url
