"""When sessions start: open-loop arrival processes, staged rates, or a closed loop.

Open loop (the arrival times do not depend on the target, as in vLLM's `bench serve`):
  poisson   exponential gaps at --rate
  gamma     gamma gaps with shape --burstiness and mean 1/rate (vLLM's burstiness: < 1 burstier,
            1 Poisson, > 1 more regular)
  constant  one session every 1/rate seconds
  stages    Poisson piecewise, e.g. "2:30,20:30,2:30" (2 req/s for 30 s, 20 for 30 s, 2 for 30 s)
Closed loop: --concurrency N without a rate: N users, each starting its next session as soon as
the previous one ends. With a rate, --concurrency caps the requests in flight (vLLM's
--max-concurrency), and late arrivals wait for a slot.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from loadtest.argtypes import positive_float, positive_int
from loadtest.spec import Session

ArrivalKind = Literal["poisson", "gamma", "constant", "stages", "closed"]


@dataclass(frozen=True)
class Stage:
    rate: float  # sessions per second
    duration_s: float

    def __str__(self) -> str:
        return f"{self.rate:g}:{self.duration_s:g}"


@dataclass(frozen=True)
class ArrivalPlan:
    kind: ArrivalKind
    rate: float = math.inf
    burstiness: float = 1.0
    stages: tuple[Stage, ...] = ()
    max_concurrency: int | None = None

    def times(self, n: int, rng: random.Random) -> list[float] | None:
        """Start times (seconds from the run start, non-decreasing) of the first `n` sessions;
        fewer when the stages end first; None for a closed loop."""
        if self.kind == "closed":
            return None
        if self.kind == "stages":
            return _staged_poisson(self.stages, n, rng)
        if math.isinf(self.rate):
            return [0.0] * n
        if self.kind == "constant":
            return [i / self.rate for i in range(n)]
        shape = 1.0 if self.kind == "poisson" else self.burstiness
        if math.isinf(shape):
            # vLLM's reading of an infinite burstiness: no randomness, every gap 1/rate.
            gaps = [1.0 / self.rate] * n
        else:
            # Gamma with shape k and scale 1/(rate k) has mean 1/rate; k = 1 is the exponential.
            gaps = [rng.gammavariate(shape, 1.0 / (self.rate * shape)) for _ in range(n)]
        times = list(_cumulative(gaps))
        if not times or times[-1] == 0:
            return times
        # As vLLM does: rescale so that the last arrival is at n / rate exactly, which keeps the
        # offered load (and so the throughput figures) from drifting with the seed.
        scale = n / self.rate / times[-1]
        return [t * scale for t in times]

    def describe(self) -> str:
        cap = f", at most {self.max_concurrency} in flight" if self.max_concurrency else ""
        if self.kind == "closed":
            return f"closed loop, {self.max_concurrency} concurrent users"
        if self.kind == "stages":
            stages = ", ".join(f"{s.rate:g}/s for {s.duration_s:g} s" for s in self.stages)
            return f"Poisson stages: {stages}{cap}"
        if math.isinf(self.rate):
            return f"all at once{cap}"
        shape = f" (burstiness {self.burstiness:g})" if self.kind == "gamma" else ""
        return f"{self.kind}{shape} at {self.rate:g} req/s{cap}"


def _cumulative(values: Sequence[float]) -> list[float]:
    total = 0.0
    out = []
    for value in values:
        total += value
        out.append(total)
    return out


def _staged_poisson(stages: Sequence[Stage], n: int, rng: random.Random) -> list[float]:
    times: list[float] = []
    stage_start = 0.0
    for stage in stages:
        stage_end = stage_start + stage.duration_s
        # A Poisson process is memoryless, so restarting the gaps at each stage boundary is exact.
        t = stage_start
        while True:
            t += rng.expovariate(stage.rate)
            if t >= stage_end or len(times) >= n:
                break
            times.append(t)
        stage_start = stage_end
    return times


def parse_stages(text: str) -> tuple[Stage, ...]:
    """`RATE:SECONDS[,RATE:SECONDS...]` as an argparse type."""
    stages = []
    for part in text.split(","):
        rate, sep, duration = part.strip().partition(":")
        try:
            stage = Stage(float(rate), float(duration))
        except ValueError:
            stage = None
        if not sep or stage is None or not 0 < stage.rate < math.inf or stage.duration_s <= 0:
            raise argparse.ArgumentTypeError(
                f"{part!r}: expected RATE:SECONDS with a finite rate > 0 and seconds > 0"
            )
        stages.append(stage)
    return tuple(stages)


def add_arrival_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("arrivals")
    group.add_argument(
        "--rate",
        type=positive_float,
        default=None,
        help="Sessions started per second (inf: all at once; the default unless --concurrency "
        "alone asks for a closed loop).",
    )
    group.add_argument(
        "--arrival",
        choices=("poisson", "gamma", "constant"),
        default=None,
        help="Gaps between arrivals at --rate: exponential (poisson), gamma with shape "
        "--burstiness, or fixed (constant). Default: gamma when --burstiness is not 1, "
        "else poisson.",
    )
    group.add_argument(
        "--burstiness",
        type=positive_float,
        default=1.0,
        help="Shape of the gamma gaps, as in vLLM: 1 is Poisson, < 1 burstier, > 1 more regular "
        "(default 1).",
    )
    group.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        help="Without --rate or --stages: a closed loop of N users, each starting its next "
        "session when the previous one ends. With them: at most N requests in flight.",
    )
    group.add_argument(
        "--stages",
        type=parse_stages,
        default=None,
        metavar="RATE:SECONDS,...",
        help="Poisson arrivals at each RATE for SECONDS, one stage after the other "
        '(e.g. "2:30,20:30,2:30"). Sessions are taken in order while the stages last; raise '
        "--num-requests if they run out first.",
    )


def build_arrivals(args: argparse.Namespace) -> ArrivalPlan:
    """The plan `args` (from `add_arrival_arguments`) describe; ValueError for contradictions."""
    if args.arrival == "poisson" and args.burstiness != 1.0:
        raise ValueError("--burstiness other than 1 needs --arrival gamma (Poisson has shape 1)")
    if args.stages:
        if args.rate is not None or args.arrival is not None:
            raise ValueError("--stages sets the rates: drop --rate and --arrival")
        return ArrivalPlan("stages", stages=args.stages, max_concurrency=args.concurrency)
    if args.rate is None and args.concurrency is not None:
        if args.arrival is not None:
            raise ValueError("a closed loop (--concurrency without --rate) has no --arrival")
        return ArrivalPlan("closed", max_concurrency=args.concurrency)
    kind: ArrivalKind = args.arrival or ("gamma" if args.burstiness != 1.0 else "poisson")
    rate = math.inf if args.rate is None else args.rate
    return ArrivalPlan(kind, rate, args.burstiness, max_concurrency=args.concurrency)


def schedule(
    plan: ArrivalPlan, sessions: Sequence[Session], rng: random.Random
) -> list[float] | None:
    """Start times of the sessions: a trace's own arrival times when every session has them
    (as vLLM replays timed traces), otherwise the plan's."""
    first = [s.turns[0].arrival_s for s in sessions]
    if first and all(t is not None for t in first):
        return [t for t in first if t is not None]
    return plan.times(len(sessions), rng)


