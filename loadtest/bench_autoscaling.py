"""Autoscaling policies side by side in the simulator: `python -m loadtest.bench_autoscaling`.

The fleet is N simulated 8B/H100 replicas (deployments/engines/profiles.py) behind the pow2
router; requests are 1024 random prompt tokens and 256 output tokens. A replica the autoscaler
adds becomes routable REPLICA_START_S later. Each policy sees the load the way it does on Ray:
ongoing requests (running + waiting in the engines, plus requests queued at the router) recorded
on the replicas' schedule, pushed to the controller every metrics interval and averaged over its
look-back window (loadtest/simulator/ray_autoscaler.py: MetricWindow).

Policies:
  ours          deployments/autoscaling.py `decide`, its defaults except target_per_replica
  ray-default   Ray Serve's default policy (target_ongoing_requests 2, upscale delay 30 s,
                downscale delay 600 s, look-back 30 s, metrics every 10 s), re-implemented
  ray-best      the same with the target_ongoing_requests of RAY_TARGETS that scores best
                (SLO attainment first, then fewer replica-seconds)
  fixed-peak    the smallest fixed fleet that meets the SLO in every window

Figures (over the trace's duration):
  SLO attainment   share of 10 s windows (by request arrival; windows without requests are not
                   counted) whose TTFT p95 is <= 2 s; a failed request counts as an infinite TTFT
  replica-s/oracle replica-seconds allocated (routable + starting) over the oracle's. The oracle
                   holds, in each window, the fewest replicas N such that a fixed fleet of N
                   replicas (run over the whole trace, so with its own queue history) met the SLO
                   in that window: a lower bound no reactive policy can reach, since it knows the
                   future and pays no start-up delay.
  oscillations     direction reversals of the allocated count within the policy's own
                   downscale delay (an up then a down, or a down then an up)
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from deployments.autoscaling import PolicyState, ReplicaLoad, ScalingMetrics, decide
from deployments.config import ModelAutoscalingConfig
from deployments.engines.profiles import LLAMA_8B_H100
from deployments.routing.policy import create_policy
from loadtest.arrivals import bursty_trace, diurnal_trace
from loadtest.metrics import latencies
from loadtest.simulator.cluster import AutoscalingMetrics, FleetSpec, SimulationResult, simulate
from loadtest.simulator.ray_autoscaler import MetricWindow, RayAutoscalingConfig, RayDefaultPolicy
from loadtest.spec import RequestRecord, Session, Turn

PROFILE = LLAMA_8B_H100
INPUT_TOKENS, OUTPUT_TOKENS = 1024, 256
SLO_TTFT_S = 2.0
WINDOW_S = 10.0
# vLLM on one H100 loading an 8B model from local disk and capturing CUDA graphs: tens of
# seconds (an assumption: not measured here, there is no GPU).
REPLICA_START_S = 30.0
TICK_S = 1.0  # how often the simulated controller runs a policy
ORACLE_MAX = 16  # the most replicas the oracle tries for one window
RAY_TARGETS = (2, 8, 32)
OUR_TARGET = 32.0

# name -> (arrival times of the trace, its duration)
TRACES: dict[str, tuple[Callable[[random.Random], list[float]], float]] = {
    # 8 req/s with unannounced 5x bursts of two minutes, one every ~3 minutes on average.
    "bursty": (lambda rng: bursty_trace(600, 8, 40, 120, 180, rng), 600.0),
    # A day in 10 minutes: 4 req/s at night to 48 req/s in the afternoon.
    "diurnal": (lambda rng: diurnal_trace(600, 4, 48, 600, rng), 600.0),
}


@dataclass(frozen=True)
class Outcome:
    policy: str
    attainment: float
    replica_s: float
    oscillations: int
    downscale_delay_s: float
    window_count: int


def sessions(count: int, seed: int) -> list[Session]:
    rng = random.Random(f"prompts-{seed}")
    return [
        Session(
            f"s{i}",
            (Turn(tuple(rng.randrange(PROFILE.vocab_size) for _ in range(INPUT_TOKENS)), 256),),
        )
        for i in range(count)
    ]


def window_p95(records: Sequence[RequestRecord], duration_s: float) -> list[float | None]:
    """TTFT p95 per window of arrivals (None: no request arrived in it)."""
    buckets: list[list[float]] = [[] for _ in range(math.ceil(duration_s / WINDOW_S))]
    for record in records:
        index = int(record.start_s // WINDOW_S)
        if index < len(buckets):
            lat = latencies(record)
            buckets[index].append(math.inf if lat is None else lat.ttft_s)
    out: list[float | None] = []
    for ttfts in buckets:
        if not ttfts:
            out.append(None)
            continue
        ttfts.sort()
        out.append(ttfts[max(0, math.ceil(0.95 * len(ttfts)) - 1)])
    return out


def replica_seconds(series: Sequence[tuple[float, int]], duration_s: float) -> float:
    total = 0.0
    for (t0, n), (t1, _) in zip(series, [*series[1:], (duration_s, 0)], strict=True):
        total += n * max(0.0, min(t1, duration_s) - min(t0, duration_s))
    return total


def oscillations(series: Sequence[tuple[float, int]], delay_s: float) -> int:
    changes = [(t1, n1 - n0) for (_, n0), (t1, n1) in itertools.pairwise(series)]
    changes = [(t, d) for t, d in changes if d]
    return sum(
        1
        for (t0, d0), (t1, d1) in itertools.pairwise(changes)
        if (d0 > 0) != (d1 > 0) and t1 - t0 < delay_s
    )


def ours(config: ModelAutoscalingConfig) -> Callable[..., tuple[int, Any]]:
    """Our policy as a simulator hook, behind the same metric pipeline as on Ray."""
    window = MetricWindow.of(config.look_back_period_s, config.metrics_interval_s)
    kv = MetricWindow.of(config.look_back_period_s, config.metrics_interval_s)

    def hook(metrics: AutoscalingMetrics, state: Any, now: float) -> tuple[int, Any]:
        load = sum(m["running"] + m["waiting"] for m in metrics.replica_metrics.values())
        usage = [m["kv_cache_usage"] for m in metrics.replica_metrics.values()]
        seen_load = window.observe(now, load + metrics.num_queued)
        seen_kv = kv.observe(now, sum(usage) / len(usage) if usage else 0.0)
        running = metrics.num_replicas
        target = running + metrics.num_starting
        if seen_load is None:
            return target, state
        # decide() reads the sum of the loads and the mean KV usage: equal shares are exact.
        share = ReplicaLoad(seen_load / max(running, 1), 0.0, seen_kv or 0.0)
        decision, state = decide(
            ScalingMetrics(running, target, [share] * running),
            config,
            state or PolicyState(),
            now,
        )
        return decision.target, state

    return hook


def ray(config: RayAutoscalingConfig) -> Callable[..., tuple[int, Any]]:
    policy = RayDefaultPolicy(config)

    def hook(metrics: AutoscalingMetrics, state: Any, now: float) -> tuple[int, Any]:
        ongoing = sum(m["running"] + m["waiting"] for m in metrics.replica_metrics.values())
        target = metrics.num_replicas + metrics.num_starting
        return policy.decide(now, ongoing + metrics.num_queued, metrics.num_replicas, target), None

    return hook


def run(trace: str, seed: int, policy: str, param: float) -> tuple[str, float, SimulationResult]:
    """One simulation of the whole trace: `policy` is fixed (param = replicas), ours or ray
    (param = the per-replica target)."""
    arrivals, _ = TRACES[trace]
    times = arrivals(random.Random(f"{trace}-{seed}"))
    hook = None
    if policy == "ours":
        hook = ours(ModelAutoscalingConfig(enabled=True, max_replicas=64, target_per_replica=param))
    elif policy == "ray":
        hook = ray(RayAutoscalingConfig(target_ongoing_requests=param))
    replicas = int(param) if policy == "fixed" else 1
    return policy, param, _simulate(replicas, times, seed, hook)


def _simulate(
    replicas: int, times: Sequence[float], seed: int, hook: Callable[..., Any] | None = None
) -> SimulationResult:
    return simulate(
        FleetSpec(PROFILE, replicas),
        create_policy("pow2", rng=random.Random(f"policy-{seed}")),
        sessions(len(times), seed),
        times,
        autoscaler=hook,
        autoscaling_interval_s=TICK_S,
        replica_start_s=REPLICA_START_S,
    )


def window_oracle(trace: str, seed: int, window: int) -> int:
    """The fewest replicas that meet the SLO for one window's arrivals, starting empty: what the
    window needs by itself, with no backlog from before and no start-up delay (a lower bound)."""
    arrivals, _ = TRACES[trace]
    start = window * WINDOW_S
    times = [
        t - start for t in arrivals(random.Random(f"{trace}-{seed}")) if 0 <= t - start < WINDOW_S
    ]
    if not times:
        return 1
    for replicas in range(1, ORACLE_MAX + 1):
        p95 = window_p95(_simulate(replicas, times, seed).records, WINDOW_S)[0]
        if p95 is not None and p95 <= SLO_TTFT_S:
            return replicas
    return ORACLE_MAX


def outcome(
    name: str, result: SimulationResult, duration_s: float, delay_s: float, oracle_s: float
) -> Outcome:
    p95 = [p for p in window_p95(result.records, duration_s) if p is not None]
    series = result.allocated_over_time
    return Outcome(
        policy=name,
        attainment=sum(p <= SLO_TTFT_S for p in p95) / len(p95),
        replica_s=replica_seconds(series, duration_s) / oracle_s,
        oscillations=oscillations(series, delay_s),
        downscale_delay_s=delay_s,
        window_count=len(p95),
    )


def bench(trace: str, seed: int, pool: Executor) -> list[Outcome]:
    _, duration = TRACES[trace]
    windows = math.ceil(duration / WINDOW_S)
    oracle = list(pool.map(window_oracle, [trace] * windows, [seed] * windows, range(windows)))
    oracle_s = sum(oracle) * WINDOW_S
    jobs = [(trace, seed, "ray", target) for target in RAY_TARGETS]
    jobs.append((trace, seed, "ours", OUR_TARGET))
    results = list(pool.map(run, *zip(*jobs, strict=True)))
    # A fleet sized for the peak: from the busiest window's oracle up, the first fixed fleet
    # that meets the SLO in every window of the whole trace.
    peak = max(oracle)
    while True:
        fixed = run(trace, seed, "fixed", peak)[2]
        if all(p is None or p <= SLO_TTFT_S for p in window_p95(fixed.records, duration)):
            break
        peak += 1

    ray_delay = RayAutoscalingConfig().downscale_delay_s
    candidates = [
        outcome(f"ray (target {p:g})", r, duration, ray_delay, oracle_s)
        for k, p, r in results
        if k == "ray"
    ]
    best = max(candidates, key=lambda o: (round(o.attainment, 3), -o.replica_s))
    ours_result = next(r for k, _, r in results if k == "ours")
    print(
        f"\n{trace}: {duration:g} s, {len(ours_result.records)} requests, oracle "
        f"{oracle_s:.0f} replica-s (per window: {min(oracle)} to {max(oracle)} replicas)"
    )
    for o in candidates:
        print(f"  {o.policy}: attainment {o.attainment:.3f}, replica-s/oracle {o.replica_s:.2f}")
    return [
        outcome(f"fixed for the peak ({peak})", fixed, duration, 0.0, oracle_s),
        next(o for o in candidates if o.policy == "ray (target 2)"),
        best,
        outcome(
            f"ours (target {OUR_TARGET:g})",
            ours_result,
            duration,
            ModelAutoscalingConfig().downscale_delay_s,
            oracle_s,
        ),
    ]


def table(rows_by_trace: dict[str, list[Outcome]]) -> str:
    lines = [
        "| trace | policy | SLO attainment | replica-s / oracle | oscillations (within its "
        "downscale delay) |",
        "|---|---|---|---|---|",
    ]
    for trace, rows in rows_by_trace.items():
        for o in rows:
            lines.append(
                f"| {trace} | {o.policy} | {o.attainment:.1%} of {o.window_count} windows | "
                f"{o.replica_s:.2f} | {o.oscillations} ({o.downscale_delay_s:g} s) |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_autoscaling", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--trace", choices=sorted(TRACES), action="append", help="Trace(s) to run (default: all)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of arrivals and prompts.")
    parser.add_argument("--workers", type=int, default=2, help="Simulations run in parallel.")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        rows = {trace: bench(trace, args.seed, pool) for trace in args.trace or sorted(TRACES)}
    print()
    print(table(rows))
    print(f"\n({time.perf_counter() - started:.0f} s of wall time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
