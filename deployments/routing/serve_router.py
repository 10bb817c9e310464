"""The Serve adapter: runs a routing policy inside Ray Serve's request routing.

Serve creates one `PolicyRequestRouter` per deployment handle, in the process that holds the
handle (our Router deployment's replicas). It never blocks: everything a decision needs is local.
Replica stats and engine KV events arrive with Serve's own replica updates (each replica's
`record_routing_stats`, polled by the controller every `request_routing_stats_period_s` and
broadcast to every handle), and the router's own in-flight counts are kept here. Per decision:
hash the prompt once (O(prompt blocks)), build one view per replica (O(replicas)), ask the policy.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from typing import Any

from ray.serve._private.common import ReplicaID
from ray.serve._private.replica_result import ReplicaResult
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import FIFOMixin, RequestRouter
from ray.util import metrics

from deployments.engines.base import EngineRequest, EngineStats
from deployments.routing.hashing import block_hashes
from deployments.routing.kv_log import KVEventCursor
from deployments.routing.policy import (
    ReplicaView,
    RoutingHint,
    RoutingPolicy,
    RoutingRequest,
    create_policy,
)

logger = logging.getLogger("ray.serve")

# Requests routed but not finished, remembered so completion hooks can find them; bounded so a
# hook Serve never calls cannot grow it forever.
_MAX_TRACKED_REQUESTS = 100_000


class PolicyRequestRouter(FIFOMixin, RequestRouter):
    """Ray Serve `RequestRouter` over one of our policies (picked by name in the model config)."""

    def initialize_state(
        self, policy: str = "pow2", seed: int | None = None, **params: Any
    ) -> None:
        self._policy_name = policy
        self._policy: RoutingPolicy = create_policy(policy, rng=random.Random(seed), **params)
        self._cursor = KVEventCursor()
        self._stats: dict[str, EngineStats] = {}
        self._versions: dict[str, tuple[str, int]] = {}  # replica -> (incarnation, version)
        self._in_flight: dict[str, int] = {}
        self._routed: OrderedDict[str, tuple[str, RoutingRequest]] = OrderedDict()
        self._hashed: OrderedDict[str, RoutingRequest] = OrderedDict()
        self._decision_ms = metrics.Histogram(
            "router_decision_ms",
            description="Time the routing policy took to rank the replicas for one request.",
            boundaries=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10],
            tag_keys=("deployment", "policy"),
        )
        self._staleness_ms = metrics.Histogram(
            "router_kv_event_staleness_ms",
            description="Age of the oldest new KV cache event in each update a router applied: "
            "how far its view of a replica's cache lagged the engine.",
            boundaries=[10, 50, 100, 250, 500, 750, 1000, 1250, 1500, 2000, 3000, 5000, 10000],
            tag_keys=("deployment",),
        )
        self._resyncs = metrics.Counter(
            "router_kv_view_resyncs",
            description="Times a router rebuilt its view of a replica's cache from a snapshot "
            "(after it started or missed events).",
            tag_keys=("deployment",),
        )
        tags = {"deployment": self._deployment_id.name}
        self._decision_ms.set_default_tags({**tags, "policy": policy})
        self._staleness_ms.set_default_tags(tags)
        self._resyncs.set_default_tags(tags)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = set(self._stats) | set(self._in_flight)
        super().update_replicas(replicas)
        current = set()
        for replica in replicas:
            replica_id = replica.replica_id.unique_id
            current.add(replica_id)
            self._ingest(replica_id, replica.routing_stats)
        for gone in before - current:
            self._stats.pop(gone, None)
            self._versions.pop(gone, None)
            self._in_flight.pop(gone, None)
            self._cursor.forget(gone)
            self._policy.on_replica_removed(gone)

    def _ingest(self, replica_id: str, routing_stats: dict[str, Any]) -> None:
        if not routing_stats:
            return  # the replica has not reported yet
        version = (routing_stats["kv_events"]["incarnation"], routing_stats["version"])
        if self._versions.get(replica_id) == version:
            return  # a replay of a snapshot already applied (another replica changed)
        self._versions[replica_id] = version
        stats = EngineStats.model_validate(routing_stats["stats"])
        self._stats[replica_id] = stats
        self._policy.on_replica_stats(replica_id, stats)
        delta = self._cursor.delta(replica_id, routing_stats["kv_events"])
        if not delta.complete:
            # More events happened than the window kept: what this router believed about the
            # replica's cache may now be wrong. Forget it rather than route on stale blocks; the
            # view is rebuilt from the replica's next snapshot.
            logger.info("KV event gap for replica %s: dropping its cached view", replica_id)
            self._policy.on_replica_removed(replica_id)
        if delta.resynced:
            self._resyncs.inc()
        if delta.oldest_ts is not None:
            self._staleness_ms.observe(max(time.time() - delta.oldest_ts, 0.0) * 1000)
        if delta.events:
            self._policy.on_kv_events(replica_id, delta.events)

    def _routing_request(self, pending_request: PendingRequest) -> RoutingRequest | None:
        """The policy's view of a `generate` call; None for other calls (stats, abort)."""
        args = pending_request.args
        if not args or not isinstance(args[0], EngineRequest):
            return None
        request = args[0]
        cached = self._hashed.get(request.request_id)
        if cached is not None:
            return cached
        block_size = next((s.block_size for s in self._stats.values()), None)
        hashes = (
            block_hashes(request.prompt_token_ids, block_size, request.cache_salt)
            if block_size is not None
            else []
        )
        routing_request = RoutingRequest(
            request_id=request.request_id,
            block_hashes=hashes,
            num_prompt_tokens=len(request.prompt_token_ids),
            cache_salt=request.cache_salt,
            block_size=block_size,
        )
        # choose_replicas runs again when every ranked replica was full: hash once per request.
        self._hashed[request.request_id] = routing_request
        while len(self._hashed) > 1024:
            self._hashed.popitem(last=False)
        return routing_request

    def _view(self, replica: RunningReplica) -> ReplicaView:
        replica_id = replica.replica_id.unique_id
        stats = self._stats.get(replica_id)
        return ReplicaView(
            replica_id=replica_id,
            num_running=stats.num_running if stats else 0,
            num_waiting=stats.num_waiting if stats else 0,
            kv_cache_usage=stats.kv_cache_usage if stats else 0.0,
            in_flight=self._in_flight.get(replica_id, 0),
        )

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:  # Serve probing without a request: any order will do
            return [candidate_replicas]
        started = time.perf_counter()
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        request = self._routing_request(pending_request)
        if request is None:
            return [candidate_replicas]  # not a generation: any replica can answer it
        try:
            ranked = await self._policy.rank(request, [self._view(r) for r in candidate_replicas])
        except Exception:
            # Serve retries a raising router forever, so the request would hang: a broken
            # policy must degrade to "any replica", loudly, never to a stuck request.
            logger.exception("routing policy failed; routing to any replica")
            return [candidate_replicas]
        self._decision_ms.observe((time.perf_counter() - started) * 1000)
        predicted = self._policy.cached_blocks(request)
        if predicted is not None and request.block_size is not None:
            # Serve sends the call with these kwargs to whichever replica it takes from the
            # groups; that replica compares its entry with what its engine finds cached.
            pending_request.kwargs["routing"] = RoutingHint(
                self._policy_name, request.block_size, predicted
            )
        return [[by_id[i] for i in group if i in by_id] for group in ranked]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        request = self._routing_request(pending_request)
        if request is None:
            return
        self._hashed.pop(request.request_id, None)
        target = replica_id.unique_id
        self._in_flight[target] = self._in_flight.get(target, 0) + 1
        self._routed[pending_request.metadata.internal_request_id] = (target, request)
        while len(self._routed) > _MAX_TRACKED_REQUESTS:
            self._routed.popitem(last=False)
        self._policy.on_routed(request, target)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        routed = self._routed.pop(internal_request_id, None)
        if routed is None:
            return
        target, request = routed
        self._in_flight[target] = max(self._in_flight.get(target, 1) - 1, 0)
        self._policy.on_finished(request.request_id, target)
