"""How a ModelConfig becomes vLLM's engine arguments (no engine is started)."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.config import ModelConfig
from deployments.engines.vllm import engine_environment, engine_kwargs


def vllm_model(**overrides: Any) -> ModelConfig:
    fields: dict[str, Any] = {
        "name": "m",
        "engine": "vllm",
        "source": "/models/m",
        "max_model_len": 4096,
    }
    return ModelConfig(**{**fields, **overrides})


@pytest.mark.parametrize(
    ("device", "tp", "pp", "backend"),
    [
        ("cpu", 1, 1, None),  # uniprocess, given engine_environment (below)
        ("cpu", 2, 1, "mp"),  # vLLM refuses its Ray executor on CPU
        ("gpu", 1, 1, "ray"),  # workers in the replica's placement group
        ("gpu", 4, 2, "ray"),
    ],
)
def test_executor_follows_device_and_parallelism(
    device: str, tp: int, pp: int, backend: str | None
) -> None:
    kwargs = engine_kwargs(
        vllm_model(device=device, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    )
    assert kwargs.get("distributed_executor_backend") == backend
    assert kwargs["tensor_parallel_size"] == tp and kwargs["pipeline_parallel_size"] == pp


def test_owned_fields_and_prefix_caching() -> None:
    kwargs = engine_kwargs(vllm_model(name="served", max_model_len=1234))
    assert kwargs["served_model_name"] == "served"
    assert kwargs["max_model_len"] == 1234
    assert kwargs["enable_prefix_caching"] is True
    assert kwargs["model"] == kwargs["tokenizer"] == "/models/m"


@pytest.mark.parametrize(
    ("device", "tp", "in_process"),
    [
        ("cpu", 1, True),  # the worker inside the EngineCore: no busy-waiting process pair
        ("cpu", 2, False),  # TP workers need processes (vLLM's mp executor)
        ("gpu", 1, False),  # Ray executor, as set by engine_kwargs
    ],
)
def test_environment_keeps_a_one_worker_cpu_engine_in_one_process(
    device: str, tp: int, in_process: bool
) -> None:
    environment = engine_environment(vllm_model(device=device, tensor_parallel_size=tp))
    assert environment["VLLM_NO_USAGE_STATS"] == "1"
    assert (environment.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0") is in_process


def test_engine_env_overrides_the_defaults() -> None:
    environment = engine_environment(
        vllm_model(
            device="cpu",
            engine_env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_NO_USAGE_STATS": "0"},
        )
    )
    assert environment["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"  # back to vLLM's mp executor
    assert environment["VLLM_NO_USAGE_STATS"] == "0"
