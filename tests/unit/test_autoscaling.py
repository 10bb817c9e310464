"""The autoscaling policy with a fake clock: table-driven, no Ray."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.autoscaling import (
    PolicyState,
    ReplicaLoad,
    ScalingMetrics,
    ServeAutoscalingPolicy,
    decide,
)
from deployments.config import ModelAutoscalingConfig, ModelConfig, RouterConfig, ScalingConfig
from deployments.placement import replica_placement, replicas_that_fit

CONFIG = ModelAutoscalingConfig(
    enabled=True,
    min_replicas=1,
    max_replicas=10,
    target_per_replica=10,
    downscale_delay_s=30,
    downscale_hysteresis=0.2,
    downscale_max_step=2,
    kv_usage_threshold=0.9,
    kv_sustain_s=10,
)


def metrics(
    target: int,
    load: float,
    kv: float = 0.0,
    queued: float = 0.0,
    capacity: int | None = None,
    running: int | None = None,
) -> ScalingMetrics:
    """`load` spread evenly over the running replicas (all of `target` unless `running`)."""
    running = target if running is None else running
    replicas = [ReplicaLoad(running=load / max(running, 1), waiting=0.0, kv_cache_usage=kv)]
    return ScalingMetrics(
        current_replicas=running,
        target_replicas=target,
        replicas=replicas * running,
        queued=queued,
        capacity=capacity,
    )


@dataclass
class Run:
    """Feeds the policy one tick per second of fake time; the target follows each decision."""

    config: ScalingConfig = field(default_factory=lambda: CONFIG)
    target: int = 1
    now: float = 0.0
    state: PolicyState = field(default_factory=PolicyState)

    def tick(self, load: float, **kwargs: Any) -> int:
        decision, self.state = decide(
            metrics(self.target, load, **kwargs), self.config, self.state, self.now
        )
        self.target = decision.target
        self.now += 1.0
        return self.target


@pytest.mark.parametrize(
    ("target", "load", "expected", "direction"),
    [
        (1, 10, 1, "hold"),  # exactly the target per replica
        (1, 11, 2, "up"),
        (1, 95, 10, "up"),  # one big step, not one replica at a time
        (2, 500, 10, "up"),  # capped at max_replicas
        (4, 35, 4, "hold"),  # 35 > 3 x 10 x 0.8 = 24: inside the hysteresis band
        (4, 40, 4, "hold"),
    ],
)
def test_one_decision(target: int, load: float, expected: int, direction: str) -> None:
    decision, _ = decide(metrics(target, load), CONFIG, PolicyState(), now=0.0)
    assert (decision.target, decision.direction) == (expected, direction)
    assert decision.reason


def test_step_up_at_once_and_reason_says_why() -> None:
    run = Run(target=2)
    assert run.tick(load=80) == 8
    assert "needs 8" in run.state.history[-1].reason


def test_step_down_only_after_the_delay_and_bounded() -> None:
    run = Run(target=8)
    targets = [run.tick(load=5) for _ in range(31)]
    assert targets[:30] == [8] * 30  # t = 0..29 s: waiting out the 30 s delay
    assert targets[30] == 6  # t = 30 s: at most downscale_max_step (2) at once
    more = [run.tick(load=5) for _ in range(31)]
    assert more[28] == 6 and more[29] == 4  # the delay starts again after each step


def test_a_load_spike_restarts_the_downscale_delay() -> None:
    run = Run(target=4)
    for _ in range(20):
        run.tick(load=5)
    run.tick(load=35)  # back inside the band: the low period is over
    targets = [run.tick(load=5) for _ in range(31)]
    assert targets[:30] == [4] * 30 and targets[30] == 2


def test_no_scale_down_while_the_last_scale_up_is_starting() -> None:
    """Regression (seen on Ray with 2 cores): replicas starting for 40 s starved the router, the
    engines' queues read low, and a 3 s delay cancelled the replicas the load had asked for."""
    run = Run(target=4)
    for _ in range(40):
        assert run.tick(load=2, running=1) == 4
    assert (
        "3 replicas still starting"
        in decide(metrics(4, 2, running=1), CONFIG, run.state, 0)[0].reason
    )
    targets = [run.tick(load=2) for _ in range(31)]  # all up: now the low period counts
    assert targets[:30] == [4] * 30 and targets[30] == 2


