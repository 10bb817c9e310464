"""LLMServer: the Serve deployment of one model; each replica owns one engine.

Token-in, token-out: `generate` takes an EngineRequest (token ids from the router) and streams
EngineOutputs. Serve calls `check_health`, `record_routing_stats` and `record_autoscaling_stats`
on its own schedule; routers and the autoscaler consume what they return.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from deployments.config import ModelConfig
from deployments.engines.base import EngineOutput, EngineRequest, EngineStats
from deployments.engines.factory import create_engine
from deployments.routing.kv_log import KVEventLog

logger = logging.getLogger("ray.serve")

_END = object()


class LLMServer:
    async def __init__(self, model: ModelConfig) -> None:
        self._model = model
        self._engine = create_engine(model)
        self._stats_version = 0
        self._kv_log = KVEventLog(
            incarnation=uuid.uuid4().hex, max_events=model.routing.kv_event_window
        )
        await self._engine.start()
        logger.info("engine %s ready for model %s", model.engine, model.name)

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineOutput]]:
        """Stream the request's outputs in batches: whatever the engine produced since the last
        yield goes out as one item, so a slow consumer costs one Ray object per batch, not per
        token, and a fast one still gets every token at once (nothing waits to fill a batch)."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stream = self._engine.generate(request)

        async def pump() -> None:
            try:
                async for output in stream:
                    queue.put_nowait(output)
                queue.put_nowait(_END)
            except Exception as exc:  # handed to the consumer, which re-raises it
                queue.put_nowait(exc)

        pump_task = asyncio.create_task(pump())
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                batch = [item for item in items if isinstance(item, EngineOutput)]
                if batch:
                    yield batch
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
        await self._engine.check_health()

    async def stats(self) -> EngineStats:
        """The engine's stats after a real health check (used by GET /health and `status`)."""
        await self._engine.check_health()
        return self._engine.stats()

    def record_routing_stats(self) -> dict[str, Any]:
        """Engine stats and the newest window of KV cache events, for every router replica
        (Serve's controller polls this and broadcasts it; see deployments/routing/kv_log.py)."""
        self._kv_log.extend(self._engine.drain_kv_events())
        self._stats_version += 1
        return {
            # Serve re-sends every replica's last stats whenever any replica changes; the version
            # lets routers tell a fresh snapshot from a replay of one they already applied.
            "version": self._stats_version,
            "stats": self._engine.stats().model_dump(),
            "kv_events": self._kv_log.window(),
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        stats = self._engine.stats()
        return {
            "waiting": float(stats.num_waiting),
            "running": float(stats.num_running),
            "kv_cache_usage": stats.kv_cache_usage,
        }

    async def __del__(self) -> None:
        await self._engine.shutdown()
