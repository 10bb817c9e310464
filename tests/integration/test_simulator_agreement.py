"""The simulator against the real cluster on the same config and workload.

The real side is Ray Serve with the router and simulated engines running in real time; the
simulator runs the same engine model, policy (pow2, Ray's default) and workload in virtual time.
The serving path's own overhead is measured in the same run, on a zero-latency model behind the
same router with the same prompts, and given to the simulator (`--router-overhead-ms`).

The engine profile is slower than an H100 on purpose: on this 2-core machine the Python serving
path costs ~20 ms per request and jitters by several ms, so with an 8B/H100 profile (a cache hit's
prefill is ~10 ms) the comparison would measure the machine's noise, not the model's fidelity.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray import serve

from cluster import runtime
from deployments.config import AppConfig
from loadtest.cli import main as loadtest_main
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

SLOW_PROFILE: dict[str, Any] = {
    "name": "agreement-slow",
    "description": "An engine whose prefill dominates the serving path's overhead.",
    "block_size": 16,
    "num_kv_blocks": 4000,
    "max_num_seqs": 64,
    "max_num_batched_tokens": 4096,
    "decode_step_ms": [[1, 20.0], [64, 30.0]],
    "kv_read_ms_per_token": 0.0,
    "prefill_ms_per_token": 0.3,
    "cached_prefix_ms_per_token": 0.01,
}
WORKLOAD = [
    "--workload", "shared-prefix", "--num-groups", "6", "--prompts-per-group", "16",
    "--system-prompt-len", "1024", "--question-len", "128", "--output-len", "16",
    "--rate", "4",
]  # fmt: skip
# A second attempt's prompts are fresh: the first attempt's are in the engines' caches.
SEEDS = (5, 6)


def model(name: str, profile: dict[str, Any] | str, replicas: int, source: str) -> dict[str, Any]:
    return {
        "name": name,
        "engine": "simulated",
        "source": source,
        "device": "cpu",
        "max_model_len": 4096,
        "num_replicas": replicas,
        "cpus_per_worker": 0.1,
        "replica_cpus": 0.0,
        "simulated": {"profile": profile, "seed": 11},
        # Both sides route with pow2: this test is about the engine model and the serving path.
        "routing": {"policy": "pow2"},
    }


@pytest.fixture(scope="module")
def cluster(embedded_model: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    sim = model("sim", SLOW_PROFILE, 2, str(embedded_model))
    zero = model("zero", "zero-latency", 1, str(embedded_model))
    config = AppConfig.model_validate({"router": {"cpus": 0.1}, "models": [sim, zero]})
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    port = free_port()
    try:
        runtime.deploy(config, host="127.0.0.1", port=port, timeout_s=180)
        yield f"http://127.0.0.1:{port}", sim
    finally:
        serve.shutdown()
        ray.shutdown()


def prefix_cache_totals() -> tuple[int, int]:
    """(hits, queries) summed over the "sim" model's replicas, from the engines themselves."""
    replicas = [
        r.stats
        for d in runtime.cluster_status()
        if d.name.endswith("-sim")
        for r in d.replicas
        if r.stats is not None
    ]
    assert len(replicas) == 2
    return sum(s["prefix_cache_hits"] for s in replicas), sum(
        s["prefix_cache_queries"] for s in replicas
    )


def summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def test_simulator_agrees_with_the_real_cluster(
    cluster: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Timing on this shared machine is noisy: a burst of other load during one run sets a figure
    alone (CI once probed a 111 ms overhead where it is ~22 ms, and the simulator given it was
    53% slow). So a second attempt, with fresh prompts, runs when the first disagrees, and the
    simulator must agree with the real cluster in one of them."""
    url, sim_model = cluster
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(yaml.safe_dump({"models": [sim_model]}))
    attempts = []
    for seed in SEEDS:
        figures = measure(url, config_file, tmp_path / f"seed-{seed}", seed)
        print("agreement:", json.dumps(figures))
        attempts.append(figures)
        ttft_agrees = abs(figures["sim_ttft_p50"] - figures["real_ttft_p50"]) <= (
            0.15 * figures["real_ttft_p50"]
        )
        if ttft_agrees and abs(figures["sim_hit_rate"] - figures["real_hit_rate"]) <= 0.05:
            return
    pytest.fail(f"the simulator disagreed with the real cluster in every attempt: {attempts}")


def measure(url: str, config_file: Path, out: Path, seed: int) -> dict[str, float]:
    """TTFT p50 and cache hit rate of the real cluster and of the simulator on one workload."""
    workload = [*WORKLOAD, "--seed", str(seed)]
    probe, real, simulated = out / "probe", out / "real", out / "sim"

    def run(model_name: str, out: Path) -> None:
        argv = ["run", "--base-url", url, "--model", model_name, "--out", str(out), "--no-progress"]
        assert loadtest_main([*argv, *workload]) == 0

    # The serving path's overhead to the first token, measured now, on this machine.
    run("zero", probe)
    overhead_ms = summary(probe)["ttft_ms"]["p50"]

    hits_before, queries_before = prefix_cache_totals()
    run("sim", real)
    hits_after, queries_after = prefix_cache_totals()
    real_hit_rate = (hits_after - hits_before) / (queries_after - queries_before)

    overhead = ["--router-overhead-ms", f"{overhead_ms:.3f}"]
    simulate = ["simulate", "--config", str(config_file), "--model", "sim", "--policy", "pow2"]
    assert loadtest_main([*simulate, *overhead, "--out", str(simulated), *workload]) == 0
    real_summary, sim_summary = summary(real), summary(simulated)
    assert real_summary["failed"] == 0 and real_summary["completed"] == 96
    return {
        "overhead_ms": overhead_ms,
        "real_ttft_p50": real_summary["ttft_ms"]["p50"],
        "sim_ttft_p50": sim_summary["ttft_ms"]["p50"],
        "real_hit_rate": real_hit_rate,
        "sim_hit_rate": sim_summary["cache_hit_rate"],
    }
