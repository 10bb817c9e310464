"""`loadtest capacity`: the highest arrival rate a target sustains within a TTFT SLO.

    loadtest capacity --target http://127.0.0.1:8000 --out OUT -- --workload random \\
        --input-len 1024 --output-len 256

Holds Poisson arrivals at one rate for --hold-s and checks every --window-s window of them: the
rate is sustained when each window's TTFT p95 is within --slo-ttft-ms (a failed request counts as
an infinite TTFT); a probe of a URL stops at the first window that missed (`loadtest run
--stop-at-slo-miss`). It first tries --low, then bisects between the highest rate sustained and
the lowest one not, down to --resolution, and prints the capacity per replica with the config line
rate sizing needs: `models[].autoscaling.target_rate_per_replica` is that capacity times the
share of it to run replicas at (--utilization; 0.93 is what the autoscaling benchmark runs).

A target is a base URL, measured with `loadtest run` (point it at a deployment of --replicas
replicas, 1 by default: the capacity is divided by it), or sim:CONFIG.yaml, run with `loadtest
simulate` on --replicas replicas. Everything after `--` goes to every run unchanged: the workload
(single-turn: the arrivals are this command's) and its flags, --seed, --model, --api-key,
--timeout-s. Each probe's report is in OUT/rate-<R>/ (its console output in OUT/rate-<R>/run.log),
the search in OUT/capacity.json. Exit 0 when a rate was sustained, 1 when even --low was not, 2
for bad arguments or a probe that wrote no report (an unreachable target).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cluster.cli import EXIT_INTERRUPTED
from loadtest.argtypes import finite_positive_float, positive_int
from loadtest.compare import SIM_PREFIX, target_command
from loadtest.metrics import completed, window_ttft_p95
from loadtest.spec import RequestRecord
from loadtest.workloads import TRACE_PREFIX, add_workload_arguments

# Flags this command sets on every probe; given after `--`, they would contradict it.
OWN_FLAGS = (
    "--base-url",
    "--config",
    "--replicas",
    "--out",
    "--rate",
    "--arrival",
    "--burstiness",
    "--stages",
    "--concurrency",
    "--num-requests",
    "--duration-s",
    "--slo-ttft-ms",
    "--stop-at-slo-miss",
    "--stop-at-slo-miss-until-s",
    "--seed",
)
# Workloads that are not one request per scheduled arrival: a multi-turn session's later turns
# follow its answers (and a trace:FILE workload brings its own arrival times).
MULTI_REQUEST_WORKLOADS = ("multi-turn",)


def narrow_rate(
    probe: Callable[[list[float]], Sequence[bool]],
    low: float,
    high: float,
    resolution: float,
    per_step: int = 1,
) -> tuple[float, float]:
    """Bisection for the highest sustained rate, given `low` sustained and `high` not: each step
    probes `per_step` rates evenly inside (low, high) at once and keeps the highest that passed
    as the new low and the lowest that failed as the new high, until they are within
    `resolution`. Returns (low, high)."""
    while high - low > resolution:
        rates = [low + (high - low) * i / (per_step + 1) for i in range(1, per_step + 1)]
        passed = probe(rates)
        low = max([low, *(r for r, ok in zip(rates, passed, strict=True) if ok)])
        high = min([high, *(r for r, ok in zip(rates, passed, strict=True) if not ok)])
    return low, high


def sustained(
    records: Sequence[RequestRecord], duration_s: float, window_s: float, slo_ttft_s: float
) -> bool:
    """Every window of [0, duration_s) in which requests started has its TTFT p95 within the
    SLO (a failed request counts as an infinite TTFT), and at least one request started."""
    p95s = window_ttft_p95(records, duration_s, window_s)
    return any(p is not None for p in p95s) and all(p is None or p <= slo_ttft_s for p in p95s)


@dataclass(frozen=True)
class Probe:
    rate: float  # requests started per second
    seed: int  # of its prompts and arrivals
    requests: int
    completed: int
    failed: int
    windows: int  # windows with requests
    windows_met: int  # of those, within the SLO
    worst_p95_ms: float | None  # the worst window's TTFT p95 (None: infinite, a failure)
    sustained: bool
    # The run stopped when the window of starts from here missed the SLO (`run
    # --stop-at-slo-miss`); the windows above count only the requests that ended by then.
    stopped_at_window_s: float | None = None

    def line(self, slo_ttft_ms: float) -> str:
        worst = "inf" if self.worst_p95_ms is None else f"{self.worst_p95_ms:.0f}"
        verdict = "sustained" if self.sustained else "not sustained"
        if self.stopped_at_window_s is not None:
            verdict += f" (stopped: the window from {self.stopped_at_window_s:g} s missed)"
        return (
            f"rate {self.rate:8.3f}/s: {self.windows_met}/{self.windows} windows with TTFT p95 "
            f"<= {slo_ttft_ms:g} ms (worst {worst} ms), {self.completed} completed, "
            f"{self.failed} failed: {verdict}"
        )


class ProbeError(Exception):
    """A probe wrote no report: the target is unreachable or the arguments are unusable."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "capacity",
        help="Find the highest arrival rate a target sustains within a TTFT SLO, for rate "
        "sizing's target_rate_per_replica.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", required=True, help="A base URL or sim:CONFIG.yaml.")
    parser.add_argument(
        "--replicas",
        type=positive_int,
        default=1,
        help="Replicas serving the target (a URL: how many it has; sim: how many to simulate). "
        "The capacity per replica is the rate found over this. Default 1.",
    )
    parser.add_argument(
        "--slo-ttft-ms",
        type=finite_positive_float,
        default=2000.0,
        help="TTFT p95 every window must meet (default 2000).",
    )
    parser.add_argument(
        "--window-s",
        type=finite_positive_float,
        default=10.0,
        help="Length of an SLO window of arrivals (default 10).",
    )
    parser.add_argument(
        "--hold-s",
        type=finite_positive_float,
        default=120.0,
        help="How long each rate is held (default 120): a rate a little over capacity passes a "
        "short hold while its queue builds.",
    )
    parser.add_argument(
        "--low",
        type=finite_positive_float,
        default=0.5,
        help="Lowest rate to try, req/s (default 0.5).",
    )
    parser.add_argument(
        "--high",
        type=finite_positive_float,
        default=64.0,
        help="A rate the target is known not to sustain, req/s: the search stays below it "
        "(default 64).",
    )
    parser.add_argument(
        "--resolution",
        type=finite_positive_float,
        default=0.25,
        help="Stop when the sustained and the failed rate are this close, req/s (default 0.25).",
    )
    parser.add_argument(
        "--utilization",
        type=finite_positive_float,
        default=0.93,
        help="Share of the capacity the suggested target_rate_per_replica runs a replica at "
        "(default 0.93).",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the first probe's prompts and arrivals; probe k uses seed + k (default 0).",
    )
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    parser.add_argument(
        "run_args",
        nargs=argparse.REMAINDER,
        help="After `--`: the workload and its flags, given to every run.",
    )
    parser.set_defaults(handler=handle)


