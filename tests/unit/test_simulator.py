"""The cluster simulator: determinism, conservation, cache figures, concurrency, overhead, scaling,
and `loadtest simulate` end to end."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from collections import Counter
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import pytest

from deployments.engines.base import BlocksStored, EngineStats, KVCacheEvent
from deployments.engines.profiles import LLAMA_8B_H100, ZERO_LATENCY, PerformanceProfile
from deployments.routing.hashing import block_hashes
from deployments.routing.policy import ReplicaView, RoutingRequest, create_policy
from loadtest import simulate as simulate_command
from loadtest.arrivals import add_arrival_arguments, build_arrivals, schedule
from loadtest.simulate import DEFAULT_ROUTER_OVERHEAD_MS
from loadtest.simulator import (
    AutoscalingMetrics,
    FleetSpec,
    IdealPrefixCache,
    SimulationResult,
    resolve,
    simulate,
)
from loadtest.spec import RequestRecord, Session, Turn
from loadtest.workloads import add_workload_arguments, build_workload

VOCAB = 1000


def small_profile(**overrides: Any) -> PerformanceProfile:
    return LLAMA_8B_H100.model_copy(update={"vocab_size": VOCAB, **overrides})


def run_cli_workload(
    flags: Sequence[str],
    *,
    replicas: int = 2,
    policy: str = "pow2",
    overhead_s: float = 0.007,
    profile: PerformanceProfile | None = None,
) -> SimulationResult:
    """The workload and arrivals these flags describe, simulated as `loadtest simulate` does."""
    parser = argparse.ArgumentParser()
    add_workload_arguments(parser)
    add_arrival_arguments(parser)
    args = parser.parse_args(list(flags))
    plan = build_arrivals(args)
    sessions = build_workload(args, VOCAB, None)
    times = schedule(plan, sessions, random.Random(f"arrivals-{args.seed}"))
    fleet = FleetSpec(profile or small_profile(), replicas, router_overhead_s=overhead_s)
    return simulate(
        fleet,
        create_policy(policy, rng=random.Random(f"policy-{args.seed}")),
        sessions if times is None else sessions[: len(times)],
        times,
        max_concurrency=plan.max_concurrency,
    )


SHARED_PREFIX = [
    "--workload=shared-prefix",
    "--num-groups=4",
    "--prompts-per-group=8",
    "--system-prompt-len=512",
    "--question-len=32:96",
    "--output-len=16:48",
    "--rate=8",
]
MULTI_TURN = [
    "--workload=multi-turn",
    "--num-users=6",
    "--turns=3",
    "--turn-input-len=40:80",
    "--turn-output-len=10:30",
    "--think-time-s=0.5",
    "--rate=4",
]


def as_rows(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(record) for record in records]


def max_overlap(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at once ([start, end) intervals; an end frees a slot first)."""
    edges = sorted([(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records])
    in_flight = peak = 0
    for _, delta in edges:
        in_flight += delta
        peak = max(peak, in_flight)
    return peak


@pytest.mark.parametrize("flags", [SHARED_PREFIX, MULTI_TURN], ids=["shared-prefix", "multi-turn"])
def test_deterministic_per_seed(flags: list[str]) -> None:
    first = run_cli_workload([*flags, "--seed=1"])
    again = run_cli_workload([*flags, "--seed=1"])
    other = run_cli_workload([*flags, "--seed=2"])
    assert as_rows(first.records) == as_rows(again.records)
    assert first.figures() == again.figures()
    assert as_rows(first.records) != as_rows(other.records)


def test_every_request_completes_with_exactly_max_tokens() -> None:
    sessions = [
        Session(
            f"s{i}",
            tuple(Turn(tuple(range(i, i + 30 + 7 * k)), max_tokens=5 + i + k) for k in range(3)),
            think_time_s=0.2,
        )
        for i in range(10)
    ]
    arrivals = [0.05 * i for i in range(10)]
    result = simulate(
        FleetSpec(small_profile(), 3, router_overhead_s=0.004),
        create_policy("round_robin", rng=random.Random(0)),
        sessions,
        arrivals,
    )
    assert len(result.records) == 30
    by_turn = {(r.session_id, r.turn): r for r in result.records}
    for session, arrival in zip(sessions, arrivals, strict=True):
        prompt_tokens = 0
        for k, turn in enumerate(session.turns):
            record = by_turn[(session.session_id, k)]
            assert record.ok and record.status == 200
            assert record.output_tokens == turn.max_tokens == len(record.token_times_s)
            assert record.token_times_s == sorted(record.token_times_s)
            assert record.scheduled_s <= record.start_s < record.token_times_s[0]
            assert record.end_s == record.token_times_s[-1]
            assert record.replica is not None
            # The history: previous prompt and answer, then the new turn's tokens.
            prompt_tokens += len(turn.prompt_token_ids)
            assert record.prompt_tokens == prompt_tokens
            prompt_tokens += turn.max_tokens
            if k == 0:
                assert record.start_s == arrival
            else:
                previous = by_turn[(session.session_id, k - 1)]
                assert record.start_s == pytest.approx(previous.end_s + session.think_time_s)
    assert [r.index for r in result.records] == list(range(30))
    assert result.records == sorted(result.records, key=lambda r: r.start_s)
    assert result.duration_s == max(r.end_s for r in result.records)


def test_shared_prefix_cache_hits_stay_under_the_ideal() -> None:
    result = run_cli_workload(SHARED_PREFIX, replicas=2)
    assert 0 < result.cache_hit_rate <= result.ideal_cache_hit_rate <= 1
    # The records carry the engines' hits: their cached tokens add up to the same rate.
    prompt = sum(r.prompt_tokens for r in result.records)
    assert sum(r.cached_tokens for r in result.records) / prompt == pytest.approx(
        result.cache_hit_rate
    )


def test_a_multi_turn_hit_rate_is_under_its_ideal_too() -> None:
    result = run_cli_workload(MULTI_TURN, replicas=3, policy="round_robin")
    assert 0 <= result.cache_hit_rate <= result.ideal_cache_hit_rate
    assert result.ideal_cache_hit_rate > 0.3  # each later turn repeats the whole history


def test_one_replica_reaches_the_ideal_when_nothing_is_evicted() -> None:
    # One replica holds every block (the cache is far larger than the workload), and requests
    # spaced far apart never share a prefill step: then the real rate is the ceiling.
    sessions = [
        Session(f"s{i}", (Turn(tuple(range(200)) + (1000 + i,) * 40, max_tokens=4),))
        for i in range(6)
    ]
    result = simulate(
        FleetSpec(small_profile(), 1),
        create_policy("pow2", rng=random.Random(0)),
        sessions,
        [float(i) for i in range(6)],
    )
    assert result.cache_hit_rate == pytest.approx(result.ideal_cache_hit_rate)
    assert result.cache_hit_rate > 0.5


def test_ideal_counts_the_first_occurrence_of_each_block_as_a_miss() -> None:
    ideal = IdealPrefixCache(block_size=4)
    a = list(range(12))  # 3 full blocks
    ideal.observe(block_hashes(a, 4), len(a))  # all new: 0 hits
    b = [*a, 50, 51, 52, 53, 54]  # a's 3 blocks + 1 new full block + 1 token
    ideal.observe(block_hashes(b, 4), len(b))  # 3 blocks hit
    ideal.observe(block_hashes(a, 4), len(a))  # the last token is recomputed: 2 blocks hit
    assert (ideal.queries, ideal.hits) == (12 + 17 + 12, 0 + 12 + 8)
    assert ideal.hit_rate == pytest.approx(20 / 41)


def test_load_imbalance_is_at_least_one() -> None:
    result = run_cli_workload(SHARED_PREFIX, replicas=4)
    assert result.load_imbalance >= 1
    busy = list(result.busy_s.values())
    assert len(busy) == 4 and min(busy) > 0
    assert result.load_imbalance == pytest.approx(max(busy) / (sum(busy) / len(busy)))


@pytest.mark.parametrize("concurrency", [1, 3])
def test_closed_loop_never_exceeds_the_concurrency(concurrency: int) -> None:
    flags = [f for f in MULTI_TURN if not f.startswith("--rate")]
    result = run_cli_workload([*flags, f"--concurrency={concurrency}"], replicas=2)
    assert all(r.ok for r in result.records)
    assert len(result.records) == 18
    # Users keep every slot busy (think times aside) but never open another one.
    assert max_overlap(result.records) == concurrency


def test_open_loop_with_a_concurrency_cap_queues_the_excess() -> None:
    flags = [f for f in SHARED_PREFIX if not f.startswith("--rate")]
    result = run_cli_workload([*flags, "--rate=1000", "--concurrency=4"], replicas=2)
    assert max_overlap(result.records) == 4
    waited = [r for r in result.records if r.start_s > r.scheduled_s]
    assert waited  # arrivals far faster than service: most wait for a slot
    assert all(r.start_s >= r.scheduled_s for r in result.records)


def test_router_overhead_delays_the_first_token_by_exactly_that_much() -> None:
    sessions = [Session("s", (Turn(tuple(range(300)), max_tokens=8),))]

    def first_token(overhead_s: float) -> RequestRecord:
        fleet = FleetSpec(small_profile(), 2, router_overhead_s=overhead_s)
        result = simulate(fleet, create_policy("pow2", rng=random.Random(0)), sessions, [0.5])
        return result.records[0]

    without, with_overhead = first_token(0.0), first_token(0.007)
    assert with_overhead.start_s == without.start_s == 0.5
    assert with_overhead.token_times_s[0] - without.token_times_s[0] == pytest.approx(0.007)
    assert with_overhead.token_times_s[-1] - without.token_times_s[-1] == pytest.approx(0.007)


def test_a_prompt_over_max_model_len_is_rejected_and_ends_its_session() -> None:
    sessions = [
        Session("long", (Turn(tuple(range(100)), 50), Turn(tuple(range(10)), 5))),
        Session("short", (Turn(tuple(range(20)), 5),)),
    ]
    fleet = FleetSpec(small_profile(), 1, max_model_len=128)
    result = simulate(fleet, create_policy("pow2", rng=random.Random(0)), sessions, [0.0, 0.0])
    statuses = {(r.session_id, r.turn): r.status for r in result.records}
    assert statuses == {("long", 0): 400, ("short", 0): 200}
    rejected = next(r for r in result.records if r.session_id == "long")
    assert rejected.error is not None and "max_model_len" in rejected.error


def test_requests_the_engine_refuses_behind_a_full_replica_all_end() -> None:
    """Prompts needing more KV blocks than the cache has wait at the router, then the engine
    refuses each: hundreds of them end as 400s (each refusal drained the router queue from
    inside the drain before, and 400 of them overflowed the stack)."""
    fits = Session("fits", (Turn(tuple(range(1, 101)), 50),))
    too_big = [Session(f"big{i}", (Turn(tuple(range(1, 2001)), 10),)) for i in range(400)]
    profile = small_profile(num_kv_blocks=64)  # 1024 tokens of KV
    fleet = FleetSpec(profile, 1, max_ongoing_requests=1)  # no max_model_len: the engine decides
    times = [0.0] + [0.001] * len(too_big)
    result = simulate(fleet, create_policy("pow2", rng=random.Random(0)), [fits, *too_big], times)
    statuses = Counter((r.session_id == "fits", r.status) for r in result.records)
    assert statuses == {(True, 200): 1, (False, 400): 400}


@pytest.mark.timeout(30)
def test_free_prefill_chunks_keep_the_replica_stepping() -> None:
    """A zero-cost profile's prefill chunk takes no time and emits nothing, yet the prompt is
    not done: the replica keeps stepping (it stopped, and the simulation never ended)."""
    profile = ZERO_LATENCY.model_copy(update={"max_num_batched_tokens": 16, "vocab_size": VOCAB})
    session = Session("s", (Turn(tuple(range(1, 65)), 4),))  # 4 chunks of 16 tokens
    result = simulate(
        FleetSpec(profile, 1), create_policy("pow2", rng=random.Random(0)), [session], [0.0]
    )
    assert [(r.status, r.output_tokens) for r in result.records] == [(200, 4)]


class Recorder:
    """A policy wrapper that records what the simulator told it."""

    def __init__(self, name: str) -> None:
        self.inner = create_policy(name, rng=random.Random(0))
        self.requests: list[RoutingRequest] = []
        self.ranked: list[set[str]] = []
        self.routed: list[str] = []
        self.first_outputs: list[str] = []
        self.finished: list[str] = []
        self.removed: list[str] = []
        self.stats_from: set[str] = set()
        self.kv_events: list[tuple[str, KVCacheEvent]] = []
        self.in_flight: Counter[str] = Counter()
        self.peak_in_flight = 0

    async def rank(
        self, request: RoutingRequest, replicas: Sequence[ReplicaView]
    ) -> list[list[str]]:
        self.requests.append(request)
        self.ranked.append({view.replica_id for view in replicas})
        for view in replicas:
            assert view.in_flight == self.in_flight[view.replica_id]
        return await self.inner.rank(request, replicas)

    def cached_blocks(self, request: RoutingRequest) -> dict[str, int] | None:
        return self.inner.cached_blocks(request)

    def on_routed(self, request: RoutingRequest, replica_id: str) -> None:
        self.routed.append(request.request_id)
        self.in_flight[replica_id] += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight[replica_id])

    def on_first_output(self, request_id: str, replica_id: str) -> None:
        self.first_outputs.append(request_id)
        self.inner.on_first_output(request_id, replica_id)

    def on_finished(self, request_id: str, replica_id: str) -> None:
        self.finished.append(request_id)
        self.in_flight[replica_id] -= 1

    def on_replica_stats(self, replica_id: str, stats: EngineStats) -> None:
        self.stats_from.add(replica_id)

    def on_replica_removed(self, replica_id: str) -> None:
        self.removed.append(replica_id)

    def on_kv_events(self, replica_id: str, events: Sequence[KVCacheEvent]) -> None:
        self.kv_events.extend((replica_id, event) for event in events)

    def tracked_requests(self) -> int:
        return self.inner.tracked_requests()