def test_replicas_stuck_starting_do_not_block_scale_down_forever() -> None:
    run = Run(target=4)
    targets = [run.tick(load=2, running=1) for _ in range(700)]
    assert targets[599] == 4 and targets[-1] < 4


def test_no_flapping_under_noisy_load() -> None:
    """Load drawn uniformly from 28..50 around 4 replicas of 10: at most the first step up, then
    no reversal at all."""
    rng = random.Random(7)
    run = Run(target=4)
    targets = [run.tick(load=rng.uniform(28, 50)) for _ in range(600)]
    changes = [(a, b) for a, b in itertools.pairwise(targets) if a != b]
    assert all(b > a for a, b in changes), changes
    assert len(changes) <= 1


def test_kv_pressure_adds_a_replica_only_when_sustained() -> None:
    run = Run(target=2)
    assert [run.tick(load=10, kv=0.95) for _ in range(10)] == [2] * 10
    assert run.tick(load=10, kv=0.95) == 3  # 10 s above the threshold
    assert run.state.history[-1].reason.startswith("KV usage")
    run = Run(target=2)
    for i in range(30):
        assert run.tick(load=10, kv=0.95 if i % 5 else 0.5) == 2  # dips reset the clock


def test_capacity_caps_and_is_reported() -> None:
    decision, state = decide(metrics(2, 100, capacity=5), CONFIG, PolicyState(), now=0.0)
    assert (decision.desired, decision.target, decision.capacity_limited) == (10, 5, True)
    assert "can host 5" in decision.reason and "5 more cannot be placed" in decision.reason
    assert state.history[-1] == decision


def test_bounds() -> None:
    config = CONFIG.model_copy(update={"min_replicas": 3, "max_replicas": 5})
    assert Run(config=config, target=1).tick(load=0) == 3  # below min: up to min at once
    assert Run(config=config, target=5).tick(load=1000) == 5
    run = Run(config=config, target=5)
    assert [run.tick(load=0) for _ in range(100)][-1] == 3


ZERO = CONFIG.model_copy(update={"min_replicas": 0, "scale_to_zero_idle_s": 60})


def test_scale_to_zero_after_the_idle_period_then_cold_start() -> None:
    run = Run(config=ZERO, target=1)
    targets = [run.tick(load=0) for _ in range(61)]
    assert targets[:60] == [1] * 60 and targets[60] == 0
    assert run.state.history[-1].reason.startswith("idle for 60 s")
    assert [run.tick(load=0) for _ in range(100)] == [0] * 100  # zero stays zero
    decision, _ = decide(
        ScalingMetrics(current_replicas=0, target_replicas=0, queued=1), ZERO, run.state, run.now
    )
    assert (decision.target, decision.direction) == (1, "up")  # the first queued request
    assert decision.reason.startswith("cold start")
    decision, _ = decide(
        ScalingMetrics(current_replicas=0, target_replicas=0, queued=45), ZERO, run.state, run.now
    )
    assert decision.target == 5  # a burst at zero: straight to what it needs


def test_any_request_resets_the_idle_period() -> None:
    run = Run(config=ZERO, target=1)
    for t in range(200):
        assert run.tick(load=1 if t % 50 == 0 else 0) == 1


def test_without_min_zero_a_model_never_reaches_zero() -> None:
    run = Run(target=3)
    assert [run.tick(load=0) for _ in range(1000)][-1] == 1


def test_state_round_trips_through_a_dict() -> None:
    run = Run(target=2)
    run.tick(load=80)
    assert PolicyState.from_dict(run.state.to_dict()) == run.state
    assert PolicyState.from_dict(None) == PolicyState()


