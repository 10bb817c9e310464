"""Placement on an emulated 2-node cluster with 4 fake GPUs per node (no real GPU needed).

The engines are simulated, but the placement groups are Ray's real ones: this is the GPU path's
configuration and placement logic, verified without GPUs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, remove_placement_group

from cluster import runtime
from deployments.config import AppConfig, ModelConfig, RouterConfig
from tests.integration.conftest import free_port, simulated_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_gpu_nodes() -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=4, num_gpus=4) for _ in range(2)]
    ray.init(address=cluster.address, logging_level="ERROR")
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()
        for node in workers:
            cluster.remove_node(node)
        cluster.shutdown()


def deploy_and_place(model: ModelConfig) -> list[set[str]]:
    """Deploy `model` alone; the nodes each of its replicas' placement groups landed on."""
    config = AppConfig(router=RouterConfig(cpus=0.1), models=[model])
    runtime.deploy(config, host="127.0.0.1", port=free_port(), timeout_s=180)
    return [
        set(pg["bundles_to_node_id"].values())
        for pg in ray.util.placement_group_table().values()
        if pg["state"] == "CREATED" and len(pg["bundles"]) == model.num_workers
    ]


def test_tp4_replicas_each_land_within_one_node(
    two_gpu_nodes: Cluster, embedded_model: Path
) -> None:
    model = simulated_model(
        embedded_model,
        name="tp4",
        device="gpu",
        tensor_parallel_size=4,
        num_replicas=2,
        cpus_per_worker=0.5,
        replica_cpus=0.0,
    )
    try:
        nodes_per_replica = deploy_and_place(model)
        assert len(nodes_per_replica) == 2, nodes_per_replica
        assert all(len(nodes) == 1 for nodes in nodes_per_replica), nodes_per_replica
        # Two 4-GPU replicas on two 4-GPU nodes: one replica per node.
        assert nodes_per_replica[0] != nodes_per_replica[1]
    finally:
        serve.delete(runtime.APP_NAME)


def test_tp8_that_cannot_fit_is_reported_not_hung(
    two_gpu_nodes: Cluster, embedded_model: Path
) -> None:
    model = simulated_model(
        embedded_model, name="tp8", device="gpu", tensor_parallel_size=8, num_replicas=1
    )
    config = AppConfig(router=RouterConfig(cpus=0.1), models=[model])
    with pytest.raises(runtime.DeployError) as error:
        runtime.deploy(config, host="127.0.0.1", port=free_port(), timeout_s=60)
    message = str(error.value)
    assert "'tp8'" in message and "8 GPU" in message and "largest node has" in message
    # What the check prevents: Ray itself would keep such a group pending forever.
    pg = placement_group([{"GPU": 1}] * 8, strategy="STRICT_PACK")
    assert not pg.wait(timeout_seconds=3)
    remove_placement_group(pg)


def test_pipeline_parallel_replica_spans_both_nodes(
    two_gpu_nodes: Cluster, embedded_model: Path
) -> None:
    model = simulated_model(
        embedded_model,
        name="tp4pp2",
        device="gpu",
        tensor_parallel_size=4,
        pipeline_parallel_size=2,
        num_replicas=1,
        cpus_per_worker=0.5,
    )
    try:
        nodes_per_replica = deploy_and_place(model)
        assert len(nodes_per_replica) == 1
        assert len(nodes_per_replica[0]) == 2
    finally:
        serve.delete(runtime.APP_NAME)
