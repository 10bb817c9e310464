"""`loadtest simulate`: the cluster a config describes, simulated in virtual time.

    loadtest simulate --config cluster/configs/simulated.yaml --workload shared-prefix --rate 20

The same workloads and arrivals as `loadtest run` (same flags, same seed, same sessions and
arrival times), sent to N replicas of the simulated engine's performance model behind the routing
policy the router would use, with the router's measured per-request overhead added. Writes the same
files as `run` (summary.json, requests.jsonl, report.md, plots) plus the simulate-only figures:
cache_hit_rate, ideal_cache_hit_rate, load_imbalance, queue_imbalance, requests in flight per
replica and replicas over time. Exit 0 when at least one request completed, 1 when none did, 2 for
bad arguments or a config it cannot simulate.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from cluster.config import EMBEDDED, ConfigError, load_config
from cluster.embedded_model import ensure_embedded_model
from deployments.config import ModelConfig
from deployments.routing.policy import POLICIES, create_policy
from deployments.tokenizer import PromptTokenizer
from loadtest.argtypes import finite_positive_float, non_negative_float, positive_int
from loadtest.arrivals import add_arrival_arguments, build_arrivals, schedule
from loadtest.metrics import summarize
from loadtest.report import add_output_arguments, summary_table, write_report
from loadtest.simulator import FleetSpec, SimulationResult, simulate
from loadtest.workloads import add_workload_arguments, build_workload

DEFAULT_POLICY = "cache_load"
# The router's own cost per request: `router - handle` at p50 from `python -m loadtest.overhead` on
# the 2-core machine this project is developed on (HTTP through HAProxy, as `serve` runs it, and
# the Router deployment, minus the same request through a deployment handle: 2.7 and 3.1 ms on
# 2026-11-27; 7.8 and 8.6 through Serve's Python proxy instead).
DEFAULT_ROUTER_OVERHEAD_MS = 3.0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="Simulate the cluster a config describes, in virtual time, and report.",
        description=__doc__.split("\n\n")[0],
    )
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument(
        "--config", type=Path, required=True, help="A cluster config YAML (ClusterConfig)."
    )
    cluster.add_argument(
        "--model",
        default=None,
        help="The model to simulate (default: the config's first model with engine simulated).",
    )
    cluster.add_argument(
        "--replicas",
        type=positive_int,
        default=None,
        help="Replicas to simulate (default: the model's num_replicas).",
    )
    cluster.add_argument(
        "--policy",
        choices=sorted(POLICIES),
        default=DEFAULT_POLICY,
        help=f"Routing policy (default {DEFAULT_POLICY}).",
    )
    cluster.add_argument(
        "--router-overhead-ms",
        type=non_negative_float,
        default=DEFAULT_ROUTER_OVERHEAD_MS,
        help="Serving-path time per request, added before it reaches an engine (default "
        f"{DEFAULT_ROUTER_OVERHEAD_MS:g}: the router's own, `router - handle` p50 of `python -m "
        "loadtest.overhead` on a 2-core machine). Its `router - engine` p50 is the whole path "
        "(proxy, router and the Serve handle hop): use it to match a real cluster.",
    )
    cluster.add_argument(
        "--stats-period-s",
        type=finite_positive_float,
        default=1.0,
        help="How often replicas report engine stats and KV cache events to the router (default "
        "1): the staleness of the router's view of engine truth.",
    )
    cluster.add_argument(
        "--num-kv-blocks",
        type=positive_int,
        default=None,
        help="KV cache blocks per replica, overriding the profile's (e.g. to make the shared "
        "prefixes outgrow one replica's cache).",
    )
    add_output_arguments(parser, "loadtest-runs/sim-<date-time>")
    add_workload_arguments(parser)  # also --seed: prompts, arrivals and the policy's draws
    add_arrival_arguments(parser)
    parser.set_defaults(handler=handle)


def pick_model(models: list[ModelConfig], name: str | None) -> ModelConfig:
    """The model to simulate; ValueError when there is none with a simulated engine."""
    if name is not None:
        model = next((m for m in models if m.name == name), None)
        if model is None:
            raise ValueError(f"no model {name!r} in the config; models: {[m.name for m in models]}")
    else:
        model = next((m for m in models if m.engine == "simulated"), None)
        if model is None:
            raise ValueError("the config has no model with engine: simulated (or pass --model)")
    if model.simulated is None:
        raise ValueError(
            f"model {model.name!r} uses engine {model.engine}: only simulated engines have a "
            "performance profile to simulate"
        )
    return model


def _tokenizer(model: ModelConfig) -> PromptTokenizer | None:
    """The model's tokenizer, as its router would load it; None when its folder is absent (then
    prompts are drawn from the profile's vocabulary)."""
    source = model.tokenizer_source
    if source == EMBEDDED:
        source = str(ensure_embedded_model())
    return PromptTokenizer(source) if os.path.isdir(source) else None


