"""The autoscaler on real Ray Serve with simulated engines (8B/H100 profile in real time).

Short delays so the whole module stays within its CI budget: metrics pushed every 0.5 s, a 1.5 s
look-back, a 3 s downscale delay. The numbers it prints (time from a load step to the first
decision, cold start) are measurements, not assertions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster import runtime
from deployments.app import ROUTER_DEPLOYMENT
from deployments.config import AppConfig, RouterConfig, deployment_name
from tests.integration.conftest import served, simulated_model
from tests.support import ClosedLoopUsers, print_decisions, watch_replicas

pytestmark = pytest.mark.integration

BUSY, COLD, RATE = "busy", "cold", "rate"
BUSY_DEPLOYMENT = deployment_name(BUSY)
FAST_METRICS = {"metrics_interval_s": 0.5, "look_back_period_s": 1.5}
MAX_TOKENS = 150  # ~1 s of decoding per request at the profile's ~5-6 ms steps
# After the step down: requests long enough (~4 s) that replicas being removed are mid-request.
LONG_MAX_TOKENS = 600


@pytest.fixture(scope="module")
def app(embedded_model: Path) -> Iterator[str]:
    busy = simulated_model(
        embedded_model,
        name=BUSY,
        num_replicas=1,
        autoscaling={
            "enabled": True,
            "min_replicas": 1,
            "max_replicas": 4,
            "target_per_replica": 4,
            # Closed-loop users hold the batches above the target without a growing queue: a
            # short horizon serves that excess at once (20 users -> 4 replicas, as the test
            # expects) rather than draining it over a minute.
            "drain_horizon_s": 0.5,
            "downscale_delay_s": 3,
            "downscale_max_step": 2,
            **FAST_METRICS,
        },
    )
    cold = simulated_model(
        embedded_model,
        name=COLD,
        num_replicas=1,
        autoscaling={
            "enabled": True,
            "min_replicas": 0,
            "max_replicas": 1,
            "scale_to_zero_idle_s": 2,
            "cold_start_timeout_s": 60,
            **FAST_METRICS,
        },
    )
    rate = simulated_model(
        embedded_model,
        name=RATE,
        num_replicas=1,
        autoscaling={
            "enabled": True,
            "min_replicas": 1,
            "max_replicas": 3,
            # ~1 s per request: 6 closed-loop users send ~6/s, 3 replicas at 2/s each.
            "target_rate_per_replica": 2.0,
            "target_per_replica": 100,
            "downscale_delay_s": 3,
            **FAST_METRICS,
        },
    )
    # The router scales on its own ongoing requests: the busy test's 20 users need 3 routers at
    # 8 each (capped at 2), its 2 users 1.
    router = RouterConfig(
        cpus=0.1,
        autoscaling={
            "enabled": True,
            "min_replicas": 1,
            "max_replicas": 2,
            "target_per_replica": 8,
            "downscale_delay_s": 3,
            **FAST_METRICS,
        },
    )
    with served(AppConfig(router=router, models=[busy, cold, rate])) as url:
        yield url


async def test_stepped_load_scales_up_and_back_down_without_a_failed_request(app: str) -> None:
    """The engines 1 -> 4 -> 1 and the routers 1 -> 2 -> 1, both removing replicas while
    requests stream through them: no request fails or ends short."""
    load = ClosedLoopUsers(app, BUSY, users=2, max_tokens=MAX_TOKENS)
    stop = asyncio.Event()
    users = [asyncio.create_task(load.user(i, stop)) for i in range(20)]
    try:
        low = await watch_replicas(BUSY_DEPLOYMENT, 5)
        step_at = time.time()
        load.users = 20  # 10x
        # Replica start: 6-30 s here, minutes when other jobs starve the 2 cores.
        high = await watch_replicas(BUSY_DEPLOYMENT, 180, until=4)
        reached_at = time.time()
        high += await watch_replicas(BUSY_DEPLOYMENT, 3)
        # Under load still: replicas are removed mid-request and must drain, not drop.
        load.users, load.max_tokens = 2, LONG_MAX_TOKENS
        down = await watch_replicas(BUSY_DEPLOYMENT, 90, until=1)
        routers_down = await watch_replicas(ROUTER_DEPLOYMENT, 60, until=1)
    finally:
        stop.set()
        await asyncio.gather(*users)
    decisions = await asyncio.to_thread(runtime.autoscaling_decisions, BUSY_DEPLOYMENT)
    first_up = next(d for d in decisions if d["direction"] == "up" and d["time_s"] >= step_at)
    print_decisions(BUSY_DEPLOYMENT, decisions, step_at)
    print(
        f"\nload step -> first scale decision {first_up['time_s'] - step_at:.1f} s "
        f"({first_up['previous']} -> {first_up['target']}: {first_up['reason']}); "
        f"-> 4 running replicas {reached_at - step_at:.1f} s; completed {load.completed}"
    )
    assert max(low) == 1
    assert max(d["target"] for d in decisions) == 4  # 20 users at 4 per replica, capped at 4
    assert max(high) >= 3  # and the replicas did start
    assert down[-1] == 1
    assert any(d["direction"] == "down" for d in decisions if d["time_s"] > first_up["time_s"])
    routers = await asyncio.to_thread(runtime.autoscaling_decisions, ROUTER_DEPLOYMENT)
    print_decisions(ROUTER_DEPLOYMENT, routers, step_at)
    assert any(d["target"] == 2 for d in routers if d["time_s"] >= step_at)
    assert routers_down[-1] == 1
    assert load.failures == []
    assert load.completed > 50


async def test_a_model_at_zero_serves_its_first_request_after_the_cold_start(app: str) -> None:
    counts = await watch_replicas(deployment_name(COLD), 30, until=0)
    assert counts[-1] == 0, counts
    async with httpx.AsyncClient(base_url=app, timeout=120) as http:
        started = time.monotonic()
        body = {"model": COLD, "prompt": "wake up", "max_tokens": 8}
        response = await http.post("/v1/completions", json=body)
        cold_start_s = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 8
    # Serve's cold-start path takes 0 -> 1 without calling the policy; the policy records it at
    # its next run once the replica is up (a control-loop tick: poll a few seconds for it).
    deadline = time.monotonic() + 10
    while True:
        decisions = await asyncio.to_thread(runtime.autoscaling_decisions, deployment_name(COLD))
        zero = max(i for i, d in enumerate(decisions) if d["target"] == 0)
        woken = [d for d in decisions[zero + 1 :] if d["previous"] == 0 and d["target"] == 1]
        if woken or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert "idle" in decisions[zero]["reason"], decisions
    assert woken and woken[0]["reason"].startswith("cold start"), decisions
    print(f"\nfirst request of a model at zero: {cold_start_s:.1f} s (cold start included)")


async def test_rate_sizing_counts_arrivals_through_serve(app: str) -> None:
    """The replicas' arrival counts reach the policy through Serve's metrics: 6 users size the
    fleet on the arrival rate (far below T = 100 in flight), and it shrinks once they stop."""
    load = ClosedLoopUsers(app, RATE, users=6, max_tokens=MAX_TOKENS)
    stop = asyncio.Event()
    users = [asyncio.create_task(load.user(i, stop)) for i in range(6)]
    try:
        up = await watch_replicas(deployment_name(RATE), 120, until=3)
    finally:
        stop.set()
        await asyncio.gather(*users)
    down = await watch_replicas(deployment_name(RATE), 60, until=1)
    decisions = await asyncio.to_thread(runtime.autoscaling_decisions, deployment_name(RATE))
    for d in decisions:
        print(f"{d['previous']} -> {d['target']}: {d['reason']}")
    sized = [d for d in decisions if d["direction"] == "up" and "arrival rate" in d["reason"]]
    assert sized and max(d["target"] for d in sized) >= 2, decisions
    assert up[-1] >= 2 and down[-1] == 1
    assert load.failures == [] and load.completed > 20