def test_full_replicas_hold_requests_at_the_router() -> None:
    sessions = [Session(f"s{i}", (Turn(tuple(range(i, i + 40)), 20),)) for i in range(12)]
    policy = Recorder("round_robin")
    fleet = FleetSpec(small_profile(), 2, max_ongoing_requests=2)
    result = simulate(fleet, policy, sessions, [0.0] * 12)
    assert all(r.ok for r in result.records)
    assert policy.peak_in_flight == 2  # never a third request on a replica
    assert sorted(policy.routed) == sorted(policy.finished) and len(policy.routed) == 12
    # Each request's first token, once, told to the policy (CacheLoad ends its prefill cost).
    assert sorted(policy.first_outputs) == sorted(policy.routed)
    ttfts = sorted(r.token_times_s[0] - r.start_s for r in result.records)
    assert ttfts[-1] > 3 * ttfts[0]  # the last ones waited at the router for earlier ones


def test_autoscaling_hook_resizes_the_fleet_and_hooks_follow() -> None:
    sessions = [Session(f"s{i}", (Turn(tuple(range(64)), 40),)) for i in range(60)]
    seen: list[AutoscalingMetrics] = []

    def autoscaler(metrics: AutoscalingMetrics, state: Any, now: float) -> tuple[int, Any]:
        seen.append(metrics)
        calls = (state or 0) + 1
        return (4 if now < 2.0 else 1), calls

    policy = Recorder("round_robin")
    result = simulate(
        FleetSpec(small_profile(), 2, stats_period_s=0.5),
        policy,
        sessions,
        [0.05 * i for i in range(60)],
        autoscaler=autoscaler,
        autoscaling_interval_s=1.0,
    )
    assert all(r.ok and r.output_tokens == 40 for r in result.records)
    counts = [n for _, n in result.replicas_over_time]
    assert counts[:3] == [2, 4, 1]
    assert result.replicas_over_time[1][0] == 1.0
    assert len(result.busy_s) == 4  # the stopped replicas' busy time still counts
    assert sorted(policy.removed) == ["replica-1", "replica-2", "replica-3"]
    # After the scale-down only the survivor is offered, and everything routed finished.
    assert policy.ranked[-1] == {"replica-0"}
    assert sorted(policy.routed) == sorted(policy.finished) and len(policy.routed) == 60
    assert policy.stats_from == {"replica-0", "replica-1", "replica-2", "replica-3"}
    # The router hashes with the engines' block size: 64 tokens are 4 blocks of 16.
    assert list(policy.requests[0].block_hashes) == block_hashes(range(64), 16)
    assert policy.requests[0].num_prompt_tokens == 64
    assert seen[0].num_replicas == 2 and set(seen[0].replica_metrics["replica-0"]) == {
        "waiting",
        "running",
        "kv_cache_usage",
        "finished_per_s",
        "arrived_per_s",
    }
    # Completions and arrivals per second since the previous tick (1 s): until the scale-down at
    # 2 s, every request is on a reported replica, so the rates add up to the requests finished
    # by then and sent before (the one sent at 2.0 is routed after that tick).
    two_ticks = [m for tick in seen[:2] for m in tick.replica_metrics.values()]
    assert sum(m["finished_per_s"] for m in two_ticks) == sum(
        r.end_s <= 2.0 for r in result.records
    )
    assert sum(m["arrived_per_s"] for m in two_ticks) == sum(
        r.start_s < 2.0 for r in result.records
    )


