"""LLMServer: the Serve deployment of one model; each replica owns one engine.

Token-in, token-out: `generate` takes an EngineRequest (token ids from the router) and streams
EngineOutputs. Serve calls `check_health`, `record_routing_stats` and `record_autoscaling_stats`
on its own schedule; routers and the autoscaler consume what they return.

Every method is async: Serve runs a replica's sync methods in a thread pool
(RAY_SERVE_RUN_SYNC_IN_THREADPOOL, on by default in Ray 2.60), where the stats reports raced the
event loop's KV event drain and the engine (a report failed with "dictionary changed size during
iteration"; events were lost or reordered, and the routers kept blocks the engine had evicted).
On the loop, each runs whole between two of the loop's steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.util import metrics

from deployments.config import ModelConfig
from deployments.engines.base import EngineDeadError, EngineOutput, EngineRequest, EngineStats
from deployments.engines.factory import create_engine
from deployments.observability.config import ObservabilityConfig
from deployments.observability.replica import ReplicaTelemetry
from deployments.observability.tracing import tracer_provider
from deployments.routing.kv_log import KVEventLog
from deployments.routing.policy import RoutingHint

logger = logging.getLogger("ray.serve")

_END = object()

# How often engine KV events move into the log between stats reports: each event is stamped
# when it enters the log, so this bounds how much of the measured staleness is hidden.
_KV_DRAIN_PERIOD_S = 0.05


class _PredictionMetrics:
    """How well the routers predicted this replica's prefix cache: per routed request, the
    cached tokens the router believed this replica held vs those the engine found."""

    def __init__(self, model: str) -> None:
        tags = {"model": model}
        self.predicted = metrics.Counter(
            "routing_predicted_cached_tokens",
            description="Prompt tokens the router predicted this replica had cached, summed "
            "over the requests it routed here.",
            tag_keys=("model",),
        )
        self.actual = metrics.Counter(
            "routing_actual_cached_tokens",
            description="Prompt tokens the engine found cached, summed over the same requests.",
            tag_keys=("model",),
        )
        self.ratio = metrics.Histogram(
            "routing_prediction_ratio",
            description="Per request with a prediction: engine-reported cached tokens over "
            "predicted ones (1: exact; below: the router believed blocks the engine had lost).",
            boundaries=[0.01, 0.25, 0.5, 0.75, 0.9, 0.99, 1.01, 1.25, 2.0],
            tag_keys=("model",),
        )
        for metric in (self.predicted, self.actual, self.ratio):
            metric.set_default_tags(tags)
        # The same, as totals the routing stats carry (for `inference-cluster status`).
        self.requests = 0
        self.predicted_tokens = 0
        self.actual_tokens = 0

    def record(self, predicted: int, actual: int) -> None:
        self.requests += 1
        self.predicted_tokens += predicted
        self.actual_tokens += actual
        # Ray's counters refuse an increment of 0.
        if predicted:
            self.predicted.inc(predicted)
            self.ratio.observe(actual / predicted)
        if actual:
            self.actual.inc(actual)

    def totals(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "predicted_cached_tokens": self.predicted_tokens,
            "actual_cached_tokens": self.actual_tokens,
        }


class LLMServer:
    async def __init__(
        self, model: ModelConfig, observability: ObservabilityConfig | None = None
    ) -> None:
        self._model = model
        observability = observability or ObservabilityConfig()
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._telemetry = ReplicaTelemetry(
            model,
            self._replica_id,
            observability,
            tracer_provider(observability.tracing, f"llm-server {model.name}"),
        )
        self._engine = create_engine(model)
        self._stats_version = 0
        # Serve may call __del__ while this constructor still awaits the engine (a replica
        # stopped while it loads), and keeps pushing metrics until __del__ has returned: both
        # read these, so they exist before the first await.
        self._stopping = False
        self._kv_drain_task: asyncio.Task[None] | None = None
        await self._engine.start()
        self._kv_log = KVEventLog(
            incarnation=uuid.uuid4().hex,
            max_events=model.routing.kv_event_window,
            # The engine holds at most its cache's blocks, so the log's snapshot needs no more.
            max_blocks=max(self._engine.stats().num_total_blocks, 1),
        )
        self._kv_drain_task = asyncio.create_task(self._drain_kv_events())
        self._predictions = _PredictionMetrics(model.name)
        # Requests finished and accepted, and (time, finished, accepted) at the last autoscaling
        # report: between two reports, the replica's throughput (the autoscaler drains backlogs
        # with it) and its share of the arrival rate (the rate sizing's signal). Counted in
        # choices, as the engines count running and waiting (a request with n choices is n
        # sequences in the batch): in requests, a backlog of n-choice requests was divided by a
        # rate n times too small.
        self._finished = 0
        self._arrived = 0
        self._counts_reported = (time.monotonic(), 0, 0)
        logger.info("engine %s ready for model %s", model.engine, model.name)

    async def _drain_kv_events(self) -> None:
        while True:
            self._kv_log.extend(self._engine.drain_kv_events())
            await asyncio.sleep(_KV_DRAIN_PERIOD_S)

    async def generate(
        self, request: EngineRequest, routing: RoutingHint | None = None
    ) -> AsyncIterator[list[EngineOutput]]:
        """Stream the request's outputs in batches: the first output at once (time to first
        token), then whatever the engine produced, at most once per `stream_interval_ms`, as one
        item. Each Ray object and HTTP write costs CPU per message, and on a shared host that CPU
        is the engine's; a slow consumer gets larger batches, never a backlog of objects.

        `routing` is what our request router believed about this replica's cache (it adds it
        to the call); the engine's answer is compared with it when the first output arrives."""
        choices = request.sampling.n
        self._arrived += choices
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stream = self._telemetry.generate(request, self._engine.generate(request))
        predicted = None if routing is None else routing.predicted_tokens(self._replica_id)

        async def pump() -> None:
            nonlocal predicted
            try:
                async for output in stream:
                    if predicted is not None:
                        self._predictions.record(predicted, output.num_cached_tokens)
                        predicted = None
                    queue.put_nowait(output)
                self._finished += choices
                queue.put_nowait(_END)
            except Exception as exc:  # handed to the consumer, which re-raises it
                if isinstance(exc, EngineDeadError):
                    _exit_with_dead_engine(exc)
                queue.put_nowait(exc)

        pump_task = asyncio.create_task(pump())
        interval_s = self._model.stream_interval_ms / 1000
        loop = asyncio.get_running_loop()
        sent_at: float | None = None  # None until the first output, which never waits
        try:
            while True:
                items = [await queue.get()]
                if sent_at is not None and not _ends(items[-1]):
                    # Let the batch fill until the interval since the last send is up, unless
                    # the stream ends first: the last tokens never wait.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(sent_at + interval_s):
                            while not _ends(items[-1]):
                                items.append(await queue.get())
                while not queue.empty():
                    items.append(queue.get_nowait())
                batch = [item for item in items if isinstance(item, EngineOutput)]
                if batch:
                    yield batch
                    sent_at = loop.time()
                last = items[-1]
                if last is _END:
                    return
                if isinstance(last, Exception):
                    raise last
        finally:
            # A client disconnect cancels this generator: cancelling the pump closes the engine's
            # stream, which aborts the engine request so no KV blocks or batch slots leak.
            if not pump_task.done():
                pump_task.cancel()
                await asyncio.gather(pump_task, return_exceptions=True)

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    async def check_health(self) -> None:
        try:
            await self._engine.check_health()
        except EngineDeadError as exc:
            _exit_with_dead_engine(exc)

    async def reset_prefix_cache(self) -> dict[str, Any]:
        """Forget this replica's cached prefixes (e.g. after a weight update); the engine's
        AllBlocksCleared event tells the routers (vLLM publishes it with its next step, so an
        idle engine's routers learn of it with the next request). Refused while requests hold
        blocks."""
        return {"replica": self._replica_id, "reset": await self._engine.reset_prefix_cache()}

    async def stats(self) -> EngineStats:
        """The engine's stats after a real health check (used by GET /health and `status`)."""
        await self._engine.check_health()
        return self._engine.stats()

    async def replica_status(self) -> dict[str, Any]:
        """Engine stats and the routers' predictions, for `inference-cluster status` and `serve`'s
        drain. Free of side effects: a call of record_routing_stats advances the version that
        picks which window carries the routers' KV snapshot."""
        return self._status()

    def _status(self) -> dict[str, Any]:
        return {
            "stats": self._engine.stats().model_dump(),
            "predictions": self._predictions.totals(),
        }

    async def record_routing_stats(self) -> dict[str, Any]:
        """Engine stats and the newest window of KV cache events, for every router replica
        (Serve's controller polls this and broadcasts it; see deployments/routing/kv_log.py)."""
        self._kv_log.extend(self._engine.drain_kv_events())
        self._stats_version += 1
        snapshot = (self._stats_version - 1) % self._model.routing.kv_snapshot_every == 0
        self._telemetry.stats(self._engine.stats())  # Serve calls this every stats_period_s
        return {
            # Serve re-sends every replica's last stats whenever any replica changes; the version
            # lets routers tell a fresh snapshot from a replay of one they already applied.
            "version": self._stats_version,
            "kv_events": self._kv_log.window(with_snapshot=snapshot),
            **self._status(),
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        if self._stopping:
            # The engine is going. Serve drained this replica before __del__ and counts only
            # running replicas: no report, rather than an error logged at every push.
            return {}
        stats = self._engine.stats()
        now, finished, arrived = time.monotonic(), self._finished, self._arrived
        since, finished_before, arrived_before = self._counts_reported
        self._counts_reported = (now, finished, arrived)
        elapsed = now - since
        return {
            "waiting": float(stats.num_waiting),
            "running": float(stats.num_running),
            "kv_cache_usage": stats.kv_cache_usage,
            "finished_per_s": (finished - finished_before) / elapsed if elapsed > 0 else 0.0,
            "arrived_per_s": (arrived - arrived_before) / elapsed if elapsed > 0 else 0.0,
        }

    async def __del__(self) -> None:
        self._stopping = True
        if self._kv_drain_task is not None:
            self._kv_drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._kv_drain_task
        await self._engine.shutdown()


def _ends(item: Any) -> bool:
    return item is _END or isinstance(item, Exception)


def _exit_with_dead_engine(error: EngineDeadError) -> None:
    """End the replica's process, as vLLM's own OpenAI server exits when its engine dies.

    A dead engine never comes back, and until Serve's next health check its idle replica looks
    the least loaded and draws the traffic. An exit makes every router drop the replica at once
    (its in-flight calls fail with ActorDiedError, which the router retries elsewhere before
    the first output) and Serve starts a replacement right away.
    """
    logger.error("the engine died (%s): exiting this replica so that Serve replaces it", error)
    logging.shutdown()
    os._exit(1)
