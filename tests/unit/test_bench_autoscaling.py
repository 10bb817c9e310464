"""The autoscaling benchmark's parts: traces, Ray's default policy as re-implemented, figures."""

from __future__ import annotations

import random

import pytest

from loadtest.arrivals import bursty_rate, diurnal_rate, inhomogeneous_poisson
from loadtest.bench_autoscaling import (
    MAX_REPLICAS,
    ROUTER,
    instant,
    main,
    oracle_with_start,
    oscillations,
    plan,
    replica_seconds,
    sized_with_margin,
    trace_rate,
    trace_times,
    window_oracle,
    window_p95,
)
from loadtest.simulator.ray_autoscaler import MetricWindow, RayAutoscalingConfig, RayDefaultPolicy
from loadtest.spec import RequestRecord


def rate_in(times: list[float], start: float, end: float) -> float:
    return sum(start <= t < end for t in times) / (end - start)


def test_diurnal_trace_follows_the_day() -> None:
    times = inhomogeneous_poisson(diurnal_rate(2, 40, 3600), 40, 3600, random.Random(1))
    assert times == sorted(times)
    assert rate_in(times, 0, 300) == pytest.approx(2.9, rel=0.2)  # night: near the low rate
    assert rate_in(times, 1650, 1950) == pytest.approx(39.7, rel=0.1)  # mid-period: the peak
    assert rate_in(times, 3300, 3600) == pytest.approx(2.9, rel=0.2)


def test_bursty_trace_has_bursts_at_the_burst_rate() -> None:
    rng = random.Random(2)
    times = inhomogeneous_poisson(bursty_rate(3600, 5, 50, 60, 300, rng), 50, 3600, rng)
    per_10s = [rate_in(times, s, s + 10) for s in range(0, 3600, 10)]
    high = [r for r in per_10s if r > 25]
    assert 30 <= len(high) <= 120  # ~8 bursts of 6 windows
    assert sum(high) / len(high) == pytest.approx(50, rel=0.1)
    low = [r for r in per_10s if r <= 25]
    assert sum(low) / len(low) == pytest.approx(5, rel=0.2)


def test_a_seeds_arrivals_follow_the_rate_the_seed_draws() -> None:
    rate = trace_rate("bursty", 0)
    times = trace_times("bursty", 0)
    bursting = [s for s in range(0, 600, 10) if rate(s) > 40 and rate(s + 9.99) > 40]
    assert bursting  # the seed draws bursts, and the arrivals have them where the rate does
    assert all(rate_in(times, s, s + 10) > 100 for s in bursting)
    assert trace_times("bursty", 0) == times and trace_times("bursty", 1) != times


def test_instant_reaction_sizes_for_the_true_rate_now() -> None:
    hook = instant(lambda t: 45.0 if t < 10 else 0.0, per_replica=20.0)
    assert hook(None, None, 5.0) == (3, None)  # 45 / 20 -> 3
    assert hook(None, None, 15.0) == (1, None)  # never below one replica
    flood = instant(lambda _: 1e6, per_replica=1.0)
    assert flood(None, None, 0.0) == (MAX_REPLICAS, None)


def test_metric_window_sees_only_pushed_samples_averaged_over_the_look_back() -> None:
    window = MetricWindow.of(look_back_s=30, push_interval_s=10)
    assert window.record_interval_s == 6  # min(30 x 0.2, 10), as Ray records
    seen = [window.observe(float(t), 100.0 if t >= 20 else 0.0) for t in range(0, 61)]
    assert seen[19] == 0.0
    assert seen[25] == 0.0  # recorded at 24 s, but the last push was at 20 s
    assert seen[30] == pytest.approx(100 * 2 / 6)  # samples 0..30: 0,6,12,18 -> 0; 24,30 -> 100
    assert seen[60] == 100.0


def test_ray_default_waits_its_upscale_delay_and_uses_its_target() -> None:
    policy = RayDefaultPolicy(RayAutoscalingConfig())
    targets = []
    target = 1
    for t in range(120):
        target = policy.decide(float(t), ongoing=20.0, running=target, target=target)
        targets.append(target)
    first_up = targets.index(10)  # 20 ongoing / target 2
    assert 30 <= first_up <= 45  # first push at 10 s, then the 30 s delay
    assert set(targets[:first_up]) == {1}


