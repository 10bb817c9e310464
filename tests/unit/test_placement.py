"""Placement groups from tensor x pipeline parallelism, and the can-it-ever-fit check."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.config import ModelConfig
from deployments.placement import (
    PlacementInfeasible,
    check_fits,
    replica_placement,
    replicas_that_fit,
)


def model(**overrides: Any) -> ModelConfig:
    fields: dict[str, Any] = {
        "name": "m",
        "engine": "simulated",
        "source": "/tmp/x",
        "max_model_len": 1024,
        "device": "gpu",
    }
    return ModelConfig(**{**fields, **overrides})


@pytest.mark.parametrize(
    ("tp", "pp", "device", "bundles", "strategy"),
    [
        (1, 1, "gpu", 1, "STRICT_PACK"),
        (4, 1, "gpu", 4, "STRICT_PACK"),
        (4, 2, "gpu", 8, "PACK"),
        (2, 1, "cpu", 2, "STRICT_PACK"),
    ],
)
def test_bundles_follow_parallelism(
    tp: int, pp: int, device: str, bundles: int, strategy: str
) -> None:
    placement = replica_placement(
        model(tensor_parallel_size=tp, pipeline_parallel_size=pp, device=device)
    )
    assert len(placement.bundles) == bundles
    assert placement.strategy == strategy
    gpus = sum(b.get("GPU", 0.0) for b in placement.bundles)
    assert gpus == (bundles if device == "gpu" else 0)


def test_replica_cpus_sit_in_the_first_bundle() -> None:
    placement = replica_placement(model(tensor_parallel_size=2, replica_cpus=1, cpus_per_worker=2))
    assert placement.bundles == [{"CPU": 3.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]


NODES_2X4 = [{"CPU": 16.0}, {"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}]


def test_tp4_fits_one_node() -> None:
    check_fits([model(tensor_parallel_size=4)], NODES_2X4)


def test_tp8_without_an_8_gpu_node_is_reported() -> None:
    with pytest.raises(PlacementInfeasible) as error:
        check_fits([model(name="big", tensor_parallel_size=8)], NODES_2X4)
    message = str(error.value)
    assert "'big'" in message and "8 GPU on a single node" in message
    assert "largest node has" in message and "4 GPU" in message


def test_pipeline_stages_may_span_nodes() -> None:
    check_fits([model(tensor_parallel_size=4, pipeline_parallel_size=2)], NODES_2X4)
    with pytest.raises(PlacementInfeasible, match="across nodes"):
        check_fits([model(tensor_parallel_size=4, pipeline_parallel_size=4)], NODES_2X4)


def test_pipeline_stages_that_cannot_pack_are_reported() -> None:
    # 8 GPUs and 48 CPUs in total are enough, but a GPU node holds only 3 bundles of 5-6 CPUs.
    with pytest.raises(PlacementInfeasible) as error:
        check_fits(
            [model(tensor_parallel_size=4, pipeline_parallel_size=2, cpus_per_worker=5)],
            NODES_2X4,
        )
    message = str(error.value)
    assert "8 bundles" in message and "{6 CPU, 1 GPU}" in message and "{5 CPU, 1 GPU}" in message
    assert "can hold only 6 of them" in message


def test_pipeline_stages_fit_when_the_first_bundle_goes_to_the_right_node() -> None:
    # First fit would put the larger first bundle on the 2-GPU node and strand a worker; on the
    # 1-GPU node it leaves the 2-GPU node to the two workers.
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 6.0, "GPU": 1.0}]
    stages = model(pipeline_parallel_size=3, cpus_per_worker=4, replica_cpus=2)
    assert replica_placement(stages).bundles[0] == {"CPU": 6.0, "GPU": 1.0}
    check_fits([stages], nodes)
    # The autoscaler's count of spare replicas places them the same way.
    assert replicas_that_fit(replica_placement(stages), nodes) == 1
    assert replicas_that_fit(replica_placement(stages), [*nodes, *nodes]) == 2
