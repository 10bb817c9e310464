"""The KV event path on real Ray Serve: `python -m loadtest.bench_event_path`.

Starts a local Ray (with its metrics endpoint on --metrics-port), deploys --config (default: 8
simulated 8B/H100 replicas, cache_load), loads it with `loadtest run` (shared-prefix, Poisson),
waits for Ray to export the metrics, and prints what the routers and replicas recorded:
- `router_kv_event_staleness_ms`: per update a router applied, the age of its oldest new event
  (from leaving the engine to being in the router's index): the event path's staleness;
- `router_decision_ms`: the routing decision inside Serve;
- `routing_predicted_cached_tokens` / `routing_actual_cached_tokens`: what the router predicted
  each replica had cached for the requests it sent there, and what the engines found.
Histograms are read from Ray's Prometheus endpoint, so percentiles are bucket bounds ("<= X").
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from cluster import runtime
from cluster.config import load_config

DEFAULT_CONFIG = Path(__file__).parents[1] / "cluster" / "configs" / "simulated.yaml"
# Ray exports metrics every few seconds (metrics_report_interval_ms); wait for two rounds.
_EXPORT_WAIT_S = 25

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of Ray's metrics endpoint: name -> [(labels, value)]."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        samples.setdefault(match["name"], []).append((labels, float(match["value"])))
    return samples


def histogram(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> str:
    """count, mean and bucket-bound p50/p90/p99 of a histogram summed over its series."""
    counts: dict[float, float] = {}
    for labels, value in samples.get(f"ray_{name}_bucket", []):
        bound = float(labels["le"])
        counts[bound] = counts.get(bound, 0.0) + value
    total = sum(value for _, value in samples.get(f"ray_{name}_count", []))
    if not total:
        return f"{name}: no samples"
    mean = sum(value for _, value in samples.get(f"ray_{name}_sum", [])) / total
    quantiles = []
    for q in (0.5, 0.9, 0.99):
        bound = next(b for b in sorted(counts) if counts[b] >= q * total)
        quantiles.append(f"p{round(q * 100)} <= {bound:g}")
    return f"{name}: {total:.0f} samples, mean {mean:.1f}, " + ", ".join(quantiles)


def counter(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    # Exported with or without the _total suffix, depending on Ray's exporter.
    series = samples.get(f"ray_{name}_total") or samples.get(f"ray_{name}", [])
    return sum(value for _, value in series)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_event_path", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8089)
    parser.add_argument(
        "--router-replicas", type=int, default=2, help="Router replicas: each has its own view."
    )
    parser.add_argument("--rate", type=float, default=8.0)
    parser.add_argument("--num-groups", type=int, default=16)
    parser.add_argument("--prompts-per-group", type=int, default=16)
    args = parser.parse_args(argv)

    config = load_config(args.config)
    config = config.model_copy(
        update={"router": config.router.model_copy(update={"num_replicas": args.router_replicas})}
    )
    ray.init(
        address="local",
        num_cpus=config.ray.num_cpus or 8,
        include_dashboard=False,
        logging_level="ERROR",
        _metrics_export_port=args.metrics_port,
    )
    try:
        runtime.deploy(config.app_config(), host="127.0.0.1", port=args.port, timeout_s=300)
        with tempfile.TemporaryDirectory() as out:
            command = [
                *(sys.executable, "-m", "loadtest", "run"),
                *("--base-url", f"http://127.0.0.1:{args.port}", "--out", out, "--no-progress"),
                *("--workload", "shared-prefix", "--num-groups", str(args.num_groups)),
                *("--prompts-per-group", str(args.prompts_per_group), "--output-len", "32"),
                *("--rate", str(args.rate), "--seed", "1"),
            ]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        time.sleep(_EXPORT_WAIT_S)
        samples = scrape(args.metrics_port)
    finally:
        serve.shutdown()
        ray.shutdown()

    print(
        f"{args.config.name}, {args.router_replicas} router replicas: shared-prefix "
        f"{args.num_groups} x {args.prompts_per_group}, {args.rate:g} req/s"
    )
    print(histogram(samples, "router_kv_event_staleness_ms") + " (ms)")
    print(histogram(samples, "router_decision_ms") + " (ms)")
    predicted = counter(samples, "routing_predicted_cached_tokens")
    actual = counter(samples, "routing_actual_cached_tokens")
    print(
        f"cached tokens: predicted {predicted:.0f}, found by the engines {actual:.0f}"
        + (f" (found / predicted {actual / predicted:.3f})" if predicted else "")
    )
    print(histogram(samples, "routing_prediction_ratio"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
