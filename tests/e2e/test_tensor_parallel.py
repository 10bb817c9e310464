"""Real vLLM tensor parallelism (TP 2, vLLM's mp executor) on CPU, served through the router."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from cluster.config import ClusterConfig
from tests.e2e.conftest import deployed

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tp2_cluster() -> Iterator[str]:
    config = ClusterConfig.model_validate(
        {
            "router": {"cpus": 0.25},
            "models": [
                {
                    "name": "tiny-tp2",
                    "engine": "vllm",
                    "source": "embedded",
                    "device": "cpu",
                    "max_model_len": 2048,
                    "tensor_parallel_size": 2,
                    "num_replicas": 1,
                    "cpus_per_worker": 1.0,
                    "replica_cpus": 0.25,
                    "engine_options": {"num_gpu_blocks_override": 64, "max_num_seqs": 8},
                    # One core per TP worker (DESIGN.md: without it, "Not enough allowed NUMA
                    # nodes").
                    "engine_env": {
                        "VLLM_CPU_OMP_THREADS_BIND": "0|1",
                        "VLLM_CPU_KVCACHE_SPACE": "1",
                    },
                }
            ],
        }
    )
    yield from deployed(config)


def test_tp2_replica_serves_completions(tp2_cluster: str) -> None:
    client = openai.OpenAI(base_url=f"{tp2_cluster}/v1", api_key="unused", max_retries=0)
    response = client.completions.create(
        model="tiny-tp2", prompt="Tensor parallel", max_tokens=16, extra_body={"ignore_eos": True}
    )
    assert response.usage is not None and response.usage.completion_tokens == 16
    stream = client.chat.completions.create(
        model="tiny-tp2",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
