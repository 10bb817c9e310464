"""Routing policies: the registry, round_robin and pow2 (Ray Serve's default)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from deployments.engines.base import EngineStats
from deployments.routing.policy import (
    POLICIES,
    ReplicaView,
    RoutingPolicy,
    RoutingRequest,
    create_policy,
)
from loadtest.simulator import resolve

REQUEST = RoutingRequest(request_id="r", block_hashes=(1, 2, 3), num_prompt_tokens=50)


def views(*in_flight: int) -> list[ReplicaView]:
    return [ReplicaView(f"r{i}", in_flight=n) for i, n in enumerate(in_flight)]


def rank(policy: RoutingPolicy, replicas: Sequence[ReplicaView]) -> list[list[str]]:
    return resolve(policy.rank(REQUEST, replicas))


def first(policy: RoutingPolicy, replicas: Sequence[ReplicaView]) -> str:
    return rank(policy, replicas)[0][0]


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
