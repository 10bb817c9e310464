"""The Serve adapter (PolicyRequestRouter) on Ray's own in-memory replica stand-ins, no cluster.

What it must never do is wait: it runs on the router replica's event loop, between every request
and its replica. Each routing step below is driven as a bare coroutine that must finish on its
first resumption (it never suspended, so it never waited on I/O), with every blocking call Ray or
Python offers replaced by one that fails the test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
import ray
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.test_utils import FakeRunningReplica

from deployments.engines.base import (
    BlocksRemoved,
    BlocksStored,
    EngineRequest,
    EngineStats,
    SamplingParams,
)
from deployments.routing.hashing import block_hashes
from deployments.routing.kv_log import KVEventLog
from deployments.routing.policy import RoutingHint
from deployments.routing.serve_router import PolicyRequestRouter

BLOCK = 16
PROMPT = tuple(range(1, 8 * BLOCK + 1))


class ReportingReplica(FakeRunningReplica):
    """Ray's fake replica, plus what record_routing_stats returned (as Serve broadcasts it)."""

    def __init__(self, replica_id: str, routing_stats: dict[str, Any]) -> None:
        super().__init__(replica_id)
        self._routing_stats = routing_stats
        self.set_queue_len_response(0)

    @property
    def routing_stats(self) -> dict[str, Any]:
        return self._routing_stats


def report(log: KVEventLog, version: int, *, snapshot: bool = False) -> dict[str, Any]:
    stats = EngineStats(
        num_waiting=0, num_running=0, kv_cache_usage=0.0, block_size=BLOCK, num_total_blocks=64
    )
    window = log.window(with_snapshot=snapshot)
    return {"version": version, "stats": stats.model_dump(), "kv_events": window}


def new_router() -> PolicyRequestRouter:
    router = PolicyRequestRouter(
        deployment_id=DeploymentID(name="LLMServer-m", app_name="test"),
        handle_source=DeploymentHandleSource.UNKNOWN,
    )
    router.initialize_state(policy="cache_load", seed=0)
    return router


def pending(request_id: str) -> PendingRequest:
    request = EngineRequest(
        request_id=request_id,
        prompt_token_ids=PROMPT,
        sampling=SamplingParams(max_tokens=4),
    )
    metadata = RequestMetadata(request_id=request_id, internal_request_id=request_id)
    return PendingRequest(args=[request], kwargs={}, metadata=metadata)


def finish_without_waiting(step: Coroutine[Any, Any, Any]) -> Any:
    try:
        step.send(None)
    except StopIteration as done:
        return done.value
    step.close()
    pytest.fail("the routing step suspended: it waited on something")


@pytest.fixture
def no_blocking_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def blocked(*args: object, **kwargs: object) -> None:
        raise AssertionError("a blocking call on the router's event loop")

    for module, name in ((ray, "get"), (ray, "wait"), (time, "sleep")):
        monkeypatch.setattr(module, name, blocked)
    yield


async def test_the_adapter_routes_by_engine_truth_without_waiting(
    no_blocking_calls: None,
) -> None:
    router = new_router()
    logs = {"r0": KVEventLog("r0"), "r1": KVEventLog("r1")}
    # r1's engine reports the prompt's first 6 blocks cached.
    hashes = block_hashes(PROMPT, BLOCK)
    logs["r1"].extend([BlocksStored(block_hashes=tuple(hashes[:6]))])
    replicas = [ReportingReplica(rid, report(log, 1)) for rid, log in logs.items()]
    router.update_replicas(replicas)  # sync: Serve calls it from its long-poll callback
    await asyncio.sleep(0)  # let Ray's own queue-length probe of the new replicas run

    request = pending("a")
    groups = finish_without_waiting(router.choose_replicas(replicas, request))
    assert [r.replica_id.unique_id for r in groups[0]] == ["r1"]
    hint = request.kwargs["routing"]
    assert isinstance(hint, RoutingHint)
    assert hint.predicted_tokens("r1") == 6 * BLOCK and hint.predicted_tokens("r0") == 0
    router.on_request_routed(request, replicas[1].replica_id, result=None)  # type: ignore[arg-type]
    router.on_request_completed(replicas[1].replica_id, "a")

    # r1's engine evicts those blocks: its next report turns the next decision to r0.
    logs["r1"].extend([BlocksRemoved(block_hashes=tuple(hashes[:6]))])
    replicas = [ReportingReplica(rid, report(log, 2)) for rid, log in logs.items()]
    router.update_replicas(replicas)
    request = pending("b")
    groups = finish_without_waiting(router.choose_replicas(replicas, request))
    assert groups[0][0].replica_id.unique_id == "r0"
    assert request.kwargs["routing"].predicted_tokens("r1") == 0


async def test_a_restarted_router_rebuilds_its_view_from_the_snapshot(
    no_blocking_calls: None,
) -> None:
    # The replica's window kept only its newest events: a router that starts now cannot replay
    # how the prompt's blocks got there, so it learns them from the next snapshot.
    logs = {"r0": KVEventLog("r0", max_events=2), "r1": KVEventLog("r1", max_events=2)}
    hashes = block_hashes(PROMPT, BLOCK)
    logs["r1"].extend([BlocksStored(block_hashes=tuple(hashes[:6]))])
    logs["r1"].extend([BlocksStored(block_hashes=(i,)) for i in range(5)])  # unrelated, later
    router = new_router()
    replicas = [ReportingReplica(rid, report(log, 1)) for rid, log in logs.items()]
    router.update_replicas(replicas)
    await asyncio.sleep(0)
    request = pending("a")
    finish_without_waiting(router.choose_replicas(replicas, request))
    assert request.kwargs["routing"].predicted_tokens("r1") == 0  # not known yet

    replicas = [ReportingReplica(rid, report(log, 2, snapshot=True)) for rid, log in logs.items()]
    router.update_replicas(replicas)
    request = pending("b")
    groups = finish_without_waiting(router.choose_replicas(replicas, request))
    assert groups[0][0].replica_id.unique_id == "r1"
    assert request.kwargs["routing"].predicted_tokens("r1") == 6 * BLOCK
