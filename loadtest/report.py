"""A run's outputs: summary.json, requests.jsonl, report.md and PNG plots, in one folder.

The JSON files are written first and plots are best effort: a plotting failure is reported in
report.md and never costs the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.metrics import PERCENTILES, completed, latencies
from loadtest.spec import RequestRecord

logger = logging.getLogger(__name__)

Series = dict[str, list[tuple[float, float]]]
_RECORD_FIELDS = dataclasses.fields(RequestRecord)

_SCALARS = (
    ("target", "target", "{}"),
    ("workload", "workload", "{}"),
    ("arrivals", "arrivals", "{}"),
    ("num_requests", "requests sent and ended", "{}"),
    (
        "not_sent",
        "requests not sent (after a failed turn, past --duration-s, Ctrl-C or an SLO miss)",
        "{}",
    ),
    ("cut_by_interrupt", "requests cut in flight by Ctrl-C (not counted below)", "{}"),
    ("slo_missed_window_s", "stopped: the SLO window starting at (s) missed", "{:g}"),
    ("cut_at_slo_miss", "requests cut in flight by that stop (not counted below)", "{}"),
    ("completed", "completed", "{}"),
    ("failed", "failed", "{}"),
    ("errors_by_status", "errors by status", "{}"),
    ("duration_s", "duration (s)", "{:.2f}"),
    ("request_throughput", "request throughput (req/s)", "{:.2f}"),
    ("output_throughput", "output token throughput (tok/s)", "{:.1f}"),
    ("total_token_throughput", "total token throughput (tok/s)", "{:.1f}"),
    ("prompt_tokens", "prompt tokens", "{}"),
    ("output_tokens", "output tokens", "{}"),
    ("cached_prompt_token_ratio", "cached share of prompt tokens", "{:.3f}"),
    ("goodput", "goodput (req/s)", "{:.2f}"),
    ("slo_ttft_ms", "SLO TTFT (ms)", "{:g}"),
    ("slo_tpot_ms", "SLO TPOT (ms)", "{:g}"),
    ("cache_hit_rate", "cache hit rate", "{:.3f}"),
    ("ideal_cache_hit_rate", "ideal cache hit rate", "{:.3f}"),
    ("load_imbalance", "load imbalance", "{:.3f}"),
)
_DISTRIBUTIONS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    return fmt.format(value)


def summary_table(summary: dict[str, Any]) -> str:
    """The summary as two Markdown tables (also readable on a console)."""
    rows = ["| metric | value |", "|---|---|"]
    rows += [
        f"| {label} | {_cell(summary[key], fmt)} |"
        for key, label, fmt in _SCALARS
        if key in summary
    ]
    stats = ["mean", *(f"p{p}" for p in PERCENTILES)]
    rows += ["", "| latency (ms) | " + " | ".join(stats) + " |", "|---" * (len(stats) + 1) + "|"]
    for key, label in _DISTRIBUTIONS:
        values = summary.get(key) or {}
        rows.append(f"| {label} | " + " | ".join(_cell(values.get(s), "{:.2f}") for s in stats))
        rows[-1] += " |"
    return "\n".join(rows)


def _finite(value: Any) -> Any:
    """JSON has no inf or NaN: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def add_output_arguments(parser: argparse.ArgumentParser, default_out: str) -> Any:
    """The output flags `run` and `simulate` share; returns the group for command-specific ones."""
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", type=Path, default=None, help=f"Output folder (default: {default_out})."
    )
    output.add_argument(
        "--slo-ttft-ms", type=float, default=None, help="TTFT objective of goodput (ms)."
    )
    output.add_argument(
        "--slo-tpot-ms", type=float, default=None, help="TPOT objective of goodput (ms)."
    )
    return output


