"""The routing decision as a span: our Serve RequestRouter (deployments/routing/serve_router.py)
plus one `route` span per generate request, a child of the router's HTTP span (through the
EngineRequest's trace context, since Serve runs request routers on its own event loop).

Attributes: the policy, the candidates, the replica chosen, and the prompt blocks the policy
believed that replica to hold (the RoutingHint the request router adds to the call; policies that
keep a view of the caches only).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from opentelemetry.trace import Span
from ray.serve._private.common import ReplicaID
from ray.serve._private.replica_result import ReplicaResult
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica

from deployments.engines.base import EngineRequest
from deployments.observability.config import TracingConfig
from deployments.observability.tracing import extract, tracer, tracer_provider
from deployments.routing.policy import RoutingHint
from deployments.routing.serve_router import PolicyRequestRouter

# Decisions whose routed callback has not come yet; bounded so that a request Serve never
# routes (cancelled while queued) cannot grow it.
_MAX_OPEN_SPANS = 10_000


class TracedRequestRouter(PolicyRequestRouter):
    def initialize_state(self, tracing: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        config = TracingConfig.model_validate(tracing or {})
        self._tracer = tracer(tracer_provider(config, "router"))
        self._route_policy = str(kwargs.get("policy", "pow2"))
        self._open: OrderedDict[str, Span] = OrderedDict()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        ranked = await super().choose_replicas(candidate_replicas, pending_request)
        request = _engine_request(pending_request)
        if request is None or not request.trace_context or request.request_id in self._open:
            return ranked
        candidates = [r.replica_id.unique_id for r in candidate_replicas]
        span = self._tracer.start_span(
            "route",
            context=extract(request.trace_context),
            attributes={
                "llm.request_id": request.request_id,
                "llm.routing.policy": self._route_policy,
                "llm.routing.candidates": candidates,
                "llm.routing.ranked_first": [r.replica_id.unique_id for r in ranked[0]]
                if ranked
                else [],
            },
        )
        self._open[request.request_id] = span
        while len(self._open) > _MAX_OPEN_SPANS:
            self._open.popitem(last=False)[1].end()
        return ranked

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        request = _engine_request(pending_request)
        span = self._open.pop(request.request_id, None) if request is not None else None
        super().on_request_routed(pending_request, replica_id, result)
        if span is None:
            return
        chosen = replica_id.unique_id
        span.set_attribute("llm.replica", chosen)
        hint = pending_request.kwargs.get("routing")
        if isinstance(hint, RoutingHint):
            blocks = hint.predicted_cached_blocks.get(chosen, 0)
            span.set_attribute("llm.routing.predicted_cached_blocks", blocks)
        span.end()


def _engine_request(pending_request: PendingRequest | None) -> EngineRequest | None:
    args = pending_request.args if pending_request is not None else None
    return args[0] if args and isinstance(args[0], EngineRequest) else None