def test_ray_default_downscale_waits_600_s() -> None:
    policy = RayDefaultPolicy(RayAutoscalingConfig(target_ongoing_requests=2))
    target, history = 5, []
    for t in range(700):
        target = policy.decide(float(t), 0.0, target, target)
        history.append(target)
    assert history[599] == 5 and history[-1] == 1


def test_figures() -> None:
    series = [(0.0, 1), (10.0, 3), (20.0, 2), (300.0, 4)]
    assert replica_seconds(series, 400.0) == 10 + 30 + 560 + 400
    assert oscillations(series, 30.0) == 1  # up at 10 s, down at 20 s; up again 280 s later
    assert oscillations(series, 600.0) == 2
    records = []
    for i, ttft in enumerate([0.1] * 19 + [5.0]):
        records.append(
            RequestRecord(
                index=i,
                session_id=str(i),
                turn=0,
                scheduled_s=1.0,
                start_s=1.0,
                end_s=9.0,
                status=200,
                prompt_tokens=1,
                output_tokens=1,
                token_times_s=[1.0 + ttft],
            )
        )
    assert window_p95(records, 20.0) == [pytest.approx(0.1), None]  # p95 of 20: the 19th


def test_oracle_covers_each_windows_arrival_rate_with_whole_replicas() -> None:
    # 10 s windows: 150 arrivals (15/s), none, 201 (20.1/s), 400 (40/s); 20 req/s per replica.
    times = (
        [i / 15 for i in range(150)]
        + [20 + i / 20.1 for i in range(201)]
        + [30 + i / 40 for i in range(400)]
    )
    assert window_oracle(times, 40.0, 20.0) == [1, 1, 2, 2]  # an empty window keeps one


def test_the_oracle_paying_the_start_starts_ahead_and_keeps_replicas_through_short_dips() -> None:
    # 10 s windows, 30 s starts. Two steps up of 2 replicas each cost 2 x 30 s more, ...
    assert oracle_with_start([1, 3, 3, 5], start_s=30) == 10 * (1 + 3 + 3 + 5) + 4 * 30
    # ... a dip of one window is cheaper kept (10 s) than restarted (30 s), ...
    assert oracle_with_start([2, 1, 2], start_s=30) == 10 * 6
    # ... and a dip of four windows is cheaper restarted.
    assert oracle_with_start([2, 1, 1, 1, 1, 2], start_s=30) == 10 * 8 + 30
    assert oracle_with_start([2, 1, 2], start_s=0) == 10 * 5


def test_sized_with_margin_holds_the_busiest_window_within_reach_at_that_share() -> None:
    rates = [10.0, 10.0, 40.0, 10.0, 10.0]  # req/s per 10 s window; 10 req/s per replica
    assert sized_with_margin(rates, 10.0, 1.0, 0.0) == 10 * (1 + 1 + 4 + 1 + 1)
    assert sized_with_margin(rates, 10.0, 1.0, 10.0) == 10 * (
        1 + 4 + 4 + 4 + 1
    )  # a window of reach
    assert sized_with_margin(rates, 10.0, 0.8, 0.0) == 10 * (2 + 2 + 5 + 2 + 2)  # 10 / 8 -> 2


def test_every_simulation_of_a_plan_runs_behind_the_router_asked_for() -> None:
    policies = ("fixed", "ray", "ours", "ours-rate", "instant")
    oracle, jobs = plan("diurnal", 0, policies, 20.0, router="cache_load")
    assert {job[2] for job in jobs} == set(policies)
    assert {job[-1] for job in jobs} == {"cache_load"}
    assert {job[-1] for job in plan("diurnal", 0, ("ours",), 20.0)[1]} == {ROUTER} == {"pow2"}
    assert all(job[-2] == oracle[0] for job in jobs)  # every policy starts with window 0's fleet


def test_an_unknown_router_is_refused_before_any_simulation(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--router", "least_loaded"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'least_loaded'" in capsys.readouterr().err
