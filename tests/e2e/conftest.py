"""e2e fixtures: the real app (router + LLMServer) on real vLLM CPU engines, on local Ray."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
from ray import serve

from cluster import runtime
from cluster.config import ClusterConfig, default_config_path, load_config
from tests.integration.conftest import free_port

# vLLM CPU engines take up to a minute or two each to start on 2 shared cores.
DEPLOY_TIMEOUT_S = 600


def deployed(config: ClusterConfig) -> Iterator[str]:
    """Deploy on a fresh local Ray; yields the base URL; tears Ray down after the module."""
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    try:
        runtime.deploy(config.app_config(), host="127.0.0.1", port=port, timeout_s=DEPLOY_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def default_cluster() -> Iterator[str]:
    """The embedded default exactly as `make serve` runs it: 2 vLLM CPU replicas."""
    yield from deployed(load_config(default_config_path()))
