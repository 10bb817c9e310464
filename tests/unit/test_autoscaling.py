"""The autoscaling policy with a fake clock: table-driven, no Ray."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable
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
    drain_horizon_s=60,
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
    """Feeds the policy one tick per second of fake time; the target follows each decision.
    `measure(target, ...)` makes the tick's metrics (default: `metrics`)."""

    config: ScalingConfig = field(default_factory=lambda: CONFIG)
    target: int = 1
    now: float = 0.0
    state: PolicyState = field(default_factory=PolicyState)
    measure: Callable[..., ScalingMetrics] = metrics

    def tick(self, *args: Any, **kwargs: Any) -> int:
        decision, self.state = decide(
            self.measure(self.target, *args, **kwargs), self.config, self.state, self.now
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


ONE_REPLICA_DELAY = CONFIG.model_copy(update={"downscale_delay_one_replica_s": 10})
A_FALL = PolicyState(falling=True)  # the target's last change was a step down


@pytest.mark.parametrize(
    ("load", "min_replicas", "state", "first_step_s", "to"),
    [
        (30, 1, A_FALL, 10, 4),  # fits 4 of 5 at 10 x (1 - 0.2), in a fall: the short delay
        (30, 1, PolicyState(), 30, 4),  # no step down before it: the whole delay
        (24, 1, A_FALL, 30, 3),  # fits 3: a surplus of two waits the whole delay
        (0, 4, A_FALL, 30, 4),  # fell to nothing: the floor stops the step at one, not the delay
    ],
)
def test_a_one_replica_surplus_in_a_fall_steps_down_after_its_own_delay(
    load: float, min_replicas: int, state: PolicyState, first_step_s: int, to: int
) -> None:
    config = ONE_REPLICA_DELAY.model_copy(update={"min_replicas": min_replicas})
    run = Run(config, target=5, state=state)
    targets = [run.tick(load=load) for _ in range(31)]
    assert targets[:first_step_s] == [5] * first_step_s and targets[first_step_s] == to
    short = "(one replica over, in a fall)"
    assert (short in run.state.history[-1].reason) == (first_step_s == 10)


def test_a_fall_takes_the_short_delay_after_its_first_step() -> None:
    """8 replicas for a load that fits 5: 8 -> 6 after 30 s (a surplus of three), then 6 -> 5
    after 10 s (a surplus of one, in a fall), then nothing more."""
    run = Run(ONE_REPLICA_DELAY, target=8)
    targets = [run.tick(load=40) for _ in range(36)]
    decision, _ = decide(metrics(6, 40), ONE_REPLICA_DELAY, run.state, run.now)
    assert "low for 6 of 10 s" in decision.reason
    targets += [run.tick(load=40) for _ in range(44)]
    changes = [(t, b) for t, (a, b) in enumerate(itertools.pairwise(targets), 1) if a != b]
    assert changes == [(30, 6), (40, 5)]


def test_a_rise_ends_the_fall_and_a_swing_after_it_changes_nothing() -> None:
    """In a fall, the load rises (4 -> 5), then swings for 10 minutes between 15 s fitting 5
    replicas and 15 s fitting 4: the first step down after a rise waits the whole delay, so
    the short one never takes a replica off to add it back."""
    run = Run(ONE_REPLICA_DELAY, target=4, state=A_FALL)
    assert run.tick(load=45) == 5
    targets = [run.tick(load=45 if (t // 15) % 2 == 0 else 30) for t in range(600)]
    assert set(targets) == {5}


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


@pytest.mark.parametrize(("load", "expected"), [(25, 4), (30, 4), (24, 3)])
def test_no_change_inside_the_hysteresis_band(load: float, expected: int) -> None:
    """At 4 replicas of 10 the band is 24 < load <= 30: 3 replicas hold the load, but not with
    the 0.2 margin (3 x 10 x 0.8 = 24). Held for twice the downscale delay."""
    run = Run(target=4)
    assert [run.tick(load=load) for _ in range(61)][-1] == expected


def test_no_flapping_under_noisy_load() -> None:
    """A load that wanders for 10 minutes around 4 replicas of 10, each level held for 40 s
    (longer than the downscale delay) with per-tick noise on top, drawn from the band and
    above it up to 4 replicas' worth: never a change (without the band, every level under 30
    would shed a replica and the next one above would add it back)."""
    rng = random.Random(7)
    run = Run(target=4)
    targets = []
    for _ in range(15):
        level = rng.uniform(25, 40)
        targets += [run.tick(load=min(40, max(25, level + rng.uniform(-1, 1)))) for _ in range(40)]
    assert set(targets) == {4}


def engine_metrics(
    target: int, running: int, in_service: float, backlog: float, finished_per_s: float
) -> ScalingMetrics:
    """`running` replicas sharing `in_service` requests in their batches and finishing
    `finished_per_s` requests per second each; `backlog` requests queued at the handles."""
    share = ReplicaLoad(in_service / running, 0.0, 0.0, finished_per_s)
    return ScalingMetrics(running, target, [share] * running, queued=backlog)


@pytest.mark.parametrize(
    ("finished_per_s", "expected", "counted"),
    [
        # 120 waiting, drained over 60 s at 1/s per replica: 2 replicas of 10 = 20 in service.
        (1.0, 4, ": 20 more in service"),
        (2.0, 3, ": 10 more in service"),  # twice the throughput, half the replicas for the drain
        # Nothing finished yet: no throughput to drain with, the backlog counts in full.
        (0.0, 14, "load 140"),
        # So slow that the drain would need more than serving the whole backlog at once: capped.
        (0.01, 14, ": 120 more in service"),
    ],
)
def test_a_backlog_is_drained_over_the_horizon_not_served_at_once(
    finished_per_s: float, expected: int, counted: str
) -> None:
    config = CONFIG.model_copy(update={"max_replicas": 20})
    assert config.drain_horizon_s == 60
    decision, _ = decide(engine_metrics(2, 2, 20, 120, finished_per_s), config, PolicyState(), 0)
    assert decision.target == expected
    assert counted in decision.reason


def test_a_backlog_growing_while_replicas_start_is_not_answered_twice() -> None:
    """Regression (bench_autoscaling, 30 s replica start): the queue that builds while asked-for
    replicas start was sized again at every tick, and a 5x burst that 2 replicas serve got 29.
    Here 2 saturated replicas (10 in service each, finishing 1/s each) face 114 waiting that grow
    by 2/s (4 arrive per second) while the replicas asked for start. The target is what stops the
    growth (2 + 2) plus what drains the queue in 60 s, once."""
    config = CONFIG.model_copy(update={"max_replicas": 40})
    state, target, targets = PolicyState(), 2, []
    for t in range(31):
        metrics = engine_metrics(target, 2, 20, 114 + 2 * t, finished_per_s=1.0)
        decision, state = decide(metrics, config, state, float(t))
        target = decision.target
        targets.append(target)
    # 2 + 114/60 at the first tick (no growth known yet); then the growth (smoothed over 5 s)
    # rises to 2 replicas and the drain to 174/60: 2 + 2 + 2.9 -> 7 at the end, never more.
    assert targets[0] == 4 and targets[-1] == 7 and max(targets) == 7
    assert targets == sorted(targets)  # never the 20 that counting the queue in service asked


def test_requests_above_the_target_in_a_batch_count_as_backlog() -> None:
    """Once the new replicas are up, the queue floods their batches (256 running where T is 10):
    counted as in service it read as 3x the load; it is the backlog, drained over the horizon."""
    config = CONFIG.model_copy(update={"max_replicas": 40})
    flooded = engine_metrics(6, 6, 6 * 30, 0, finished_per_s=1.0)
    decision, _ = decide(flooded, config, PolicyState(), 0.0)
    # 60 in service at 10 each; 120 above it, drained over 60 s at 1/s per replica: 2 more.
    assert decision.target == 8, decision.reason
    assert "60 in service + 120 waiting" in decision.reason
    # Two more just started, batches full, nothing finished yet: the throughput is the others'.
    started = ScalingMetrics(8, 8, [*flooded.replicas, *[ReplicaLoad(30, 0, 0, 0.0)] * 2])
    assert started.throughput_per_replica == 1.0


def test_a_replica_joining_is_not_read_as_backlog_growth() -> None:
    """A new replica is flooded from the handles' queue at once while the queue's average lags
    by the look-back, so for a tick the same requests count twice: not growth."""
    config = CONFIG.model_copy(update={"max_replicas": 40})
    _, state = decide(engine_metrics(3, 2, 20, 100, 1.0), config, PolicyState(), 0.0)
    _, state = decide(engine_metrics(3, 3, 30, 130, 1.0), config, state, 1.0)  # joined
    assert state.growth == 0.0
    _, state = decide(engine_metrics(3, 3, 30, 140, 1.0), config, state, 2.0)
    assert state.growth == pytest.approx(10 / 5)  # 10/s, smoothed over 5 s


def test_no_scale_down_below_what_the_arrival_rate_needs_at_the_measured_throughput() -> None:
    """Regression (bench_autoscaling, diurnal evening): requests finish faster at light load, so
    fewer are in flight per request/s; the in-flight count alone took 3 replicas to 1 while the
    arrival rate needed 2, and the queue brought them straight back."""
    config = CONFIG.model_copy(update={"max_replicas": 20})
    light = engine_metrics(3, 3, 9, 0, finished_per_s=1.5)  # 9 in flight fits 2; 4.5/s arrive
    state = PolicyState()
    for t in range(20):  # every batch at T = 10, each replica finishing 2/s: learned ...
        _, state = decide(engine_metrics(3, 3, 30, 0, finished_per_s=2.0), config, state, t)
        if t < 10:  # ... once the same replicas have reported for SETTLE_S (10 s)
            assert state.rate_at_target is None
    assert state.rate_at_target == pytest.approx(2.0)
    targets = []
    for t in range(20, 200):
        decision, state = decide(light, config, state, float(t))
        targets.append(decision.target)
    # 4.5/s at 2/s per replica: ceil(2.25) = 3.
    assert set(targets) == {3}
    assert "the arrival rate needs 3" in decision.reason
    never_measured = PolicyState()
    for t in range(31):  # the 30 s downscale delay, then a step
        decision, never_measured = decide(light, config, never_measured, float(t))
    assert decision.target == 2  # without a measurement, the in-flight count decides


def test_the_throughput_at_target_is_not_learned_while_batches_fill() -> None:
    """Regression (bench_autoscaling, diurnal): while batches fill, requests finish at the rate
    they arrived a latency ago. Learned there, the rate read 9-15/s where a replica finishes
    17.5 at T, and the rate floor kept 2-3 replicas too many through the evening."""
    state = PolicyState()
    batches = [5.0] * 10 + [8 * 1.05**i for i in range(5)] + [10.0] * 25  # T = 10
    for t, batch in enumerate(batches):  # finishing 1/s per replica while filling, then 2/s
        finished = 2.0 if batch == 10.0 else 1.0
        _, state = decide(engine_metrics(3, 3, 3 * batch, 0, finished), CONFIG, state, float(t))
    assert state.rate_at_target == 2.0  # the filling ticks (near T, no queue) left no trace


def test_kv_pressure_adds_a_replica_only_when_sustained() -> None:
    run = Run(target=2)
    assert [run.tick(load=10, kv=0.95) for _ in range(10)] == [2] * 10
    assert run.tick(load=10, kv=0.95) == 3  # 10 s above the threshold
    assert run.state.history[-1].reason.startswith("KV usage")
    run = Run(target=2)
    for i in range(30):
        assert run.tick(load=10, kv=0.95 if i % 5 else 0.5) == 2  # dips reset the clock


def test_a_replica_added_for_kv_pressure_stays() -> None:
    """Regression: the KV rule took 2 replicas at 0.95 to 3 (0.63 each), the load (12 at T = 10)
    fits 2, and the scale-down shed the third after the delay, only for KV to add it back 11 s
    later, every ~42 s. The same KV in use fits 2 replicas only under the threshold's margin."""
    run = Run(target=2)
    targets = [run.tick(load=12, kv=1.9 / run.target) for _ in range(300)]
    assert targets[:10] == [2] * 10 and set(targets[10:]) == {3}
    assert (
        "KV usage 0.63 needs 3"
        in decide(metrics(3, 12, kv=1.9 / 3), CONFIG, run.state, 0)[0].reason
    )
    run = Run(target=3)  # KV that fits 2 with the margin (0.65 each on 2) lets the third go
    assert [run.tick(load=12, kv=1.3 / run.target) for _ in range(31)][-1] == 2


def test_capacity_caps_and_is_reported() -> None:
    decision, state = decide(metrics(2, 100, capacity=5), CONFIG, PolicyState(), now=0.0)
    assert (decision.desired, decision.target, decision.capacity_limited) == (10, 5, True)
    assert "can host 5" in decision.reason and "5 more cannot be placed" in decision.reason
    assert state.history[-1] == decision


def test_a_capacity_limit_is_recorded_once_not_every_tick() -> None:
    """Serve runs the policy every 0.1 s: a full cluster recorded (logged, published) a 5 -> 5
    decision on each tick, and pushed the real 2 -> 5 out of the 20 kept within 2 s."""
    run = Run(target=2)
    for _ in range(50):
        run.tick(load=100, capacity=5)
    assert [(d.previous, d.target, d.desired) for d in run.state.history] == [(2, 5, 10)]
    for _ in range(50):
        run.tick(load=100, capacity=6)  # room for one more: one new decision
    assert [(d.previous, d.target, d.desired) for d in run.state.history] == [
        (2, 5, 10),
        (5, 6, 10),
    ]
    for load in [70, 100] * 25:  # a noisy load asks for 7, then 10: still the same limit
        run.tick(load=load, capacity=6)
    assert len(run.state.history) == 2


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


def test_an_idle_fleet_goes_to_zero_through_one_replica() -> None:
    """Regression: 2 idle replicas went 2 -> 0 in one step; Serve's wrapper applies only 1 -> 0
    (it made the step 2 -> 1), and the policy's next run read that 1 after its 0 as a cold
    start, recording one that never happened. Now: 2 -> 1, then 1 -> 0, and no cold start.
    (With an idle period shorter than the downscale delay: both run out at the same tick.)"""
    run = Run(config=ZERO.model_copy(update={"scale_to_zero_idle_s": 10}), target=2)
    targets = [run.tick(load=0) for _ in range(100)]
    assert 0 < targets.index(1) < targets.index(0) and set(targets[targets.index(0) :]) == {0}
    assert [(d.previous, d.target) for d in run.state.history] == [(2, 1), (1, 0)]
    assert not any(d.reason.startswith("cold start") for d in run.state.history)


def test_serve_taking_zero_to_one_is_recorded_once() -> None:
    """On Ray, Serve's cold-start path starts the first replica without calling the policy; the
    policy's next run finds a target above the 0 it returned and records the step."""
    run = Run(config=ZERO, target=1)
    for _ in range(61):
        run.tick(load=0)
    assert run.target == 0 and run.state.last_target == 0
    serve_started = ScalingMetrics(current_replicas=1, target_replicas=1, queued=1)
    decision, state = decide(serve_started, ZERO, run.state, run.now)
    cold = state.history[-1]
    assert (cold.previous, cold.target, cold.direction) == (0, 1, "up")
    assert cold.reason.startswith("cold start: Serve started 1")
    assert decision.target == 1 and state.last_target == 1
    _, again = decide(serve_started, ZERO, state, run.now + 1)
    assert again.history == state.history  # recorded once
    # When the policy takes 0 -> 1 itself (the simulator, or Serve calling it), one record.
    at_zero = ScalingMetrics(current_replicas=0, target_replicas=0, queued=1)
    _, own = decide(at_zero, ZERO, run.state, run.now)
    _, after = decide(serve_started, ZERO, own, run.now + 1)
    assert [d.reason.startswith("cold start") for d in after.history[-2:]] == [False, True]
    assert after.history == own.history


def test_the_idle_period_starts_once_the_replica_has_loaded() -> None:
    """Regression (real vLLM on Ray): the idle period counted from the deploy, so a model whose
    engine took longer to load than scale_to_zero_idle_s went to zero as soon as it was up."""
    run = Run(config=ZERO, target=1)
    assert [run.tick(load=0, running=0) for _ in range(90)] == [1] * 90  # loading
    targets = [run.tick(load=0) for _ in range(61)]
    assert targets[:60] == [1] * 60 and targets[60] == 0


def test_a_replica_stuck_loading_still_lets_an_idle_model_go_to_zero() -> None:
    run = Run(config=ZERO, target=1)
    targets = [run.tick(load=0, running=0) for _ in range(700)]
    assert targets[659] == 1 and targets[-1] == 0


def test_any_request_resets_the_idle_period() -> None:
    run = Run(config=ZERO, target=1)
    for t in range(200):
        assert run.tick(load=1 if t % 50 == 0 else 0) == 1


def test_without_min_zero_a_model_never_reaches_zero() -> None:
    run = Run(target=3)
    assert [run.tick(load=0) for _ in range(1000)][-1] == 1


RATE_CONFIG = CONFIG.model_copy(
    update={"target_rate_per_replica": 10.0, "target_per_replica": 100, "max_replicas": 20}
)


def rate_metrics(target: int, arriving: float, queued: float = 0.0) -> ScalingMetrics:
    """`target` replicas, all up, sharing `arriving` requests per second (accepted and finished
    alike), 5 in each batch (far below T = 100: the in-flight rules ask for nothing)."""
    share = arriving / target
    replica = ReplicaLoad(5.0, 0.0, 0.0, finished_per_s=share, arrived_per_s=share)
    return ScalingMetrics(target, target, [replica] * target, queued=queued)


def rate_run(target: int = 3) -> Run:
    """A Run of RATE_CONFIG; every replica asked for is up at once."""
    return Run(RATE_CONFIG, target=target, measure=rate_metrics)


def test_rate_sizing_follows_a_step_of_the_counted_arrival_rate_within_seconds() -> None:
    run = rate_run()
    for _ in range(10):
        assert run.tick(30.0) == 3  # 30/s at 10/s per replica
    targets = [run.tick(90.0) for _ in range(40)]
    # A 3x step: up at the first tick, and the 9 replicas it needs within 6 s (the rate is
    # averaged over 3 s and not updated for 4 s after replicas join); on top, the lead of the
    # trend, which lasts while the trend decays (30 s) but never above 30% of the rate.
    assert targets[0] > 3 and targets[5] >= 9
    assert max(targets) == math.ceil(90 * 1.3 / 10)
    assert "arrival rate" in run.state.history[-1].reason


def test_rate_sizing_leads_a_rising_rate() -> None:
    run = rate_run()
    for _ in range(10):
        run.tick(30.0)
    targets = []
    for second in range(60):  # +1 req/s every second: 30 s ahead is 30 req/s more
        rate = 30.0 + second
        targets.append(run.tick(rate))
        assert run.target >= math.ceil(rate / 10)  # never behind the rate itself
    assert targets == sorted(targets)
    assert targets[-1] > math.ceil(89 / 10)  # ahead of the rise


@pytest.mark.parametrize(("trend", "expected"), [(1.0, 8), (0.0, 7)])
def test_rate_sizing_never_scales_down_while_the_rate_climbs(trend: float, expected: int) -> None:
    """Regression (bench_autoscaling, bursty): low for the delay since the last burst, the fleet
    shed replicas while the next burst's rate was climbing through what it fits. 60/s rising by
    1/s per second fits 8 replicas at 10 x 0.9 only without its rise (60 / 9 -> 7)."""
    config = RATE_CONFIG.model_copy(update={"downscale_hysteresis": 0.1})
    low_for_long = PolicyState(low_since_s=0.0, arrivals=60.0, arrivals_trend=trend)
    decision, _ = decide(rate_metrics(8, 60.0), config, low_for_long, 100.0)
    assert decision.target == expected, decision.reason


def test_rate_sizing_scales_down_after_the_delay_to_what_the_rate_fits_with_the_margin() -> None:
    run = rate_run(target=8)
    targets = [run.tick(40.0) for _ in range(120)]
    # 40/s fits 5 replicas at 10 x (1 - 0.2): 8 -> 6 after the 30 s delay, 6 -> 5 after another.
    assert targets[25] == 8 and targets[40] == 6 and targets[-1] == 5
    assert [b for a, b in itertools.pairwise(targets) if a != b] == [6, 5]


def test_rate_sizing_does_not_flap_on_a_noisy_rate() -> None:
    rng = random.Random(3)
    run = rate_run(target=6)
    targets = [run.tick(rng.gauss(55.0, 5.0)) for _ in range(600)]
    changes = [(a, b) for a, b in itertools.pairwise(targets) if a != b]
    assert all(b > a for a, b in changes), changes
    assert len(changes) <= 1


def test_the_arrival_rate_counts_the_handles_queue_and_skips_a_join() -> None:
    """The replicas accept 30/s and the handles' queue grows by 10/s: 40/s arrive. A replica
    joining takes a flood from the queue at once while the queue's average lags by the look-back:
    for a look-back and a push (4 s), the rate is not updated."""
    config = RATE_CONFIG.model_copy(update={"max_replicas": 3})  # the queue is not served
    state = PolicyState()
    for t in range(40):
        _, state = decide(rate_metrics(3, 30.0, queued=10.0 * t), config, state, float(t))
    assert state.arrivals == pytest.approx(40.0)
    before = state.arrivals
    for t in range(40, 44):  # a fourth replica joins; the averages are still settling
        _, state = decide(rate_metrics(4, 200.0, queued=0.0), config, state, float(t))
        assert state.arrivals == before
    _, state = decide(rate_metrics(4, 40.0, queued=0.0), config, state, 44.0)
    assert state.arrivals == pytest.approx(40.0)


def test_rate_sizing_keeps_the_queue_rules_for_a_backlog() -> None:
    """The rate says 3 (30/s arrive, the queue neither grows nor shrinks), but 3,000 requests
    wait at the handles: the backlog's drain over the horizon asks for more."""
    state = PolicyState()
    for t in range(10):
        decision, state = decide(rate_metrics(3, 30.0, queued=3000.0), RATE_CONFIG, state, t)
    assert state.arrivals == pytest.approx(30.0)
    assert decision.target > 3 and "3000 waiting" in decision.reason


def test_state_round_trips_through_a_dict() -> None:
    run = Run(target=2)
    run.tick(load=80)
    assert PolicyState.from_dict(run.state.to_dict()) == run.state
    state = PolicyState()
    for t in range(20):  # batches at T, steady: every learned field set
        _, state = decide(engine_metrics(3, 3, 30, 0, 2.0), CONFIG, state, float(t))
    assert None not in (
        state.rate_at_target,
        state.rate_provisional,
        state.settled_since_s,
        state.arrivals,
        state.queued,
    )
    assert PolicyState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert PolicyState.from_dict(None) == PolicyState()
    # A state saved by another version of the policy: missing fields default, unknown ones go.
    assert PolicyState.from_dict({"last_target": 3, "retired": 1.0}) == PolicyState(last_target=3)


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


def test_serve_adapter_publishes_the_cold_start_serve_took() -> None:
    policy = ServeAutoscalingPolicy(ZERO.model_dump(mode="json"), "engine")
    published: list[Any] = []
    policy._report = lambda name, metrics, decision, recorded: published.extend(recorded)  # type: ignore[method-assign]
    at_zero = PolicyState(last_target=0).to_dict()
    ctx = FakeContext(
        current_time=50.0,
        deployment_name="LLMServer-m",
        current_num_replicas=1,
        target_num_replicas=1,
        running_replicas=["r1"],
        aggregated_metrics={"running": {"r1": 1.0}, "finished_per_s": {"r1": 0.5}},
        total_queued_requests=0.0,
        policy_state={"inference_cluster": at_zero},
    )
    assert policy(ctx)[0] == 1
    assert [(d.previous, d.target) for d in published] == [(0, 1)]
    assert published[0].reason.startswith("cold start")


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
        (
            {"downscale_delay_s": 10, "downscale_delay_one_replica_s": 20},
            r"downscale_delay_one_replica_s \(20\) is above downscale_delay_s \(10\)",
        ),
        # Ignored without a word before: the model never goes to zero.
        ({"scale_to_zero_idle_s": 10}, "scale_to_zero_idle_s apply only with min_replicas 0"),
        (
            {"min_replicas": 2, "scale_to_zero_idle_s": 10, "cold_start_timeout_s": 5},
            "cold_start_timeout_s and scale_to_zero_idle_s apply only with min_replicas 0 "
            r"\(it is 2\)",
        ),
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
