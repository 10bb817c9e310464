"""LLMServer under Serve's replica lifecycle (deployments/llm_server.py), without Ray: Serve may
call `__del__` while the constructor still awaits the engine (a replica stopped while it loads),
and pushes autoscaling metrics until `__del__` has returned."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import types
from pathlib import Path

import pytest

from deployments import llm_server
from deployments.config import ModelConfig
from deployments.engines.base import EngineStats, KVCacheEvent
from deployments.llm_server import LLMServer


class LoadingEngine:
    """An engine whose start() waits until the test lets it finish; like VLLMEngine, its stats
    fail once it is shut down."""

    def __init__(self) -> None:
        self.loaded = asyncio.Event()
        self.shut_down = False

    async def start(self) -> None:
        await self.loaded.wait()

    async def shutdown(self) -> None:
        self.shut_down = True

    def stats(self) -> EngineStats:
        if self.shut_down:
            raise RuntimeError("the engine is shut down")
        return EngineStats(
            num_waiting=1, num_running=2, kv_cache_usage=0.5, block_size=16, num_total_blocks=8
        )

    def drain_kv_events(self) -> list[KVCacheEvent]:
        return []


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> LoadingEngine:
    engine = LoadingEngine()
    monkeypatch.setattr(llm_server, "create_engine", lambda model: engine)
    replica = types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id="replica-a"))
    monkeypatch.setattr(llm_server.serve, "get_replica_context", lambda: replica)
    return engine


class ServedReplica(LLMServer):
    """The real LLMServer, stopped the way Serve stops it: `stop()` awaits LLMServer.__del__.
    Python's own finalizer would call the async __del__ without awaiting it."""

    async def stop(self) -> None:
        await LLMServer.__del__(self)

    def __del__(self) -> None:
        """Serve calls the destructor explicitly (stop); the garbage collector must not."""


def model(embedded_model: Path) -> ModelConfig:
    return ModelConfig(
        name="tiny", engine="simulated", source=str(embedded_model), max_model_len=1024
    )


async def test_a_replica_stopped_while_its_engine_loads_shuts_the_engine_down(
    engine: LoadingEngine, embedded_model: Path
) -> None:
    replica = ServedReplica.__new__(ServedReplica)
    constructing = asyncio.create_task(replica.__init__(model(embedded_model)))
    await asyncio.sleep(0)  # the constructor now awaits the engine's start
    assert not constructing.done()
    await replica.stop()
    assert engine.shut_down
    constructing.cancel()  # Serve kills the actor next
    with contextlib.suppress(asyncio.CancelledError):
        await constructing


def test_serve_calls_every_method_on_the_replicas_event_loop() -> None:
    """Serve runs sync methods in a thread pool, where the stats reports raced the loop's KV
    event drain (a report failed; events were lost or reordered): none may be sync."""
    methods = {
        name: method
        for name, method in vars(LLMServer).items()
        if inspect.isfunction(method) and (not name.startswith("_") or name == "__del__")
    }
    assert {"generate", "record_routing_stats", "record_autoscaling_stats"} <= methods.keys()
    sync = [
        name
        for name, method in methods.items()
        if not (inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method))
    ]
    assert sync == []


async def test_a_stopping_replica_reports_no_autoscaling_metrics_instead_of_failing(
    engine: LoadingEngine, embedded_model: Path
) -> None:
    engine.loaded.set()
    replica = ServedReplica.__new__(ServedReplica)
    await replica.__init__(model(embedded_model))
    report = await replica.record_autoscaling_stats()
    assert (report["running"], report["waiting"], report["kv_cache_usage"]) == (2.0, 1.0, 0.5)
    await replica.stop()
    assert engine.shut_down
    assert await replica.record_autoscaling_stats() == {}
