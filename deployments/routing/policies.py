"""Routing policies (see policy.py for the interface); registered by name in policy.POLICIES.

The baselines here keep no per-replica state, so their hooks are no-ops; they import the
interface types for annotations only, which lets policy.py import this module for its registry.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deployments.engines.base import EngineStats
    from deployments.routing.policy import ReplicaView, RoutingRequest


class _StatelessHooks:
    """The hooks of a policy that decides from the views alone."""

    def on_routed(self, request: RoutingRequest, replica_id: str) -> None:
        pass

    def on_finished(self, request_id: str, replica_id: str) -> None:
        pass

    def on_replica_stats(self, replica_id: str, stats: EngineStats) -> None:
        pass

    def on_replica_removed(self, replica_id: str) -> None:
        pass


class RoundRobin(_StatelessHooks):
    """Each request starts one further along the candidates; the rest follow in cyclic order as
    fallbacks, so a full replica passes the request to the next one."""

    def __init__(self, *, rng: random.Random) -> None:
        del rng  # deterministic by construction; the keyword keeps every factory's signature
        self._next = 0

    async def rank(
        self, request: RoutingRequest, replicas: Sequence[ReplicaView]
    ) -> list[list[str]]:
        n = len(replicas)
        if n == 0:
            return []
        start = self._next % n
        self._next = start + 1
        return [[replicas[(start + i) % n].replica_id] for i in range(n)]


class PowerOfTwoChoices(_StatelessHooks):
    """Ray Serve's default: two replicas drawn at random, the one with fewer requests in flight
    at this router first (ties at random); the other replicas, shuffled, are the last resort."""

    def __init__(self, *, rng: random.Random) -> None:
        self._rng = rng

    async def rank(
        self, request: RoutingRequest, replicas: Sequence[ReplicaView]
    ) -> list[list[str]]:
        n = len(replicas)
        if n <= 1:
            return [[view.replica_id] for view in replicas]
        rng = self._rng
        i, j = rng.sample(range(n), 2)
        a, b = replicas[i], replicas[j]
        # The draw order is already random, so on a tie `a` is a fair pick.
        if b.in_flight < a.in_flight:
            a, b = b, a
        groups = [[a.replica_id], [b.replica_id]]
        if n > 2:
            rest = [view.replica_id for k, view in enumerate(replicas) if k != i and k != j]
            rng.shuffle(rest)
            groups.append(rest)
        return groups
