"""The Serve adapter: runs a routing policy inside Ray Serve's request routing.

Serve creates one `PolicyRequestRouter` per deployment handle, in the process that holds the
handle (our Router deployment's replicas). It never blocks: everything a decision needs is local.
Replica stats and engine KV events arrive with Serve's own replica updates (each replica's
`record_routing_stats`, polled by the controller every `request_routing_stats_period_s` and
broadcast to every handle), and the router's own in-flight counts are kept here. Per decision:
hash the prompt once (O(prompt blocks)), build one view per replica (O(replicas)), ask the policy.

Per-request state, and how each entry ends (the gauge `router_tracked_requests` counts them, by
kind, per router replica: 0 when no request is in flight, else something leaked):
- `pending`: a decision for a handle call Serve has not sent yet (its prompt hashes, its route
  span). Ends when the call is routed; when Serve drops it from its queue (its future is
  cancelled: the client left, a deadline); or when an attempt sent to a replica ended without
  being routed and the call was not queued again (cancelled while the replica was answering).
- `routed`: a call a replica accepted, counted in that replica's in-flight requests. Ends when its
  result completes, whichever way (finished, failed, cancelled, the replica died). The result's own
  done callback ends it, not Serve's `on_request_completed`: that one can arrive before
  `on_request_routed` (a request that ended at once) and, for a call refused by a replica and then
  accepted by the same one, once more for the refused attempt. Its request id maps to it (the
  last retry's), so that a first output the stream's consumer reports (`first_outputs`, in this
  process) reaches the policy as `on_first_output`; the mapping ends with the entry.
- `policy`: what the policy keeps per routed request (e.g. CacheLoad's queued prefill), ended by
  `on_finished` when the routed entry ends.

With tracing on, each generate call's decision is a `route` span, a child of the router's HTTP
span (through the EngineRequest's trace context, since Serve runs request routers on its own event
loop): the policy, the candidates, the replica chosen and the prompt blocks the policy believed it
to hold. Tracing off, the tracer is a no-op one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Span
from ray import serve
from ray.serve._private.common import ReplicaID
from ray.serve._private.replica_result import ReplicaResult
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import FIFOMixin, RequestRouter
from ray.serve.exceptions import RayServeException
from ray.util import metrics

from deployments.engines.base import AllBlocksCleared, EngineRequest, EngineStats
from deployments.observability.config import TracingConfig
from deployments.observability.tracing import extract, tracer, tracer_provider
from deployments.routing import first_outputs
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

# Entries kept per kind at most: a hook that never comes cannot grow them forever (the oldest
# goes, ended as if finished).
_MAX_TRACKED_REQUESTS = 100_000
# The tracked-requests gauge is set at most this often (setting it costs ~15 us; three kinds,
# several changes per request), and always once after the last change.
_PUBLISH_PERIOD_S = 0.5


@dataclass(slots=True)
class _Pending:
    """A decision for a handle call Serve has not sent yet."""

    request: RoutingRequest
    future: asyncio.Future[Any] | None = None  # the call's routing future being watched
    span: Span | None = None


class PolicyRequestRouter(FIFOMixin, RequestRouter):
    """Ray Serve `RequestRouter` over one of our policies (picked by name in the model config)."""

    def initialize_state(
        self,
        policy: str = "pow2",
        seed: int | None = None,
        tracing: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        self._policy_name = policy
        self._policy: RoutingPolicy = create_policy(
            policy, rng=random.Random(seed), **(params or {})
        )
        self._tracer = tracer(
            tracer_provider(TracingConfig.model_validate(tracing or {}), "router")
        )
        self._cursor = KVEventCursor()
        # Every replica of the last update, reported or not: one that leaves before its first
        # report may already have requests routed to it, and the policy state they made.
        self._replica_ids: set[str] = set()
        self._stats: dict[str, EngineStats] = {}
        self._versions: dict[str, tuple[str, int]] = {}  # replica -> (incarnation, version)
        # Keyed by Serve's internal request id (one per handle call: our retries are new calls).
        self._pending: dict[str, _Pending] = {}
        self._routed: dict[str, tuple[str, RoutingRequest]] = {}
        self._calls: dict[str, str] = {}  # request id -> its routed call's key (the last retry)
        self._in_flight: dict[str, int] = {}  # replica -> its routed entries (none: absent)
        self._publish_scheduled = False
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
        self._tracked = metrics.Gauge(
            "router_tracked_requests",
            description="Requests a router replica keeps routing state for, by kind (pending: "
            "decided, not sent; routed: in flight at a replica; policy: the policy's own "
            "entries). 0 when nothing is in flight; more means leaked state.",
            tag_keys=("deployment", "router", "kind"),
        )
        tags = {"deployment": self._deployment_id.name}
        self._decision_ms.set_default_tags({**tags, "policy": policy})
        self._staleness_ms.set_default_tags(tags)
        self._resyncs.set_default_tags(tags)
        self._tracked.set_default_tags({**tags, "router": _router_replica_id()})
        self._publish()  # zeros: a router that never routed is seen as holding nothing
        first_outputs.subscribe(self)

    # ---- replica updates ------------------------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        current = set()
        for replica in replicas:
            replica_id = replica.replica_id.unique_id
            current.add(replica_id)
            self._ingest(replica_id, replica.routing_stats)
        # Requests still routed to a replica that left end with their results (failed when it
        # died, finished when it drained): their in-flight counts go then.
        gone_ids, self._replica_ids = self._replica_ids - current, current
        for gone in gone_ids:
            self._stats.pop(gone, None)
            self._versions.pop(gone, None)
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
        events = delta.events
        if not delta.complete:
            # More events happened than the window kept: what this router believed about the
            # replica's cache may now be wrong. Forget the cache view rather than route on stale
            # blocks (as if the engine had cleared it; the view is rebuilt from the replica's next
            # snapshot), but only that: the replica's load, and the requests in flight there, are
            # still what the policy knows.
            logger.info("KV event gap for replica %s: dropping its cached view", replica_id)
            events = [AllBlocksCleared(), *events]
        if delta.resynced:
            self._resyncs.inc()
        if delta.oldest_ts is not None:
            self._staleness_ms.observe(max(time.time() - delta.oldest_ts, 0.0) * 1000)
        if events:
            self._policy.on_kv_events(replica_id, events)

    # ---- decisions ------------------------------------------------------------------------------

    def _routing_request(self, request: EngineRequest) -> RoutingRequest:
        block_size = next((s.block_size for s in self._stats.values()), None)
        hashes = (
            block_hashes(request.prompt_token_ids, block_size, request.cache_salt)
            if block_size is not None
            else []
        )
        return RoutingRequest(
            request_id=request.request_id,
            block_hashes=hashes,
            num_prompt_tokens=len(request.prompt_token_ids),
            block_size=block_size,
        )

    def _decision(self, pending_request: PendingRequest, request: EngineRequest) -> _Pending:
        """The call's pending entry: made at its first decision (choose_replicas runs again when
        every ranked replica was full: hash once per call), watched while Serve queues it."""
        key = pending_request.metadata.internal_request_id
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(self._routing_request(request))
            if len(self._pending) > _MAX_TRACKED_REQUESTS:
                self._drop_pending(next(iter(self._pending)))
            self._changed()
        future = pending_request.future
        if pending.future is not future:  # Serve gives a call a new future when it re-queues it
            pending.future = future
            future.add_done_callback(functools.partial(self._left_queue, key))
        return pending

    def _left_queue(self, key: str, future: asyncio.Future[Any]) -> None:
        if future.cancelled():  # Serve dropped the call while it waited for a replica
            self._drop_pending(key)

    def _drop_pending(self, key: str) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        if pending.span is not None:
            pending.span.end()
        self._changed()

    def _view(self, replica: RunningReplica) -> ReplicaView:
        replica_id = replica.replica_id.unique_id
        return ReplicaView(replica_id, in_flight=self._in_flight.get(replica_id, 0))

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
        engine_request = _engine_request(pending_request)
        if engine_request is None:
            return [candidate_replicas]  # not a generation: any replica can answer it
        pending = self._decision(pending_request, engine_request)
        request = pending.request
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
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
        groups = [[by_id[i] for i in group if i in by_id] for group in ranked]
        if pending.span is None and engine_request.trace_context:
            pending.span = self._tracer.start_span(
                "route",
                context=extract(engine_request.trace_context),
                attributes={
                    "llm.request_id": request.request_id,
                    "llm.routing.policy": self._policy_name,
                    "llm.routing.candidates": list(by_id),
                    "llm.routing.ranked_first": [r.replica_id.unique_id for r in groups[0]]
                    if groups
                    else [],
                },
            )
        return groups

    # ---- request lifecycle ----------------------------------------------------------------------

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        engine_request = _engine_request(pending_request)
        if engine_request is None:
            return
        key = pending_request.metadata.internal_request_id
        pending = self._pending.pop(key, None)
        # No entry when an earlier attempt's end dropped it after this one was decided.
        request = pending.request if pending else self._routing_request(engine_request)
        target = replica_id.unique_id
        self._routed[key] = (target, request)
        self._calls[request.request_id] = key
        self._in_flight[target] = self._in_flight.get(target, 0) + 1
        # Serve awaits between choosing a replica and this notice, so the replica may have left
        # meanwhile (a scale-down): the router still counts the request until it ends, but the
        # policy, which forgot the replica, must not rebuild its load and index entries for good.
        if target in self._replica_ids:
            self._policy.on_routed(request, target)
        if len(self._routed) > _MAX_TRACKED_REQUESTS:
            self._finish(next(iter(self._routed)))
        if pending is not None and pending.span is not None:
            pending.span.set_attribute("llm.replica", target)
            hint = pending_request.kwargs.get("routing")
            if isinstance(hint, RoutingHint):
                blocks = hint.predicted_cached_blocks.get(target, 0)
                pending.span.set_attribute("llm.routing.predicted_cached_blocks", blocks)
            pending.span.end()
        self._changed()
        # Fires on a Ray thread, at once if the result has already completed.
        loop = self._event_loop
        result.add_done_callback(lambda _: _call_soon(loop, self._finish, key))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        # An attempt ended without being routed (routed calls end with their own result): the
        # call is gone (cancelled before the replica answered) unless Serve queued it again
        # (refused: a new routing future, still pending, which this completion may trail).
        pending = self._pending.get(internal_request_id)
        if pending is not None and (pending.future is None or pending.future.done()):
            self._drop_pending(internal_request_id)

    def first_output_seen(self, request_id: str) -> None:
        """From `first_outputs`, on any thread; a request this router did not route is
        ignored."""
        _call_soon(self._event_loop, self._first_output, request_id)

    def _first_output(self, request_id: str) -> None:
        routed = self._routed.get(self._calls.get(request_id, ""))
        if routed is not None:
            self._policy.on_first_output(request_id, routed[0])

    def _finish(self, key: str) -> None:
        routed = self._routed.pop(key, None)
        if routed is None:
            return
        target, request = routed
        if self._calls.get(request.request_id) == key:
            del self._calls[request.request_id]
        count = self._in_flight.pop(target) - 1
        if count:
            self._in_flight[target] = count
        self._policy.on_finished(request.request_id, target)
        self._changed()

    # ---- the tracked-requests gauge -------------------------------------------------------------

    def tracked_requests(self) -> dict[str, int]:
        """Entries of per-request state by kind (see the module docstring)."""
        return {
            "pending": len(self._pending),
            "routed": len(self._routed),
            "policy": self._policy.tracked_requests(),
        }

    def _changed(self) -> None:
        if not self._publish_scheduled:
            self._publish_scheduled = True
            self._event_loop.call_later(_PUBLISH_PERIOD_S, self._publish)

    def _publish(self) -> None:
        self._publish_scheduled = False
        for kind, count in self.tracked_requests().items():
            self._tracked.set(count, tags={"kind": kind})


def _engine_request(pending_request: PendingRequest) -> EngineRequest | None:
    """The EngineRequest of a `generate` call; None for other calls (stats, abort)."""
    args = pending_request.args
    return args[0] if args and isinstance(args[0], EngineRequest) else None


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed: the router is gone with it
        loop.call_soon_threadsafe(callback, *args)


def _router_replica_id() -> str:
    """The Serve replica this router runs in (the gauge's `router` tag); "driver" outside one."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return "driver"
