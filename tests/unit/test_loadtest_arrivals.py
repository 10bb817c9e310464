"""loadtest.arrivals: rates, burstiness, stages, closed loop, and the argument rules."""

from __future__ import annotations

import argparse
import random
import statistics

import pytest

from loadtest.arrivals import ArrivalPlan, Stage, add_arrival_arguments, build_arrivals, schedule
from loadtest.spec import Session, Turn


def plan_of(*argv: str) -> ArrivalPlan:
    parser = argparse.ArgumentParser()
    add_arrival_arguments(parser)
    return build_arrivals(parser.parse_args(list(argv)))


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *times], times, strict=False)]


def test_poisson_mean_gap_and_exponential_spread() -> None:
    times = plan_of("--rate", "5").times(20_000, random.Random(1))
    assert times is not None and len(times) == 20_000
    assert times == sorted(times)
    g = gaps(times)
    assert statistics.fmean(g) == pytest.approx(1 / 5, rel=0.01)
    # exponential gaps: standard deviation equals the mean
    assert statistics.stdev(g) / statistics.fmean(g) == pytest.approx(1.0, abs=0.05)


def test_last_arrival_is_rescaled_to_n_over_rate_as_in_vllm() -> None:
    times = plan_of("--rate", "4").times(100, random.Random(3))
    assert times is not None
    assert times[-1] == pytest.approx(100 / 4)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_sets_the_spread(burstiness: float) -> None:
    times = plan_of("--rate", "10", "--burstiness", str(burstiness)).times(20_000, random.Random(2))
    assert times is not None
    g = gaps(times)
    assert statistics.fmean(g) == pytest.approx(0.1, rel=0.02)
    # gamma with shape k: squared coefficient of variation 1/k
    cv2 = statistics.variance(g) / statistics.fmean(g) ** 2
    assert cv2 == pytest.approx(1 / burstiness, rel=0.1)


def test_infinite_burstiness_is_fixed_gaps_as_in_vllm() -> None:
    """vLLM reads it as no randomness at all; the gamma draw raised before any request."""
    times = plan_of("--rate", "10", "--burstiness", "inf").times(5, random.Random(0))
    assert times == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_burstiness_picks_gamma_and_contradictions_are_refused() -> None:
    assert plan_of("--rate", "1", "--burstiness", "0.5").kind == "gamma"
    assert plan_of("--rate", "1").kind == "poisson"
    with pytest.raises(ValueError, match="burstiness"):
        plan_of("--rate", "1", "--arrival", "poisson", "--burstiness", "0.5")
    with pytest.raises(ValueError, match="stages"):
        plan_of("--rate", "1", "--stages", "1:10")


def test_constant_and_infinite_rates() -> None:
    assert plan_of("--rate", "4", "--arrival", "constant").times(4, random.Random(0)) == [
        0.0,
        0.25,
        0.5,
        0.75,
    ]
    assert plan_of().times(3, random.Random(0)) == [0.0, 0.0, 0.0]
    assert plan_of("--rate", "inf").times(2, random.Random(0)) == [0.0, 0.0]


def test_stages_are_piecewise_poisson() -> None:
    plan = plan_of("--stages", "2:100,20:100,2:100")
    assert plan.stages == (Stage(2, 100), Stage(20, 100), Stage(2, 100))
    times = plan.times(10_000, random.Random(5))
    assert times is not None and times == sorted(times)
    counts = [sum(lo <= t < lo + 100 for t in times) for lo in (0, 100, 200)]
    assert counts[0] == pytest.approx(200, rel=0.2)
    assert counts[1] == pytest.approx(2000, rel=0.1)
    assert counts[2] == pytest.approx(200, rel=0.2)
    assert len(times) == sum(counts)  # nothing after the last stage


def test_stages_stop_at_n_sessions() -> None:
    times = plan_of("--stages", "50:100").times(10, random.Random(0))
    assert times is not None and len(times) == 10 and times[-1] < 2


def test_stage_syntax_errors() -> None:
    for bad in ("2", "2:0", "0:10", "inf:10", "a:b"):
        with pytest.raises(SystemExit):
            plan_of("--stages", bad)


def test_closed_loop_and_concurrency_cap() -> None:
    closed = plan_of("--concurrency", "8")
    assert closed.kind == "closed" and closed.max_concurrency == 8
    assert closed.times(5, random.Random(0)) is None
    capped = plan_of("--rate", "3", "--concurrency", "8")
    assert capped.kind == "poisson" and capped.max_concurrency == 8
    assert capped.times(5, random.Random(0)) is not None


def test_same_seed_same_times_and_different_seeds_differ() -> None:
    plan = plan_of("--rate", "2", "--burstiness", "0.5")
    assert plan.times(50, random.Random(7)) == plan.times(50, random.Random(7))
    assert plan.times(50, random.Random(7)) != plan.times(50, random.Random(8))


def test_schedule_prefers_trace_arrivals() -> None:
    timed = [Session(f"s{i}", (Turn((1, 2), 4, arrival_s=float(i)),)) for i in range(3)]
    untimed = [Session(f"s{i}", (Turn((1, 2), 4),)) for i in range(3)]
    plan = plan_of("--rate", "100", "--arrival", "constant")
    assert schedule(plan, timed, random.Random(0)) == [0.0, 1.0, 2.0]
    assert schedule(plan, untimed, random.Random(0)) == [0.0, 0.01, 0.02]