def run_simulation(args: argparse.Namespace) -> tuple[dict[str, Any], SimulationResult]:
    """The summary (summary.json's contents) and the result of the simulation `args` describe;
    ConfigError, ValueError or OSError when the config or the workload is unusable."""
    model = pick_model(load_config(args.config).models, args.model)
    assert model.simulated is not None  # pick_model refuses other engines
    profile = model.simulated.resolved_profile()
    if args.num_kv_blocks is not None:
        profile = profile.model_copy(update={"num_kv_blocks": args.num_kv_blocks})
    plan = build_arrivals(args)
    tokenizer = _tokenizer(model)
    vocab_size = profile.vocab_size if tokenizer is None else tokenizer.vocab_size
    sessions = build_workload(args, vocab_size, tokenizer)
    # The same arrival times as `loadtest run` draws for this seed.
    times = schedule(plan, sessions, random.Random(f"arrivals-{args.seed}"))
    scheduled = sessions if times is None else sessions[: len(times)]
    replicas = args.replicas or model.num_replicas
    fleet = FleetSpec(
        profile=profile,
        num_replicas=replicas,
        engine_seed=model.simulated.seed,
        vocab_size=vocab_size,
        max_model_len=model.max_model_len,
        max_ongoing_requests=model.max_ongoing_requests,
        router_overhead_s=args.router_overhead_ms / 1000.0,
        stats_period_s=args.stats_period_s,
    )
    policy = create_policy(args.policy, rng=random.Random(f"policy-{args.seed}"))

    started = time.perf_counter()
    result = simulate(fleet, policy, scheduled, times, max_concurrency=plan.max_concurrency)
    wall_s = time.perf_counter() - started

    num_requests = sum(len(s.turns) for s in scheduled)
    summary = {
        "target": f"simulated: {replicas} x {profile.name} replicas ({profile.num_kv_blocks} KV "
        f"blocks each) of {model.name}, policy {args.policy}, router overhead "
        f"{args.router_overhead_ms:g} ms",
        "workload": f"{args.workload}: {len(scheduled)} sessions, {num_requests} requests, "
        f"seed {args.seed}",
        "arrivals": plan.describe(),
        **summarize(result.records, result.duration_s, args.slo_ttft_ms, args.slo_tpot_ms),
        **result.figures(),
        "policy": args.policy,
        "router_overhead_ms": args.router_overhead_ms,
        "wall_time_s": wall_s,
    }
    return summary, result


def handle(args: argparse.Namespace) -> int:
    try:
        summary, result = run_simulation(args)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"loadtest simulate: error: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path("loadtest-runs") / time.strftime("sim-%Y%m%d-%H%M%S")
    write_report(out, summary, result.records, {"replicas": result.replicas_over_time})
    print(summary_table(summary))
    print(
        f"\nqueue imbalance {result.queue_imbalance:.3f} (the busiest replica's mean requests in "
        "flight over the fleet mean)"
    )
    print(
        f"\nsimulated {result.duration_s:.1f} s of cluster time in "
        f"{summary['wall_time_s']:.1f} s of wall time"
    )
    print(f"wrote {out}/ (summary.json, requests.jsonl, report.md, plots)")
    return 0 if summary["completed"] else 1
