"""Routing policies: the registry, round_robin, pow2 (Ray Serve's default), prefix_affinity (Ray
Serve LLM's PrefixCacheAffinityRouter) and cache_load (ours), with fake replicas and seeded rngs."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from deployments.engines.base import BlocksRemoved, BlocksStored, EngineStats
from deployments.routing.hashing import block_hashes
from deployments.routing.policies import _ReplicaLoad
from deployments.routing.policy import (
    POLICIES,
    ReplicaView,
    RoutingPolicy,
    RoutingRequest,
    create_policy,
)
from loadtest.simulator import resolve

REQUEST = RoutingRequest(
    request_id="r", block_hashes=(1, 2, 3), num_prompt_tokens=50, block_size=16
)


def views(*in_flight: int) -> list[ReplicaView]:
    return [ReplicaView(f"r{i}", in_flight=n) for i, n in enumerate(in_flight)]


def rank(
    policy: RoutingPolicy, replicas: Sequence[ReplicaView], req: RoutingRequest = REQUEST
) -> list[list[str]]:
    return resolve(policy.rank(req, replicas))


def first(
    policy: RoutingPolicy, replicas: Sequence[ReplicaView], req: RoutingRequest = REQUEST
) -> str:
    """Where the caller sends the request: the first group's replica with the fewest in flight
    (none is full here)."""
    group = set(rank(policy, replicas, req)[0])
    return min((v for v in replicas if v.replica_id in group), key=lambda v: v.in_flight).replica_id


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_ranks_each_candidate_once(name: str) -> None:
    policy = create_policy(name, rng=random.Random(0))
    replicas = views(3, 0, 5, 1, 2)
    for _ in range(20):
        groups = rank(policy, replicas)
        ranked = [replica_id for group in groups for replica_id in group]
        assert sorted(ranked) == sorted(v.replica_id for v in replicas)
        assert all(groups)  # no empty group
    assert rank(policy, []) == []


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_departed_replicas_are_never_returned(name: str) -> None:
    policy = create_policy(name, rng=random.Random(1))
    fleet = views(0, 0, 0, 0)
    for view in fleet:
        policy.on_routed(REQUEST, view.replica_id)
    policy.on_replica_stats(
        "r2",
        EngineStats(
            num_waiting=0, num_running=1, kv_cache_usage=0.5, block_size=16, num_total_blocks=10
        ),
    )
    policy.on_replica_removed("r2")
    remaining = [v for v in fleet if v.replica_id != "r2"]
    for _ in range(50):
        ranked = {replica_id for group in rank(policy, remaining) for replica_id in group}
        assert ranked == {"r0", "r1", "r3"}


def test_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="pow2"):
        create_policy("nope", rng=random.Random(0))


def test_round_robin_cycles_through_the_candidates() -> None:
    policy = create_policy("round_robin", rng=random.Random(0))
    replicas = views(9, 0, 0)  # load does not matter to it
    assert [first(policy, replicas) for _ in range(7)] == ["r0", "r1", "r2", "r0", "r1", "r2", "r0"]
    # The fallbacks continue the cycle from the chosen one.
    assert rank(policy, replicas) == [["r1"], ["r2"], ["r0"]]


def test_round_robin_keeps_cycling_when_the_fleet_shrinks() -> None:
    policy = create_policy("round_robin", rng=random.Random(0))
    assert first(policy, views(0, 0, 0)) == "r0"
    assert [first(policy, views(0, 0)) for _ in range(4)] == ["r1", "r0", "r1", "r0"]


def test_pow2_prefers_the_less_loaded_of_its_two_draws() -> None:
    replicas = views(0, 7, 3, 9)
    for seed in range(20):
        rng = random.Random(seed)
        i, j = random.Random(seed).sample(range(len(replicas)), 2)
        groups = rank(create_policy("pow2", rng=rng), replicas)
        drawn = sorted((replicas[i], replicas[j]), key=lambda v: v.in_flight)
        assert groups[:2] == [[drawn[0].replica_id], [drawn[1].replica_id]]
        assert sorted(groups[2]) == sorted(
            v.replica_id for v in replicas if v not in (replicas[i], replicas[j])
        )


def test_pow2_with_two_replicas_always_picks_the_less_loaded() -> None:
    policy = create_policy("pow2", rng=random.Random(0))
    assert {first(policy, views(4, 1)) for _ in range(50)} == {"r1"}


def test_pow2_breaks_ties_at_random() -> None:
    policy = create_policy("pow2", rng=random.Random(0))
    picks = Counter(first(policy, views(2, 2)) for _ in range(400))
    assert set(picks) == {"r0", "r1"}
    assert 150 < picks["r0"] < 250


def test_pow2_is_deterministic_per_rng_seed() -> None:
    replicas = views(*range(16))

    def picks(seed: int) -> list[str]:
        policy = create_policy("pow2", rng=random.Random(seed))
        return [first(policy, replicas) for _ in range(30)]

    assert picks(3) == picks(3)
    assert picks(3) != picks(4)


def test_pow2_with_one_replica() -> None:
    assert rank(create_policy("pow2", rng=random.Random(0)), views(5)) == [["r0"]]


# -- the cache-aware policies -----------------------------------------------------------------

BLOCK = 16
SYSTEM = tuple(range(1000, 1000 + 8 * BLOCK))  # a shared prefix of 8 blocks


def request(request_id: str, tokens: Sequence[int], salt: str | None = None) -> RoutingRequest:
    return RoutingRequest(
        request_id=request_id,
        block_hashes=block_hashes(tokens, BLOCK, salt),
        num_prompt_tokens=len(tokens),
        block_size=BLOCK,
    )


def prompt(question: int, prefix: Sequence[int] = SYSTEM) -> tuple[int, ...]:
    return (*prefix, *range(question * 100, question * 100 + 2 * BLOCK))


def choose(policy: RoutingPolicy, req: RoutingRequest, replicas: Sequence[ReplicaView]) -> str:
    """Rank, then route as the caller does."""
    chosen = first(policy, replicas, req)
    policy.on_routed(req, chosen)
    return chosen


def stats(waiting: int = 0, running: int = 0, usage: float = 0.1) -> EngineStats:
    return EngineStats(
        num_waiting=waiting,
        num_running=running,
        kv_cache_usage=usage,
        block_size=BLOCK,
        num_total_blocks=1000,
    )


CACHE_POLICIES = ["cache_load", "prefix_affinity"]


@pytest.mark.parametrize("name", CACHE_POLICIES)
def test_the_longest_match_wins(name: str) -> None:
    policy = create_policy(name, rng=random.Random(0))
    fleet = views(0, 0, 0, 0)
    policy.on_routed(request("a", SYSTEM[: 2 * BLOCK]), "r0")  # 2 blocks of the prefix
    policy.on_routed(request("b", prompt(1)), "r2")  # all 8, and a question
    policy.on_routed(request("c", SYSTEM[: 5 * BLOCK]), "r3")  # 5 blocks
    for view in fleet:
        policy.on_replica_stats(view.replica_id, stats())  # nothing queued anywhere
    assert rank(policy, fleet, request("d", prompt(2)))[0] == ["r2"]


def test_cache_load_picks_the_idle_replica_when_no_cache_helps() -> None:
    policy = create_policy("cache_load", rng=random.Random(0))
    fleet = views(3, 1, 0, 2)
    assert rank(policy, fleet, request("a", prompt(1)))[:2] == [["r2"], ["r1"]]


def test_cache_load_breaks_ties_at_random_and_per_seed() -> None:
    def picks(seed: int) -> list[str]:
        policy = create_policy("cache_load", rng=random.Random(seed))
        return [first(policy, views(0, 0, 0, 0)) for _ in range(40)]

    assert set(picks(0)) == {"r0", "r1", "r2", "r3"}
    assert picks(0) == picks(0) and picks(0) != picks(1)


def test_cache_load_trades_cache_for_queue() -> None:
    # The queue at full weight (the default counts it at a quarter), to see its term alone.
    policy = create_policy("cache_load", rng=random.Random(0), queue_weight=1.0)
    policy.on_routed(request("warm", prompt(0)), "r0")
    policy.on_replica_stats("r0", stats(running=1, usage=1.0))  # no free KV: newcomers wait
    for i in range(1, 6):
        policy.on_routed(request(f"q{i}", prompt(i)), "r0")  # 32 uncached tokens each
    # r0 would save b's 128-token prefix, but 160 tokens of prefill wait ahead of it there.
    assert rank(policy, views(6, 0), request("b", prompt(9)))[0] == ["r1"]
    # r0 reports room again: those were admitted, and its cache makes it the faster choice.
    policy.on_replica_stats("r0", stats(running=6, usage=0.2))
    assert rank(policy, views(6, 0), request("b", prompt(9)))[0] == ["r0"]


def test_cache_load_requests_waiting_for_the_next_step_are_no_queue() -> None:
    # A report often catches requests that arrived during the step under way. With free KV they
    # are admitted at the next step; treating them as a queue for a whole stats period would
    # steer traffic away from every replica that just got some (the herd effect).
    policy = create_policy("cache_load", rng=random.Random(0), queue_weight=1.0)
    policy.on_routed(request("warm", prompt(0)), "r0")
    policy.on_routed(request("a", prompt(1)), "r0")
    policy.on_replica_stats("r0", stats(waiting=2, running=0, usage=0.1))
    assert first(policy, views(2, 0), request("b", prompt(2))) == "r0"
    # The same report with a full cache: they wait, and so would b.
    policy.on_replica_stats("r0", stats(waiting=2, running=0, usage=1.0))
    assert first(policy, views(2, 0), request("b", prompt(2))) == "r1"


def test_cache_load_waiting_requests_of_other_routers_count() -> None:
    policy = create_policy("cache_load", rng=random.Random(0), queue_weight=1.0)
    for i in range(4):
        policy.on_routed(request(f"x{i}", prompt(i)), "r2")  # this router's mean: 160 tokens
    policy.on_routed(request("warm", prompt(0)), "r0")
    policy.on_replica_stats("r0", stats(waiting=3, running=1, usage=0.1))  # 2 waiting not ours
    assert first(policy, views(1, 1, 1), request("b", prompt(5))) != "r0"


def test_cache_load_guard_spills_a_hot_prefix_which_then_caches_there_too() -> None:
    policy = create_policy("cache_load", rng=random.Random(0))
    policy.on_routed(request("warm", prompt(0)), "r0")
    policy.on_replica_stats("r0", stats(running=1))
    # Under the bound (mean + 3 standard deviations, at least 16) the prefix stays with r0.
    assert first(policy, views(20, 8, 8, 8), request("x", prompt(1))) == "r0"
    # Over it (mean 16: bound 28), the request spills; where it went now has the prefix too...
    hot = views(40, 8, 8, 8)
    spilled = choose(policy, request("a", prompt(2)), hot)
    assert spilled != "r0"
    policy.on_replica_stats(spilled, stats(running=1))
    # ...so the next request of the hot prefix follows it rather than a cold replica.
    loaded = [
        ReplicaView(v.replica_id, in_flight=v.in_flight + (v.replica_id == spilled)) for v in hot
    ]
    assert first(policy, loaded, request("b", prompt(3))) == spilled


def test_cache_load_guard_holds_whatever_the_cache_says() -> None:
    policy = create_policy("cache_load", rng=random.Random(0), spill_sigmas=0, spill_floor=2)
    policy.on_routed(request("warm", prompt(0)), "r0")
    policy.on_replica_stats("r0", stats(running=1))
    assert first(policy, views(3, 1, 1), request("a", prompt(1))) != "r0"  # 3 > max(5/3, 2)


@pytest.mark.parametrize(("hot_share", "spreads"), [(80, True), (10, False)])
def test_cache_load_replicates_a_prefix_by_its_demand(hot_share: int, spreads: bool) -> None:
    # Of the last 100 requests, `hot_share` began with SYSTEM, all routed to r0; the rest had
    # prefixes of their own, on the other replicas.
    policy = create_policy("cache_load", rng=random.Random(0))
    for i in range(100):
        if i < hot_share:
            policy.on_routed(request(f"hot{i}", prompt(i)), "r0")
        else:
            policy.on_routed(request(f"own{i}", prompt(i, (i,) * BLOCK)), f"r{1 + i % 7}")
    # r0 is above the mean (4.25) but far below the guard's bound (16).
    fleet = [ReplicaView(f"r{i}", in_flight=6 if i == 0 else 4) for i in range(8)]
    chosen = first(policy, fleet, request("next", prompt(500)))
    # 80%: the prefix needs ~5 of the 8 replicas and r0 is its only holder, so it spreads to
    # another one. 10%: one holder is enough, and the request stays with its cache.
    assert (chosen != "r0") == spreads


def test_cache_load_tracks_a_bounded_number_of_requests_per_replica() -> None:
    # on_finished never comes (a caller's bug): the oldest entries go beyond the bound.
    policy = create_policy("cache_load", rng=random.Random(0))
    for i in range(10_000):
        policy.on_routed(RoutingRequest(f"q{i}", block_hashes=(), num_prompt_tokens=10), "r0")
    assert policy.tracked_requests() == _ReplicaLoad.MAX_TRACKED < 10_000
    policy.on_finished("q0", "r0")  # long gone
    assert policy.tracked_requests() == _ReplicaLoad.MAX_TRACKED
    policy.on_finished("q9999", "r0")  # the newest are kept
    assert policy.tracked_requests() == _ReplicaLoad.MAX_TRACKED - 1


def test_cache_load_steers_new_prefixes_to_the_emptier_cache() -> None:
    policy = create_policy("cache_load", rng=random.Random(0))
    for i in range(20):  # r0 caches 20 unrelated prompts
        policy.on_kv_events(
            "r0",
            [BlocksStored(block_hashes=tuple(request("x", prompt(i, (i,) * 64)).block_hashes))],
        )
    assert {first(policy, views(0, 0), request(f"n{i}", prompt(i, ()))) for i in range(10)} == {
        "r1"
    }


def test_cache_load_a_joining_replica_does_not_take_every_new_prompt() -> None:
    # r0 holds a full cache, r1 just joined (the autoscaler added it): the empty cache draws new
    # prompts only up to footprint_cap_tokens, and their running prefills count against r1.
    policy = create_policy("cache_load", rng=random.Random(0))
    held = tuple(range(10**6, 10**6 + 1000))
    policy.on_kv_events("r0", [BlocksStored(block_hashes=held)])
    counts = Counter({"r0": 0, "r1": 0})
    for i in range(20):
        new_prompt = request(f"n{i}", tuple(range(i * 10**4, i * 10**4 + 64 * BLOCK)))
        counts[choose(policy, new_prompt, views(counts["r0"], counts["r1"]))] += 1
    assert counts["r0"] >= 8  # uncapped: r1 took them all up to the hot-prefix guard (18 of 20)


def test_cache_load_a_first_output_ends_the_prefill_cost() -> None:
    for seed in range(10):
        policy = create_policy("cache_load", rng=random.Random(seed))
        for name, replica in (("a", "r0"), ("b", "r1")):
            policy.on_routed(request(name, prompt(seed, ())), replica)
        policy.on_first_output("b", "r1")  # r0 is still prefilling "a": r1 is cheaper
        assert first(policy, views(1, 1), request("c", prompt(99, ()))) == "r1"
        policy.on_finished("a", "r0")
        policy.on_first_output("a", "r0")  # after its end: nothing left to forget
        assert policy.tracked_requests() == 1


def test_removed_blocks_stop_attracting() -> None:
    policy = create_policy("cache_load", rng=random.Random(0))
    warm = request("warm", prompt(0))
    policy.on_routed(warm, "r0")
    policy.on_replica_stats("r0", stats(running=1))
    fleet = views(1, 0, 0)
    assert first(policy, fleet, request("a", prompt(1))) == "r0"
    policy.on_kv_events("r0", [BlocksRemoved(block_hashes=tuple(warm.block_hashes[3:]))])
    assert first(policy, fleet, request("a", prompt(1))) == "r0"  # 3 blocks still help
    policy.on_kv_events("r0", [BlocksRemoved(block_hashes=tuple(warm.block_hashes[:3]))])
    assert first(policy, fleet, request("a", prompt(1))) != "r0"


def test_engine_stored_blocks_attract_without_routing() -> None:
    policy = create_policy("cache_load", rng=random.Random(0))
    # Another router sent the prefix to r1; this one learns it from r1's engine.
    policy.on_kv_events("r1", [BlocksStored(block_hashes=tuple(request("x", SYSTEM).block_hashes))])
    assert first(policy, views(0, 1, 0), request("a", prompt(1))) == "r1"


@pytest.mark.parametrize("name", CACHE_POLICIES)
def test_a_departed_replica_loses_its_cache_credit(name: str) -> None:
    policy = create_policy(name, rng=random.Random(0))
    policy.on_routed(request("warm", prompt(0)), "r0")
    policy.on_replica_stats("r0", stats(running=1))
    policy.on_replica_removed("r0")
    for i in range(20):
        ranked = rank(policy, views(1, 1, 1)[1:], request(f"a{i}", prompt(i + 1)))
        assert "r0" not in {replica_id for group in ranked for replica_id in group}
    # Seen again under the same id (e.g. the router dropped a view it could no longer trust),
    # it starts with an empty cache.
    back = [ReplicaView("r0", in_flight=1), ReplicaView("r1")]
    assert first(policy, back, request("b", prompt(9))) == "r1"


@pytest.mark.parametrize("name", CACHE_POLICIES)
def test_salt_separates_tenants(name: str) -> None:
    policy = create_policy(name, rng=random.Random(0))
    policy.on_routed(request("warm", prompt(0), salt="tenant-a"), "r0")
    policy.on_replica_stats("r0", stats(running=1))
    fleet = [ReplicaView("r0", in_flight=1), ReplicaView("r1"), ReplicaView("r2")]
    assert first(policy, fleet, request("a", prompt(1), salt="tenant-a")) == "r0"
    other = request("b", prompt(1), salt="tenant-b")
    assert set(other.block_hashes).isdisjoint(request("a", prompt(1), "tenant-a").block_hashes)
    for _ in range(10):
        assert first(policy, fleet, other) != "r0"


def test_prefix_affinity_below_the_match_rate_goes_to_the_smallest_tenants() -> None:
    policy = create_policy("prefix_affinity", rng=random.Random(0))
    policy.on_routed(request("a", tuple(range(20 * BLOCK))), "r0")  # 20 blocks
    policy.on_routed(request("b", tuple(range(5000, 5000 + 10 * BLOCK))), "r1")  # 10 blocks
    fleet = views(0, 0, 5, 0)
    # No match: Ray's "smallest tenants", r2 and r3 (no blocks), whatever their load.
    groups = rank(policy, fleet, request("c", prompt(1)))
    assert sorted(groups[0]) == ["r2", "r3"]
    # A match under 10% of the prompt (1 block of 42) counts as none.
    long_prompt = (*range(BLOCK), *range(9000, 9000 + 41 * BLOCK))
    assert sorted(rank(policy, fleet, request("d", long_prompt))[0]) == ["r2", "r3"]
    # From 10% on the holder wins, however loaded (Ray's default has no load guard).
    busy = views(0, 50, 0, 0)
    follow_up = (*range(5000, 5000 + 10 * BLOCK), *range(7000, 7000 + 30 * BLOCK))
    assert rank(policy, busy, request("e", follow_up))[0] == ["r1"]  # 10 blocks of 40: 25%


def test_prefix_affinity_ranks_the_rest_as_pow2_does() -> None:
    fleet = views(0, 3, 1, 2)
    for seed in range(10):
        policy = create_policy("prefix_affinity", rng=random.Random(seed))
        policy.on_routed(request("warm", prompt(0)), "r3")
        groups = rank(policy, fleet, request("a", prompt(1)))
        expected = create_policy("pow2", rng=random.Random(seed))
        pow2 = [[i for i in g if i != "r3"] for g in rank(expected, fleet)]
        assert groups == [["r3"], *(g for g in pow2 if g)]


def test_prefix_affinity_defers_to_pow2_when_load_is_imbalanced() -> None:
    policy = create_policy("prefix_affinity", rng=random.Random(3), imbalanced_threshold=4)
    policy.on_routed(request("warm", prompt(0)), "r0")
    assert rank(policy, views(0, 2, 4), request("a", prompt(1)))[0] == ["r0"]  # 4 - 0: balanced
    replicas = views(9, 2, 4)
    expected = create_policy("pow2", rng=random.Random(3))
    rank(expected, views(0, 2, 4))  # the same draws as the policy's first call
    assert rank(policy, replicas, request("b", prompt(2))) == rank(expected, replicas)


def test_policy_params_are_validated() -> None:
    policy = create_policy("cache_load", rng=random.Random(0), spill_sigmas=2.0)
    assert isinstance(policy, POLICIES["cache_load"])
    with pytest.raises(ValueError, match="spill_sigmas"):
        create_policy("cache_load", rng=random.Random(0), spill_sigmas=-1)
    with pytest.raises(ValueError, match="no_such_knob"):
        create_policy("pow2", rng=random.Random(0), no_such_knob=1)


def test_a_request_with_hashes_needs_its_block_size() -> None:
    with pytest.raises(ValueError, match="block_size"):
        RoutingRequest(request_id="x", block_hashes=(1,), num_prompt_tokens=16)
    RoutingRequest(request_id="y", block_hashes=(), num_prompt_tokens=3)  # too short to hash


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_cached_blocks_is_the_view_the_decision_used(name: str) -> None:
    policy = create_policy(name, rng=random.Random(0))
    policy.on_routed(request("a", prompt(1)), "r1")
    req = request("b", prompt(2))
    rank(policy, views(0, 0), req)
    predicted = policy.cached_blocks(req)
    if name in CACHE_POLICIES:
        assert predicted == {"r1": len(SYSTEM) // BLOCK}  # the shared prefix, not the question
    else:
        assert predicted is None  # no view of the caches, so no prediction