# ---- the autoscaling benchmark's trace rates (loadtest/bench_autoscaling.py) --------------------


def bursty_rate(
    duration_s: float,
    base_rate: float,
    burst_rate: float,
    burst_s: float,
    mean_gap_s: float,
    rng: random.Random,
) -> Callable[[float], float]:
    """A rate (req/s at a time) of `base_rate`, with bursts at `burst_rate` lasting `burst_s`,
    each starting an exponential gap of mean `mean_gap_s` after the previous one ends (so one
    per `burst_s + mean_gap_s` on average): the load steps up by burst_rate / base_rate at
    moments nobody announced, as a batch job or a launch does. The bursts are drawn from `rng`;
    `inhomogeneous_poisson` turns the rate into arrivals."""
    bursts: list[float] = []
    t = rng.expovariate(1 / mean_gap_s)
    while t < duration_s:
        bursts.append(t)
        t += burst_s + rng.expovariate(1 / mean_gap_s)

    def rate(at: float) -> float:
        in_burst = any(start <= at < start + burst_s for start in bursts)
        return burst_rate if in_burst else base_rate

    return rate


def diurnal_rate(low_rate: float, peak_rate: float, period_s: float) -> Callable[[float], float]:
    """A rate that follows a day compressed into `period_s`: a raised cosine from `low_rate` at
    the start (night) to `peak_rate` at mid-period (afternoon) and back."""

    def rate(at: float) -> float:
        phase = (1 - math.cos(2 * math.pi * at / period_s)) / 2
        return low_rate + (peak_rate - low_rate) * phase

    return rate


def inhomogeneous_poisson(
    rate: Callable[[float], float], max_rate: float, duration_s: float, rng: random.Random
) -> list[float]:
    """Arrival times of a Poisson process with a time-varying rate, by thinning (Lewis and
    Shedler): candidates at `max_rate`, each kept with probability rate(t) / max_rate."""
    times = []
    t = 0.0
    while True:
        t += rng.expovariate(max_rate)
        if t >= duration_s:
            return times
        if rng.random() * max_rate < rate(t):
            times.append(t)
