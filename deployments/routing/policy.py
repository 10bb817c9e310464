"""The routing policy interface: one async signature for every policy, picked by name.

A policy is a plain object. For each request the router hands it the request (its chained block
hashes, so a policy can measure cache overlap itself) and a view of every candidate replica; the
policy returns ranked groups of replica ids, best first. The caller tries the groups in order and,
within a group, takes the replica with the fewest requests in flight that still has room. Hooks
tell the policy what happened: a request was routed or finished, a replica reported stats, a
replica left. Nothing here imports Ray, so the Serve adapter, the cluster simulator and the unit
tests run the same objects.

`rank` is async although today's policies never await: a policy that does (asks a shared index,
probes a replica) keeps the same signature, and callers never branch on the kind of policy.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from deployments.engines.base import EngineStats
from deployments.routing.policies import PowerOfTwoChoices, RoundRobin


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What the router knows about one candidate replica when it routes a request.

    `num_running`, `num_waiting` and `kv_cache_usage` come from the replica's last reported stats
    (so they can be stale); `in_flight` is the router's own, always current, count of requests it
    sent there that have not finished.
    """

    replica_id: str
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    in_flight: int = 0


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """The request as a policy sees it: no text, only what decides where it should go."""

    request_id: str
    block_hashes: Sequence[int]  # chained hashes of the full prompt blocks, engine block size
    num_prompt_tokens: int
    cache_salt: str | None = None
    tenant: str | None = None


class RoutingPolicy(Protocol):
    async def rank(
        self, request: RoutingRequest, replicas: Sequence[ReplicaView]
    ) -> list[list[str]]:
        """Groups of candidate replica ids, best first; only ids of `replicas` appear."""

    def on_routed(self, request: RoutingRequest, replica_id: str) -> None:
        """The request was sent to `replica_id`."""

    def on_finished(self, request_id: str, replica_id: str) -> None:
        """The request ended on `replica_id` (completed, failed or aborted)."""

    def on_replica_stats(self, replica_id: str, stats: EngineStats) -> None:
        """The replica reported fresh engine stats."""

    def on_replica_removed(self, replica_id: str) -> None:
        """The replica left the fleet: forget everything about it."""


PolicyFactory = Callable[..., RoutingPolicy]

# Policies by the name configs use; every factory takes the injected `rng` as a keyword.
POLICIES: dict[str, PolicyFactory] = {
    "round_robin": RoundRobin,
    "pow2": PowerOfTwoChoices,
}


def create_policy(name: str, *, rng: random.Random) -> RoutingPolicy:
    """A fresh policy instance; ValueError lists the known names when `name` is not one."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}") from None
    return factory(rng=rng)