def check_run_args(run_args: list[str]) -> list[str]:
    """The flags after `--` without the separator; ValueError for one this command sets or a
    workload it cannot schedule."""
    shared = [a for a in run_args if a != "--"]
    for word in shared:
        if word.split("=", 1)[0] in OWN_FLAGS:
            raise ValueError(f"{word.split('=', 1)[0]} is set by capacity on every probe")
    workloads = argparse.ArgumentParser(add_help=False)
    add_workload_arguments(workloads)
    workload = workloads.parse_known_args(shared)[0].workload
    if workload in MULTI_REQUEST_WORKLOADS or workload.startswith(TRACE_PREFIX):
        raise ValueError(
            f"workload {workload} is not one request per arrival: capacity schedules the "
            "arrivals itself (use random, shared-prefix or prefix-repetition)"
        )
    return shared


def run_probe(args: argparse.Namespace, shared: list[str], rate: float, seed: int) -> Probe:
    """Holds `rate` on the target for --hold-s through `loadtest run` or `loadtest simulate`,
    with the prompts and arrivals of `seed`."""
    from loadtest.cli import main as loadtest_main

    out = args.out / f"rate-{rate:g}"
    out.mkdir(parents=True, exist_ok=True)
    requests = max(1, math.ceil(rate * args.hold_s))
    argv = target_command(args.target)
    if args.target.startswith(SIM_PREFIX):
        argv += ["--replicas", str(args.replicas)]
    else:
        # A rate over capacity is known to fail at its first missed window: the rest of the
        # hold, and the queue it leaves, would take minutes more of real time. Only the
        # windows this verdict reads count (the one after the hold holds the last request).
        argv += ["--no-progress", "--stop-at-slo-miss", f"{args.window_s:g}"]
        argv += ["--stop-at-slo-miss-until-s", f"{args.hold_s:g}"]
    # Poisson arrivals rescaled so that the last one is at requests / rate: the hold.
    argv += ["--out", str(out), "--rate", repr(rate), "--num-requests", str(requests)]
    argv += ["--slo-ttft-ms", f"{args.slo_ttft_ms:g}", "--seed", str(seed), *shared]
    with (out / "run.log").open("w") as log, contextlib.redirect_stdout(log):
        code = loadtest_main(argv)
    if code == EXIT_INTERRUPTED:  # Ctrl-C: its partial run is no probe
        raise KeyboardInterrupt
    wrote = code in (0, 1) and (out / "summary.json").is_file()
    # Stopped at its first window, a probe far over capacity may have cut every request.
    stopped_at = (
        json.loads((out / "summary.json").read_text()).get("slo_missed_window_s") if wrote else None
    )
    lines = (out / "requests.jsonl").read_text().splitlines() if wrote else []
    if not lines and stopped_at is None:
        raise ProbeError(f"the run at {rate:g}/s wrote no requests (exit {code}): see {out}/")
    records = [RequestRecord(**json.loads(line)) for line in lines]
    p95s = [p for p in window_ttft_p95(records, args.hold_s, args.window_s) if p is not None]
    failed = sum(1 for r in records if not completed(r))
    slo_s = args.slo_ttft_ms / 1000.0
    worst = max(p95s, default=math.inf)
    return Probe(
        rate=rate,
        seed=seed,
        requests=len(records),
        completed=len(records) - failed,
        failed=failed,
        windows=len(p95s),
        windows_met=sum(1 for p in p95s if p <= slo_s),
        worst_p95_ms=None if math.isinf(worst) else worst * 1000.0,
        sustained=stopped_at is None and sustained(records, args.hold_s, args.window_s, slo_s),
        stopped_at_window_s=stopped_at,
    )


