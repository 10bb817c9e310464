"""The routing policy interface: one async signature for every policy, picked by name.

A policy is a plain object. For each request the router hands it the request (its chained block
hashes, so a policy can measure cache overlap itself) and a view of every candidate replica; the
policy returns ranked groups of replica ids, best first. The caller tries the groups in order and,
within a group, takes the replica with the fewest requests in flight that still has room. Hooks
tell the policy what happened: a request was routed or finished, a replica reported stats or KV
cache events, a replica left. Nothing here imports Ray, so the Serve adapter, the cluster
simulator and the unit tests run the same objects.

`rank` is async although today's policies never await: a policy that does (asks a shared index,
probes a replica) keeps the same signature, and callers never branch on the kind of policy.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.engines.base import EngineStats, KVCacheEvent
from deployments.routing.policies import (
    CacheLoad,
    PolicyParams,
    PowerOfTwoChoices,
    PrefixAffinity,
    RoundRobin,
)


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What the router knows about one candidate replica when it routes a request: `in_flight`
    is the router's own, always current, count of requests it sent there that have not finished.
    The replica's reported stats reach a policy through `on_replica_stats` instead (they can be
    stale, and a policy keeps what it needs of them).
    """

    replica_id: str
    in_flight: int = 0


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """The request as a policy sees it: no text, only what decides where it should go."""

    request_id: str
    # Chained hashes of the full prompt blocks, engine block size; salted with the request's
    # cache_salt, so a tenant's prompts never match another tenant's cached blocks.
    block_hashes: Sequence[int]
    num_prompt_tokens: int
    # Tokens per block of `block_hashes`: the engines' block size, which the router learns from
    # them (never assumes). Required with hashes: a policy turns matched blocks into tokens.
    block_size: int | None = None

    def __post_init__(self) -> None:
        if self.block_hashes and (self.block_size is None or self.block_size < 1):
            raise ValueError(
                f"request {self.request_id!r} has block hashes but block_size is "
                f"{self.block_size!r}: pass the engines' block size the hashes were made with"
            )


@dataclass(frozen=True, slots=True)
class RoutingHint:
    """What the router believed when it routed a request, passed with it to the replica: per
    candidate replica, the leading blocks of the prompt it was believed to hold. The replica
    that serves the request compares its own entry with what its engine really found cached
    (the prediction's accuracy; deployments/llm_server.py)."""

    policy: str
    block_size: int
    predicted_cached_blocks: dict[str, int]  # replica id -> blocks; absent: none

    def predicted_tokens(self, replica_id: str) -> int:
        return self.predicted_cached_blocks.get(replica_id, 0) * self.block_size


class RoutingPolicy(Protocol):
    async def rank(
        self, request: RoutingRequest, replicas: Sequence[ReplicaView]
    ) -> list[list[str]]:
        """Groups of candidate replica ids, best first; only ids of `replicas` appear."""

    def cached_blocks(self, request: RoutingRequest) -> dict[str, int] | None:
        """Per replica, the leading blocks of the request's prompt the policy believes it holds
        (replicas holding none absent); None for a policy that keeps no view of the caches.
        Called right after `rank` for the same request, so a policy may reuse its walk."""

    def on_routed(self, request: RoutingRequest, replica_id: str) -> None:
        """The request was sent to `replica_id`."""

    def on_first_output(self, request_id: str, replica_id: str) -> None:
        """The request's first output reached the router from `replica_id`: its prefill is
        done. Not called for a request that ends without output (on_finished covers it)."""

    def on_finished(self, request_id: str, replica_id: str) -> None:
        """The request ended on `replica_id` (completed, failed or aborted)."""

    def on_replica_stats(self, replica_id: str, stats: EngineStats) -> None:
        """The replica reported fresh engine stats."""

    def on_replica_removed(self, replica_id: str) -> None:
        """The replica left the fleet: forget everything about it."""

    def on_kv_events(self, replica_id: str, events: Sequence[KVCacheEvent]) -> None:
        """KV cache events the replica's engine emitted since the last call, oldest first."""

    def tracked_requests(self) -> int:
        """Requests routed and not finished the policy keeps an entry for: 0 once every
        `on_routed` had its `on_finished` (or its replica was removed), else state leaked."""


class PolicyClass(Protocol):
    """A policy class: its parameters model (defaults for every field, unknown keys refused, so
    a config can validate them when it loads) and its constructor."""

    Params: type[PolicyParams]

    def __call__(self, params: Any = None, *, rng: random.Random) -> RoutingPolicy: ...


# Policies by the name configs use; each draws its randomness only from the injected `rng`.
POLICIES: dict[str, PolicyClass] = {
    "round_robin": RoundRobin,
    "pow2": PowerOfTwoChoices,
    "prefix_affinity": PrefixAffinity,
    "cache_load": CacheLoad,
}


def create_policy(name: str, *, rng: random.Random, **params: Any) -> RoutingPolicy:
    """A fresh policy instance with `params` validated by its Params model; ValueError lists the
    known names when `name` is not one, or says which parameter is wrong (pydantic's
    ValidationError is a ValueError)."""
    try:
        policy_class = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}") from None
    return policy_class(policy_class.Params(**params), rng=rng)
