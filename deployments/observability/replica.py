"""The replica's side of a request: the engine call's span (child of the router's, through the
EngineRequest's trace context) with time to first token as an event and the token counts, the
replica's id on the first output (for the router's access log), and the replica's metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from opentelemetry.trace import SpanKind, TracerProvider

from deployments.config import ModelConfig
from deployments.engines.base import EngineOutput, EngineRequest, EngineStats
from deployments.observability.config import ObservabilityConfig
from deployments.observability.metrics import ReplicaMetrics
from deployments.observability.record import Clock
from deployments.observability.tracing import extract, tracer


class ReplicaTelemetry:
    def __init__(
        self,
        model: ModelConfig,
        replica_id: str,
        config: ObservabilityConfig,
        provider: TracerProvider,
        clock: Clock = time.monotonic,
    ) -> None:
        self._model = model
        self._replica_id = replica_id
        self._tracer = tracer(provider)
        self._clock = clock
        price = config.accelerator_hourly_usd
        cost = None if price is None else price * model.num_workers
        self._metrics = ReplicaMetrics(model.name, replica_id, cost)

    def stats(self, stats: EngineStats) -> None:
        self._metrics.update(stats)

    async def generate(
        self, request: EngineRequest, outputs: AsyncIterator[EngineOutput]
    ) -> AsyncIterator[EngineOutput]:
        """The engine's stream, traced, with the replica's id on its first output."""
        start = self._clock()
        span = self._tracer.start_span(
            "engine.generate",
            context=extract(request.trace_context),
            kind=SpanKind.SERVER,
            attributes={
                "llm.request_id": request.request_id,
                "llm.model": self._model.name,
                "llm.replica": self._replica_id,
                "llm.engine": self._model.engine,
                "llm.prompt_tokens": len(request.prompt_token_ids),
                "llm.max_tokens": request.sampling.max_tokens,
            },
        )
        first, completion, cached = True, 0, 0
        try:
            async for output in outputs:
                if first:
                    output = output.model_copy(update={"replica": self._replica_id})
                    if output.token_ids:
                        first = False
                        ttft_ms = (self._clock() - start) * 1000
                        span.add_event("first_token", {"llm.ttft_ms": round(ttft_ms, 3)})
                completion += len(output.token_ids)
                cached = max(cached, output.num_cached_tokens)
                if output.finish_reason is not None:
                    span.set_attribute("llm.finish_reason", output.finish_reason)
                yield output
        finally:
            span.set_attribute("llm.completion_tokens", completion)
            span.set_attribute("llm.cached_tokens", cached)
            span.end()