def test_history_is_bounded() -> None:
    run = Run(config=CONFIG.model_copy(update={"downscale_delay_s": 0}), target=1)
    for i in range(100):
        run.tick(load=100 if i % 2 else 0)
    assert len(run.state.history) == 20


class FakeContext:
    """The fields of Serve's AutoscalingContext the adapter reads."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def test_serve_adapter_reads_engine_stats_and_keeps_foreign_state() -> None:
    policy = ServeAutoscalingPolicy(CONFIG.model_dump(mode="json"), "engine")
    policy._report = lambda *args: None  # type: ignore[method-assign]  # no Ray metrics here
    ctx = FakeContext(
        current_time=100.0,
        deployment_name="LLMServer-m",
        current_num_replicas=2,
        target_num_replicas=2,
        running_replicas=["r1", "r2", "r3"],  # r3 has not reported yet: not counted
        aggregated_metrics={"running": {"r1": 30.0, "r2": 20.0}, "waiting": {"r1": 10.0}},
        total_queued_requests=5.0,
        policy_state={"serve-internal": 1},
    )
    target, state = policy(ctx)
    assert target == 7  # ceil((30 + 20 + 10 + 5) / 10)
    assert state["serve-internal"] == 1 and state["inference_cluster"]["history"]


def test_router_adapter_scales_on_ongoing_requests() -> None:
    policy = ServeAutoscalingPolicy(ScalingConfig(target_per_replica=100).model_dump(), "ongoing")
    policy._report = lambda *args: None  # type: ignore[method-assign]
    ctx = FakeContext(
        current_time=0.0,
        deployment_name="Router",
        current_num_replicas=1,
        target_num_replicas=1,
        total_num_requests=250.0,
        policy_state={},
    )
    assert policy(ctx)[0] == 3


def test_replicas_that_fit_packs_bundles() -> None:
    model = ModelConfig(
        name="m",
        engine="simulated",
        source="/x",
        max_model_len=1024,
        tensor_parallel_size=4,
        cpus_per_worker=1,
        replica_cpus=1,
    )
    placement = replica_placement(model)
    nodes = [{"GPU": 4.0, "CPU": 16.0}, {"GPU": 8.0, "CPU": 16.0}, {"GPU": 2.0, "CPU": 16.0}]
    assert replicas_that_fit(placement, nodes) == 3  # 1 + 2 + 0: TP 4 stays on one node
    assert replicas_that_fit(placement, []) == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_replicas": 5, "max_replicas": 2}, "below min_replicas"),
        ({"downscale_hysteresis": 1.0}, "less than 1"),
        ({"kv_usage_threshold": 0}, "greater than 0"),
        ({"look_back_period_s": 1, "metrics_interval_s": 1}, "longer than metrics_interval_s"),
        ({"targt_per_replica": 3}, "Extra inputs"),
    ],
)
def test_config_errors_name_the_problem(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelAutoscalingConfig(**fields)


def test_initial_replicas_must_be_within_bounds() -> None:
    with pytest.raises(ValidationError, match="initial count"):
        ModelConfig(
            name="m",
            engine="simulated",
            source="/x",
            max_model_len=1024,
            num_replicas=9,
            autoscaling={"enabled": True, "max_replicas": 4},
        )


@pytest.mark.parametrize(
    ("num_replicas", "scaling", "message"),
    [
        (1, {"enabled": True, "min_replicas": 0}, "min_replicas >= 1"),
        (5, {"enabled": True, "min_replicas": 1, "max_replicas": 4}, "initial count"),
        (1, {"enabled": True, "min_replicas": 2, "max_replicas": 4}, "initial count"),
    ],
)
def test_an_autoscaled_router_starts_within_its_bounds(
    num_replicas: int, scaling: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        RouterConfig(num_replicas=num_replicas, autoscaling=scaling)