def write_report(
    out_dir: Path,
    summary: dict[str, Any],
    records: list[RequestRecord],
    series: Series | None = None,
) -> None:
    """Writes summary.json, requests.jsonl (one `RequestRecord` per line, as `asdict` gives it),
    the plots, and report.md. `summary["command"]` is the command line (default: this process's);
    `series` are extra time series (name -> [(seconds, value)]), e.g. "replicas"."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"command": shlex.join(["loadtest", *sys.argv[1:]]), **summary}
    (out_dir / "summary.json").write_text(
        json.dumps(_finite(summary), indent=2, allow_nan=False) + "\n"
    )
    with (out_dir / "requests.jsonl").open("w") as lines:
        for record in records:
            # A shallow dict per record: dataclasses.asdict deep-copies every token-time list,
            # which dominated writing 10,000 records (about 10 s of 14 s).
            row = _finite({f.name: getattr(record, f.name) for f in _RECORD_FIELDS})
            lines.write(json.dumps(row, separators=(",", ":"), allow_nan=False) + "\n")
    try:
        plots = _plot(out_dir, records, series or {})
        plot_error = None
    except Exception as exc:  # matplotlib can fail in many ways; the numbers are already safe
        logger.warning("plots failed: %s", exc)
        plots, plot_error = [], f"{type(exc).__name__}: {exc}"
    (out_dir / "report.md").write_text(_markdown(summary, plots, plot_error))


def _markdown(summary: dict[str, Any], plots: list[str], plot_error: str | None) -> str:
    parts = [
        "# Load test report",
        "",
        f"Command: `{summary['command']}`",
        "",
        summary_table(summary),
        "",
        "Latencies follow vLLM `bench serve`: TTFT to the first token chunk, E2E to the last one, "
        "TPOT excludes the first token and one-token requests, ITL are the gaps between chunks.",
        "",
    ]
    if plot_error:
        parts += [f"Plots failed: `{plot_error}`", ""]
    parts += [f"![{name}]({name})\n" for name in plots]
    return "\n".join(parts)


def _plot(out_dir: Path, records: Sequence[RequestRecord], series: Series) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    done = [(r, lat) for r in records if (lat := latencies(r)) is not None]
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(name)

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    samples = {
        "TTFT": [lat.ttft_s for _, lat in done],
        "TPOT": [lat.tpot_s for _, lat in done if lat.tpot_s is not None],
        "ITL": [gap for _, lat in done for gap in lat.itl_s],
        "E2E": [lat.e2e_s for _, lat in done],
    }
    for ax, (label, values) in zip(axes.flat, samples.items(), strict=True):
        ordered = sorted(v * 1000.0 for v in values)
        if ordered:
            ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))])
        ax.set(title=f"{label} CDF", xlabel=f"{label} (ms)", ylabel="cumulative share")
        ax.grid(alpha=0.3)
    save(fig, "latency_cdf.png")

    fig, ax = plt.subplots(figsize=(10, 4))
    ax.scatter([r.start_s for r, _ in done], [lat.ttft_s * 1000.0 for _, lat in done], s=8)
    failures = [r.start_s for r in records if not completed(r)]
    if failures:
        ax.scatter(failures, [0.0] * len(failures), s=12, marker="x", c="red", label="failed")
        ax.legend()
    ax.set(title="TTFT over time", xlabel="request start (s)", ylabel="TTFT (ms)")
    ax.grid(alpha=0.3)
    save(fig, "ttft_over_time.png")

    # 1 s bins, as vLLM's max_output_tokens_per_s: a request's tokens spread over its chunks.
    horizon = max((r.end_s for r in records), default=0.0)
    bins = max(1, math.ceil(horizon))
    tokens = [0.0] * bins
    finished = [0] * bins
    for r, lat in done:
        for t in r.token_times_s:
            tokens[min(bins - 1, int(t))] += lat.output_tokens / len(r.token_times_s)
        finished[min(bins - 1, int(r.token_times_s[-1]))] += 1
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.stairs(tokens, range(bins + 1))
    top.set(title="Throughput over time (1 s bins)", ylabel="output tokens/s")
    bottom.stairs(finished, range(bins + 1))
    bottom.set(xlabel="time (s)", ylabel="completed requests/s")
    for ax in (top, bottom):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    save(fig, "throughput_over_time.png")

    for name, points in series.items():
        fig, ax = plt.subplots(figsize=(10, 4))
        if points:
            xs, ys = zip(*points, strict=True)
            ax.step(xs, ys, where="post")
        ax.set(title=f"{name} over time", xlabel="time (s)", ylabel=name)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        save(fig, f"{name}_over_time.png")
    return written