def test_kv_events_reach_the_policy_each_stats_period() -> None:
    # The engine stores the prompt's blocks when it schedules them; the policy hears of them
    # from that replica, in the stats period's batch of events.
    prompt = tuple(range(64))  # 4 blocks of 16
    sessions = [Session(f"s{i}", (Turn(prompt, 4),)) for i in range(2)]
    policy = Recorder("cache_load")
    simulate(FleetSpec(small_profile(), 1, stats_period_s=1.0), policy, sessions, [0.2, 3.2])
    stored = [event for replica_id, event in policy.kv_events if isinstance(event, BlocksStored)]
    assert {replica_id for replica_id, _ in policy.kv_events} == {"replica-0"}
    assert [h for event in stored for h in event.block_hashes][:4] == block_hashes(prompt, 16)


def test_queue_imbalance_is_the_busiest_replicas_mean_in_flight_over_the_mean() -> None:
    # round_robin alternates: replica-0 gets requests 0, 2, 4 (long), replica-1 1, 3, 5 (short).
    sessions = [
        Session(f"s{i}", (Turn(tuple(range(i, i + 40)), 200 if i % 2 == 0 else 5),))
        for i in range(6)
    ]
    result = simulate(
        FleetSpec(small_profile(), 2),
        create_policy("round_robin", rng=random.Random(0)),
        sessions,
        [0.0] * 6,
    )
    busy, light = result.mean_in_flight["replica-0"], result.mean_in_flight["replica-1"]
    assert busy > 2 * light > 0
    assert result.queue_imbalance == pytest.approx(busy / ((busy + light) / 2))
    # Without router overhead a request is in flight at its replica from its start to its end.
    held = sum(r.end_s - r.start_s for r in result.records if r.replica == "replica-0")
    assert busy == pytest.approx(held / result.duration_s)
    assert result.figures()["queue_imbalance"] == result.queue_imbalance


