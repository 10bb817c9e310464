"""The autoscaler on real vLLM CPU engines (the embedded model), through the real `openai` client.

tests/integration/test_autoscaling.py checks the policy on Ray with simulated engines; this
module checks what only a real engine shows: its stats drive the decisions, a replica that
starts is a vLLM engine loading (tens of seconds on 2 cores, not the simulator's instant), a
replica removed mid-stream drains a real engine's requests, and a model at zero wakes through a
real cold start. Short delays keep it within its CI budget; the timings it prints are
measurements, not assertions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import openai
import pytest

from cluster import runtime
from cluster.config import default_config_path, load_config
from deployments.config import ModelConfig, deployment_name
from tests.e2e.conftest import deployed
from tests.support import ClosedLoopUsers, print_decisions, watch_replicas

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"  # the embedded default's model
DEPLOYMENT = deployment_name(MODEL)
TARGET_PER_REPLICA = 4
# ~0.3 s per request at the embedded model's decode speed with a few in a batch.
SHORT_MAX_TOKENS = 64
# After the step down: requests of a few seconds, so the replica being removed is mid-stream.
LONG_MAX_TOKENS = 1500
# A vLLM CPU engine loads in 20-60 s here, minutes when other jobs starve the 2 cores.
ENGINE_START_S = 300


@pytest.fixture(scope="module")
def autoscaled_cluster() -> Iterator[str]:
    """The embedded default with its model autoscaled between 0 and 2 replicas, starting at 1."""
    default = load_config(default_config_path())
    (model,) = default.models
    autoscaled = ModelConfig.model_validate(
        model.model_dump()
        | {
            "num_replicas": 1,
            "autoscaling": {
                "enabled": True,
                "min_replicas": 0,
                "max_replicas": 2,
                "target_per_replica": TARGET_PER_REPLICA,
                # Closed-loop users hold batches above the target without a growing queue: a
                # short horizon sizes for that excess at once.
                "drain_horizon_s": 0.5,
                "downscale_delay_s": 3,
                "scale_to_zero_idle_s": 15,
                # The router holds the first request at zero while a whole engine loads.
                "cold_start_timeout_s": ENGINE_START_S,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 1.5,
            },
        }
    )
    yield from deployed(default.model_copy(update={"models": [autoscaled]}))


def decisions() -> list[dict]:
    return runtime.autoscaling_decisions(DEPLOYMENT)


async def test_a_load_step_adds_an_engine_and_a_drained_one_drops_no_stream(
    autoscaled_cluster: str,
) -> None:
    load = ClosedLoopUsers(autoscaled_cluster, MODEL, users=1, max_tokens=SHORT_MAX_TOKENS)
    stop = asyncio.Event()
    users = [asyncio.create_task(load.user(i, stop)) for i in range(3 * TARGET_PER_REPLICA)]
    try:
        low = await watch_replicas(DEPLOYMENT, 5)
        step_at = time.time()
        load.users = 3 * TARGET_PER_REPLICA  # more than one replica's target: 2, the maximum
        high = await watch_replicas(DEPLOYMENT, ENGINE_START_S, until=2)
        reached_at = time.time()
        # Two users of long streams: a replica goes while one of them is on it, and must drain.
        load.users, load.max_tokens = 2, LONG_MAX_TOKENS
        down = await watch_replicas(DEPLOYMENT, 120, until=1)
        # The stream the removed replica held ends before the test does.
        await asyncio.sleep(5)
    finally:
        stop.set()
        await asyncio.gather(*users)
    made = await asyncio.to_thread(decisions)
    print_decisions(DEPLOYMENT, made, step_at)
    first_up = next(d for d in made if d["direction"] == "up" and d["time_s"] >= step_at)
    print(
        f"\nload step -> first scale decision {first_up['time_s'] - step_at:.1f} s; "
        f"-> 2 running vLLM replicas {reached_at - step_at:.1f} s; "
        f"{load.completed} streams completed"
    )
    assert max(low) == 1
    assert high[-1] == 2
    assert down[-1] == 1
    assert any(d["direction"] == "down" for d in made if d["time_s"] > first_up["time_s"])
    assert load.failures == []
    assert load.completed > 20


async def test_a_model_at_zero_serves_its_next_request_after_a_real_engine_starts(
    autoscaled_cluster: str,
) -> None:
    counts = await watch_replicas(DEPLOYMENT, 90, until=0)
    assert counts[-1] == 0, counts
    client = openai.AsyncOpenAI(
        base_url=f"{autoscaled_cluster}/v1", api_key="unused", max_retries=0, timeout=600
    )
    async with client:
        started = time.monotonic()
        response = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "wake up"}],
            max_tokens=8,
            extra_body={"ignore_eos": True},
        )
        cold_start_s = time.monotonic() - started
    assert response.usage is not None and response.usage.completion_tokens == 8
    assert response.choices[0].finish_reason == "length"
    print(f"\nfirst request of a model at zero: {cold_start_s:.1f} s (a vLLM engine's start)")
