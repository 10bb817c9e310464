"""How a ModelConfig becomes vLLM's engine arguments (no engine is started)."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.config import ModelConfig
from deployments.engines.vllm import engine_kwargs


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
        ("cpu", 1, 1, None),  # vLLM's own choice (uniprocess)
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