def test_hot_share_gives_one_prefix_that_share_of_the_prompts() -> None:
    flags = [f for f in SHARED_PREFIX if not f.startswith("--rate")]
    result = run_cli_workload([*flags, "--hot-share=0.75", "--rate=50"], policy="cache_load")
    groups = Counter(r.session_id.split("-")[1] for r in result.records)
    assert groups == {"0": 24, "1": 3, "2": 3, "3": 2}  # 32 prompts: 24 hot, 8 over the rest
    assert all(r.ok for r in result.records)


def test_without_an_autoscaler_the_fleet_is_fixed() -> None:
    result = run_cli_workload(SHARED_PREFIX, replicas=3)
    assert [n for _, n in result.replicas_over_time] == [3, 3]
    assert result.replicas_over_time[-1][0] == result.duration_s


def test_resolve_refuses_a_coroutine_that_suspends() -> None:
    class Pending:
        """An awaitable that suspends, as a future does until an event loop resolves it."""

        def __await__(self) -> Generator[None, None, int]:
            yield
            return 1

    async def waits() -> int:
        return await Pending()

    async def returns() -> int:
        return 7

    assert resolve(returns()) == 7
    with pytest.raises(RuntimeError, match="suspended"):
        resolve(waits())


def test_simulate_command_writes_the_report(tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    # No tokenizer folder: prompts come from the profile's vocabulary (and no model is built).
    config.write_text(
        "models:\n"
        "  - name: vllm-one\n"
        "    engine: vllm\n"
        "    source: /nonexistent\n"
        "    max_model_len: 4096\n"
        "  - name: sim\n"
        "    engine: simulated\n"
        "    source: /nonexistent\n"
        "    device: cpu\n"
        "    max_model_len: 4096\n"
        "    num_replicas: 3\n"
    )
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    simulate_command.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "simulate",
            "--config",
            str(config),
            "--out",
            str(out),
            "--replicas",
            "2",
            *SHARED_PREFIX,
            "--policy=round_robin",
        ]
    )
    assert args.handler(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == summary["num_requests"] == 32
    assert 0 < summary["cache_hit_rate"] <= summary["ideal_cache_hit_rate"]
    assert summary["load_imbalance"] >= 1
    assert summary["replicas_over_time"][0] == [0.0, 2]
    assert summary["policy"] == "round_robin"
    assert summary["router_overhead_ms"] == DEFAULT_ROUTER_OVERHEAD_MS
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 32 and json.loads(lines[0])["replica"] in ("replica-0", "replica-1")
    assert (out / "report.md").exists()


def test_simulate_command_refuses_a_model_without_a_simulated_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(
        "models:\n  - name: real\n    engine: vllm\n    source: /x\n    max_model_len: 512\n"
    )
    parser = argparse.ArgumentParser()
    simulate_command.register(parser.add_subparsers())
    args = parser.parse_args(["simulate", "--config", str(config), "--out", str(tmp_path / "o")])
    assert args.handler(args) == 2
    assert "engine: simulated" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("policy", "predicts"), [("cache_load", True), ("prefix_affinity", True), ("pow2", False)]
)
def test_the_policys_cache_predictions_are_compared_with_the_engines(
    policy: str, predicts: bool
) -> None:
    result = run_cli_workload(SHARED_PREFIX, replicas=2, policy=policy)
    found = sum(r.cached_tokens for r in result.records)
    if predicts:
        assert result.cached_tokens_found == found > 0
        assert result.cached_tokens_predicted > 0
    else:  # no view of the caches: nothing predicted, nothing compared
        assert (result.cached_tokens_predicted, result.cached_tokens_found) == (0, 0)