def handle(args: argparse.Namespace) -> int:
    try:
        shared = check_run_args(args.run_args)
        if not args.low < args.high:
            raise ValueError("--low must be below --high")
        if args.utilization > 1:
            raise ValueError("--utilization is a share of the capacity: at most 1")
    except ValueError as exc:
        print(f"loadtest capacity: error: {exc}", file=sys.stderr)
        return 2
    probes: list[Probe] = []

    def probe(rates: list[float]) -> list[bool]:
        for rate in rates:
            probes.append(run_probe(args, shared, rate, args.seed + len(probes)))
            print(probes[-1].line(args.slo_ttft_ms), flush=True)
        return [p.sustained for p in probes[-len(rates) :]]

    replicas = f"{args.replicas} replica{'s' if args.replicas > 1 else ''}"
    print(f"capacity of {args.target} ({replicas}), {args.hold_s:g} s per rate")
    # A result left by an earlier search in OUT would pass for this one's if this one fails.
    (args.out / "capacity.json").unlink(missing_ok=True)
    result: dict[str, Any] = {
        "target": args.target,
        "replicas": args.replicas,
        "slo_ttft_ms": args.slo_ttft_ms,
        "window_s": args.window_s,
        "hold_s": args.hold_s,
        "seed": args.seed,
        "workload_args": shared,
    }
    try:
        low_sustained = probe([args.low])[0]
        low, high = args.low, args.high
        if low_sustained:
            low, high = narrow_rate(probe, low, high, args.resolution)
    except ProbeError as exc:
        print(f"loadtest capacity: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        partial = {"probes": [asdict(p) for p in probes], "interrupted": True}
        _write(args.out, result | partial | {"capacity_per_s": None})
        done = ", ".join(f"{p.rate:g}/s" for p in probes) or "none"
        print(f"loadtest capacity: interrupted; probes done: {done} (in {args.out}/)")
        return EXIT_INTERRUPTED
    result["probes"] = [asdict(p) for p in probes]
    if not low_sustained:
        result["capacity_per_s"] = None
        _write(args.out, result)
        print(f"not even {args.low:g}/s was sustained: lower --low, or the SLO is out of reach")
        return 1
    # Below the --high the user gave and never failed: the capacity may be higher still.
    at_least = all(p.sustained for p in probes)
    per_replica = low / args.replicas
    suggested = per_replica * args.utilization
    result |= {
        "capacity_per_s": low,
        "capacity_at_least": at_least,
        "capacity_per_replica_per_s": per_replica,
        "utilization": args.utilization,
        "target_rate_per_replica": suggested,
    }
    _write(args.out, result)
    if at_least:
        print(
            f"capacity: at least {low:.4g} req/s ({per_replica:.4g} per replica): every rate "
            "tried was sustained; raise --high"
        )
    else:
        print(
            f"capacity: {low:.4g} req/s, {per_replica:.4g} per replica ({high:.4g} was not "
            "sustained)"
        )
    print(
        f"rate sizing at {args.utilization:g} of it: "
        f"models[].autoscaling.target_rate_per_replica: {suggested:.4g}"
    )
    return 0


def _write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(result, indent=2) + "\n")
