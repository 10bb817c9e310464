"""`loadtest compare`: one workload against several targets in one run, side by side.

    loadtest compare --target http://127.0.0.1:8000 --target http://127.0.0.1:8100 \\
        --label ours --label ray-serve-llm --out OUT -- --workload shared-prefix --rate 4 ...

Each target is an OpenAI-compatible base URL (measured with `loadtest run`) or `sim:CONFIG.yaml`
(run with `loadtest simulate`); everything after `--` is passed to each run unchanged, so every
target sees the same workload, seed and arrivals. Results go to OUT/<label>/ and OUT/compare.md:
a table of each figure and its ratio to the first target.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from cluster.cli import EXIT_INTERRUPTED

SIM_PREFIX = "sim:"

# (summary key, sub-key or None, label): the figures a comparison reads first.
FIGURES: tuple[tuple[str, str | None, str], ...] = (
    ("completed", None, "completed"),
    ("failed", None, "failed"),
    ("ttft_ms", "p50", "TTFT p50 (ms)"),
    ("ttft_ms", "p90", "TTFT p90 (ms)"),
    ("ttft_ms", "p99", "TTFT p99 (ms)"),
    ("tpot_ms", "p50", "TPOT p50 (ms)"),
    ("itl_ms", "p50", "ITL p50 (ms)"),
    ("e2e_ms", "p50", "E2E p50 (ms)"),
    ("e2e_ms", "p99", "E2E p99 (ms)"),
    ("request_throughput", None, "requests/s"),
    ("output_throughput", None, "output tokens/s"),
    ("goodput", None, "goodput (req/s)"),
    ("cached_prompt_token_ratio", None, "cached prompt share"),
    ("cache_hit_rate", None, "engine cache hit rate"),
    ("ideal_cache_hit_rate", None, "ideal cache hit rate"),
    ("load_imbalance", None, "load imbalance"),
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="Run one workload against several targets and tabulate the figures side by side.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target",
        action="append",
        required=True,
        help="A base URL or sim:CONFIG.yaml; repeat for each target. The first is the baseline.",
    )
    parser.add_argument(
        "--label", action="append", help="A name per target, in order (default: target-N)."
    )
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    parser.add_argument(
        "run_args",
        nargs=argparse.REMAINDER,
        help="After `--`: workload, arrival and SLO flags given to every run.",
    )
    parser.set_defaults(handler=_compare)


def _compare(args: argparse.Namespace) -> int:
    from loadtest.cli import main as loadtest_main

    labels = args.label or []
    if labels and len(labels) != len(args.target):
        raise SystemExit("compare: give one --label per --target, or none")
    labels = labels or [f"target-{i}" for i in range(len(args.target))]
    if len(set(labels)) != len(labels) or not all(re.fullmatch(r"[\w.-]+", x) for x in labels):
        raise SystemExit("compare: labels must be unique names of letters, digits, . _ -")
    shared = [a for a in args.run_args if a != "--"]
    summaries: list[dict[str, Any]] = []
    # An earlier comparison in OUT would pass for this one's if this one stops early.
    (args.out / "compare.md").unlink(missing_ok=True)
    for target, label in zip(args.target, labels, strict=True):
        out = args.out / label
        print(f"== {label}: {target}", flush=True)
        code = loadtest_main([*target_command(target), "--out", str(out), *shared])
        if code == EXIT_INTERRUPTED:  # a cut run compared with whole ones would mislead
            print(f"compare: interrupted during {label}; no comparison written")
            return EXIT_INTERRUPTED
        summary_file = out / "summary.json"
        if not summary_file.exists():
            print(f"compare: {label} produced no summary (exit {code})")
            return 1
        summaries.append(json.loads(summary_file.read_text()))
    table = render_table(labels, args.target, summaries)
    (args.out / "compare.md").write_text(table + "\n")
    print(table)
    return 0


def target_command(target: str) -> list[str]:
    """The loadtest subcommand and target flag that measure `target`: `simulate --config FILE`
    for sim:FILE, `run --base-url URL` for a URL."""
    if target.startswith(SIM_PREFIX):
        return ["simulate", "--config", target[len(SIM_PREFIX) :]]
    return ["run", "--base-url", target]


def _figure(summary: dict[str, Any], key: str, sub: str | None) -> float | None:
    value = summary.get(key)
    if sub is not None:
        value = value.get(sub) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) else None


def render_table(labels: list[str], targets: list[str], summaries: list[dict[str, Any]]) -> str:
    """Markdown: one row per figure, per target its value and its ratio to the first target."""
    header = "| figure | " + " | ".join(labels) + " |"
    lines = [header, "|---" * (len(labels) + 1) + "|"]
    lines.append("| target | " + " | ".join(f"`{t}`" for t in targets) + " |")
    for key, sub, name in FIGURES:
        values = [_figure(s, key, sub) for s in summaries]
        if all(v is None for v in values):
            continue
        base = values[0]
        cells = []
        for i, value in enumerate(values):
            if value is None:
                cells.append("n/a")
            elif i == 0 or not base:
                cells.append(f"{value:.4g}")
            else:
                cells.append(f"{value:.4g} ({value / base:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
