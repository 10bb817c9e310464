"""Decision cost of the routing policy: `python -m loadtest.bench_routing`.

What one routing decision costs the router process, measured where it runs: the policy's `rank`
(the decision: the request waits for it) and, after it, `on_routed` (index update and load
accounting: Serve calls it once the replica has accepted the request, so it delays only the
decisions queued behind it on the event loop), with the prefix index already holding
`--indexed-blocks` entries, `--replicas` candidates and prompts of `--prompt-tokens` tokens. The
prompt's block hashes are computed before the clock starts (the router hashes once per request,
whatever the policy); their cost is printed separately.

Scenarios, timed separately (p50 / p99 / max in microseconds). CPU time (the thread's) is the
cost; wall time also counts whatever else the machine made this process wait for.
  mixed     a request of one of --prefixes shared prefixes (3/4 of the prompt) plus its own
            question; each prefix held by a few replicas, so matches shrink the candidates
  hot       every replica holds the whole prompt: the longest walk, with every replica
            surviving it
  cold      nothing matches: the walk stops at the first block
Between decisions, requests finish and replicas report stats and KV events, untimed, so the
index and the load accounting stay at their steady-state sizes.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time
from collections.abc import Callable

from deployments.engines.base import BlocksStored, EngineStats
from deployments.routing.hashing import block_hashes
from deployments.routing.policies import CacheLoad, CacheLoadParams
from deployments.routing.policy import ReplicaView, RoutingRequest
from loadtest.metrics import nearest_rank
from loadtest.simulator import resolve

BLOCK_SIZE = 16


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = random.Random(args.seed)
        self.num_blocks = args.prompt_tokens // BLOCK_SIZE
        self.replicas = [f"replica-{i}" for i in range(args.replicas)]
        self.policy = CacheLoad(
            CacheLoadParams(max_index_blocks=args.indexed_blocks), rng=random.Random(args.seed)
        )
        shared = self.num_blocks * 3 // 4
        self.prefixes = [self._chain(shared) for _ in range(args.prefixes)]
        # Each prefix lives on a few replicas, as cache_load's spilling leaves it.
        self.holders = {
            i: self.rng.sample(self.replicas, self.rng.randint(1, 4)) for i in range(args.prefixes)
        }
        self.hot = self._chain(self.num_blocks)
        self.count = 0
        self.in_flight = {replica_id: 0 for replica_id in self.replicas}
        self.running: list[tuple[str, str]] = []

    def _chain(self, n: int) -> list[int]:
        return [self.rng.getrandbits(64) for _ in range(n)]

    def request(self, hashes: list[int]) -> RoutingRequest:
        self.count += 1
        return RoutingRequest(
            request_id=f"req-{self.count}",
            block_hashes=hashes,
            num_prompt_tokens=len(hashes) * BLOCK_SIZE,
            block_size=BLOCK_SIZE,
        )

    def mixed(self) -> tuple[RoutingRequest, str | None]:
        group = self.rng.randrange(len(self.prefixes))
        question = self._chain(self.num_blocks - len(self.prefixes[group]))
        return self.request(self.prefixes[group] + question), self.rng.choice(self.holders[group])

    def fill(self, target: int) -> None:
        """Route (untimed) until the index holds `target` entries, as engines confirm them."""
        index = self.policy.index
        while index.stored < target:
            req, holder = self.mixed()
            self.policy.on_kv_events(holder, [BlocksStored(block_hashes=tuple(req.block_hashes))])
        for replica_id in self.replicas:
            self.policy.on_kv_events(replica_id, [BlocksStored(block_hashes=tuple(self.hot))])

    def views(self) -> list[ReplicaView]:
        return [ReplicaView(r, in_flight=self.in_flight[r]) for r in self.replicas]

    def decide(self, req: RoutingRequest, views: list[ReplicaView]) -> tuple[int, int, int]:
        """One timed decision: rank, then route to the caller's pick; CPU nanoseconds of the
        rank and of rank + on_routed, and wall nanoseconds of both."""
        policy = self.policy
        cpu_started = time.thread_time_ns()
        started = time.perf_counter_ns()
        groups = resolve(policy.rank(req, views))
        ranked = time.thread_time_ns()
        chosen = groups[0][0]
        policy.on_routed(req, chosen)
        elapsed = time.perf_counter_ns() - started
        cpu = time.thread_time_ns()
        self.in_flight[chosen] += 1
        self.running.append((req.request_id, chosen))
        return ranked - cpu_started, cpu - cpu_started, elapsed

    def settle(self) -> None:
        """Untimed: the oldest requests finish and every replica reports (nothing waiting)."""
        while len(self.running) > 4 * len(self.replicas):
            request_id, replica_id = self.running.pop(0)
            self.in_flight[replica_id] -= 1
            self.policy.on_finished(request_id, replica_id)
        for replica_id in self.replicas:
            stats = EngineStats(
                num_waiting=0,
                num_running=self.in_flight[replica_id],
                kv_cache_usage=0.5,
                block_size=BLOCK_SIZE,
                num_total_blocks=27_000,
            )
            self.policy.on_replica_stats(replica_id, stats)


def _run(
    bench: _Bench, make: Callable[[], RoutingRequest], decisions: int
) -> tuple[list[float], list[float], list[float]]:
    """CPU times of the ranks and of rank + on_routed, and wall times of both, in microseconds."""
    rank_us: list[float] = []
    cpu_us: list[float] = []
    wall_us: list[float] = []
    for i in range(decisions):
        req = make()
        views = bench.views()
        rank, cpu, wall = bench.decide(req, views)
        rank_us.append(rank / 1000)
        cpu_us.append(cpu / 1000)
        wall_us.append(wall / 1000)
        if i % 64 == 63:
            bench.settle()
    return rank_us, cpu_us, wall_us


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_routing", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--replicas", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--indexed-blocks", type=int, default=1_000_000)
    parser.add_argument("--prefixes", type=int, default=2000)
    parser.add_argument("--decisions", type=int, default=5000, help="Per scenario.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tokens = [random.Random(args.seed).randrange(128_256) for _ in range(args.prompt_tokens)]
    started = time.perf_counter()
    for _ in range(100):
        block_hashes(tokens, BLOCK_SIZE)
    hash_us = (time.perf_counter() - started) / 100 * 1e6

    bench = _Bench(args)
    rss_before = _rss_bytes()
    started = time.perf_counter()
    bench.fill(args.indexed_blocks)
    fill_s = time.perf_counter() - started
    index = bench.policy.index
    gc.collect()
    rss_growth = _rss_bytes() - rss_before

    print(
        f"{args.replicas} replicas, {args.prompt_tokens}-token prompts ({bench.num_blocks} "
        f"blocks of {BLOCK_SIZE}), index cap {args.indexed_blocks:,} entries"
    )
    print(
        f"index: {index.stored:,} entries after fill ({fill_s:.1f} s), {index.evictions:,} "
        f"evictions; memory_bytes() {index.memory_bytes() / 2**20:.0f} MiB "
        f"({index.memory_bytes() / max(index.stored, 1):.0f} B/entry), process RSS growth "
        f"{rss_growth / 2**20:.0f} MiB"
    )
    print(f"hashing one prompt (not in the decision): {hash_us:.0f} us")
    print(
        "\n| scenario | decisions | rank CPU p50 (us) | rank CPU p99 (us) | rank + on_routed CPU "
        "p50 (us) | p99 (us) | max (us) | wall p50 (us) | wall p99 (us) |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    scenarios: dict[str, Callable[[], RoutingRequest]] = {
        "mixed": lambda: bench.mixed()[0],
        "hot": lambda: bench.request(bench.hot),
        "cold": lambda: bench.request(bench._chain(bench.num_blocks)),
    }
    for name, make in scenarios.items():
        rank, cpu, wall = _run(bench, make, args.decisions)
        print(
            f"| {name} | {len(cpu)} | {nearest_rank(rank, 50):.1f} | {nearest_rank(rank, 99):.1f} "
            f"| {nearest_rank(cpu, 50):.1f} | {nearest_rank(cpu, 99):.1f} | {max(cpu):.1f} | "
            f"{nearest_rank(wall, 50):.1f} | {nearest_rank(wall, 99):.1f} |"
        )
    print(
        f"\nindex after the runs: {index.stored:,} entries (cap {args.indexed_blocks:,}), "
        f"{index.memory_bytes() / 2**20:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
