"""The routing policies side by side in the simulator: `python -m loadtest.bench_policies`.

Each run is exactly `loadtest simulate` (the same argument parser and code path, without the
report files); the table prints the command of every row. Per workload and fleet size:
1. saturation: every policy with all sessions arriving at once (the fleet's best throughput);
   round_robin's sessions per second there is its saturation rate;
2. Poisson arrivals at each --loads fraction of that rate, every policy.

Workloads (KV cache per replica sized to hold about a quarter of the workload's distinct prefix
blocks, so a router that spreads a prefix over every replica cannot keep it cached):
  shared-prefix  64 groups x 16 prompts, 2048-token system prompt + 128-token question, 256 out;
                 distinct prompt blocks 64 x (2048 + 128) / 16 = 8704: 2176 per replica
  hot-prefix     the same with --hot-share 0.8 (group 0 carries 80% of the prompts): 2176
  multi-turn     128 users x 5 turns of 128 tokens in and 128 out, think time 1 s; each history
                 reaches 5 x 256 tokens = 80 blocks, 10240 in all: 2560 per replica
  random         1000 prompts of 1024 random tokens, 128 out (nothing shared); 64 blocks each,
                 64000 in all: 16000 per replica
"""

from __future__ import annotations

import argparse
import math
import shlex
from pathlib import Path
from typing import Any

from loadtest import simulate

POLICY_ORDER = ("round_robin", "pow2", "prefix_affinity", "cache_load")
CONFIG = Path(__file__).parents[1] / "cluster" / "configs" / "simulated.yaml"

# name -> (workload flags, KV blocks per replica)
WORKLOADS: dict[str, tuple[list[str], int]] = {
    "shared-prefix": (["--workload=shared-prefix"], 2176),
    "hot-prefix": (["--workload=shared-prefix", "--hot-share=0.8"], 2176),
    "multi-turn": (["--workload=multi-turn", "--num-users=128"], 2560),
    "random": (["--workload=random"], 16000),
}


def _parse(flags: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loadtest")
    simulate.register(parser.add_subparsers())
    return parser.parse_args(["simulate", *flags])


def _run(flags: list[str]) -> dict[str, Any]:
    summary, _ = simulate.run_simulation(_parse(flags))
    return summary


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (format(value, spec))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_policies", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--replicas", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--loads", nargs="+", type=float, default=[0.7, 0.95])
    parser.add_argument("--policies", nargs="+", choices=POLICY_ORDER, default=list(POLICY_ORDER))
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args(argv)

    print(
        "| workload | replicas | arrivals | policy | output tok/s | TTFT p50 | TTFT p90 | "
        "TTFT p99 (ms) | hit rate | ideal | hit/ideal | load imb. | queue imb. | "
        "cached found/predicted |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    commands: list[str] = []
    for workload in args.workloads:
        flags, kv_blocks = WORKLOADS[workload]
        for replicas in args.replicas:
            base = [
                f"--config={args.config}",
                f"--replicas={replicas}",
                f"--num-kv-blocks={kv_blocks}",
                *flags,
            ]
            saturation: dict[str, dict[str, Any]] = {}
            runs: list[tuple[str, list[str]]] = [("at once", [])]
            for name in ("round_robin", *(p for p in args.policies if p != "round_robin")):
                saturation[name] = _run([*base, f"--policy={name}"])
            rr = saturation["round_robin"]
            sessions = int(rr["workload"].split(": ")[1].split(" sessions")[0])
            rate = sessions / rr["duration_s"]
            runs += [
                (f"{load:.0%} ({load * rate:.1f}/s)", [f"--rate={load * rate:.3f}"])
                for load in args.loads
            ]
            for label, extra in runs:
                for name in args.policies:
                    cmd = [*base, *extra, f"--policy={name}"]
                    summary = saturation[name] if not extra else _run(cmd)
                    commands.append("loadtest simulate " + shlex.join(cmd))
                    ttft = summary["ttft_ms"]
                    hit, ideal = summary["cache_hit_rate"], summary["ideal_cache_hit_rate"]
                    predicted = summary["cached_tokens_predicted"]
                    found = summary["cached_tokens_found"] / predicted if predicted else None
                    print(
                        f"| {workload} | {replicas} | {label} | {name} | "
                        f"{_fmt(summary['output_throughput'])} | {_fmt(ttft['p50'])} | "
                        f"{_fmt(ttft['p90'])} | {_fmt(ttft['p99'])} | {hit:.3f} | {ideal:.3f} | "
                        f"{_fmt(hit / ideal if ideal else None, '.2f')} | "
                        f"{summary['load_imbalance']:.2f} | {summary['queue_imbalance']:.2f} | "
                        f"{_fmt(found, '.3f')} |",
                        flush=True,
                    )
    print("\nCommands, in table order:")
    for command in commands:
        print(command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