def test_replicas_added_by_the_autoscaler_start_after_the_delay_and_can_be_cancelled() -> None:
    sessions = [Session(f"s{i}", (Turn(tuple(range(i, i + 64)), 40),)) for i in range(40)]

    def autoscaler(metrics: AutoscalingMetrics, state: Any, now: float) -> tuple[int, Any]:
        # Ask for 3 at 1 s, then for 2 at 3 s (one of the starting ones is cancelled).
        return (3 if now < 3.0 else 2), None

    policy = Recorder("round_robin")
    result = simulate(
        FleetSpec(small_profile(), 1),
        policy,
        sessions,
        [0.2 * i for i in range(40)],
        autoscaler=autoscaler,
        autoscaling_interval_s=1.0,
        replica_start_s=5.0,
    )
    assert all(r.ok for r in result.records)
    assert result.allocated_over_time[:3] == [(0.0, 1), (1.0, 3), (3.0, 2)]
    assert result.replicas_over_time[:2] == [(0.0, 1), (6.0, 2)]  # routable 5 s after asked
    assert len(result.busy_s) == 2  # the cancelled replica never ran
    assert {r.replica for r in result.records if r.start_s < 6.0} == {"replica-0"}


def test_a_replica_removed_while_busy_is_paid_for_until_its_requests_end() -> None:
    """Like Serve's graceful shutdown: a removed replica takes no new requests but finishes its
    own, holding its GPU (and counting as allocated) until the last one ends."""
    sessions = [Session(f"s{i}", (Turn(tuple(range(i, i + 64)), 200),)) for i in range(4)]

    def autoscaler(metrics: AutoscalingMetrics, state: Any, now: float) -> tuple[int, Any]:
        return 1, None

    result = simulate(
        FleetSpec(small_profile(), 2),
        Recorder("round_robin"),
        sessions,
        [0.0] * 4,
        autoscaler=autoscaler,
        autoscaling_interval_s=1.0,
    )
    assert all(r.ok for r in result.records)
    removed_ends = [r.end_s for r in result.records if r.replica == "replica-1"]
    assert len(removed_ends) == 2 and min(removed_ends) > 1.0  # still busy when removed at 1 s
    assert result.allocated_over_time[:2] == [(0.0, 2), (max(removed_ends), 1)]
