"""The Serve adapter (PolicyRequestRouter) on Ray's own in-memory replica stand-ins, no cluster.

What it must never do is wait: it runs on the router replica's event loop, between every request
and its replica. Each routing step below is driven as a bare coroutine that must finish on its
first resumption (it never suspended, so it never waited on I/O), with every blocking call Ray or
Python offers replaced by one that fails the test.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.test_utils import FakeRunningReplica
from ray.serve.config import RequestRouterConfig

from deployments.engines.base import (
    BlocksRemoved,
    BlocksStored,
    EngineRequest,
    EngineStats,
    SamplingParams,
)
from deployments.observability.config import TracingConfig
from deployments.observability.tracing import tracer, tracer_provider
from deployments.routing.first_outputs import first_output_seen
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


def new_router(
    router_class: type[PolicyRequestRouter] = PolicyRequestRouter,
) -> PolicyRequestRouter:
    router = router_class(
        deployment_id=DeploymentID(name="LLMServer-m", app_name="test"),
        handle_source=DeploymentHandleSource.UNKNOWN,
    )
    router.initialize_state(policy="cache_load", seed=0)
    return router


def pending(
    request_id: str, call_id: str | None = None, trace_context: dict[str, str] | None = None
) -> PendingRequest:
    """A generate call of the request; `call_id` is Serve's internal id of the handle call (our
    retries of a request are new calls)."""
    request = EngineRequest(
        request_id=request_id,
        prompt_token_ids=PROMPT,
        sampling=SamplingParams(max_tokens=4),
        trace_context=trace_context,
    )
    metadata = RequestMetadata(request_id=request_id, internal_request_id=call_id or request_id)
    return PendingRequest(args=[request], kwargs={}, metadata=metadata)


class FakeResult:
    """A ReplicaResult's done callbacks, completed by the test (Ray calls them on its own thread,
    at once when the result is already complete)."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[object], None]] = []
        self.done = False

    def add_done_callback(self, callback: Callable[[object], None]) -> None:
        if self.done:
            threading.Thread(target=callback, args=(None,)).start()
        else:
            self.callbacks.append(callback)

    def complete(self) -> None:
        self.done = True
        for callback in self.callbacks:
            threading.Thread(target=callback, args=(None,)).start()


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
    result = FakeResult()
    router.on_request_routed(request, replicas[1].replica_id, result)  # type: ignore[arg-type]
    result.complete()

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


async def test_a_kv_event_gap_drops_the_cache_view_and_nothing_else() -> None:
    logs = {"r0": KVEventLog("r0", max_events=2), "r1": KVEventLog("r1", max_events=2)}
    router = new_router()
    replicas = [ReportingReplica(rid, report(log, 1)) for rid, log in logs.items()]
    router.update_replicas(replicas)
    await asyncio.sleep(0)
    for i in range(3):
        router.on_request_routed(pending(f"q{i}"), replicas[0].replica_id, FakeResult())  # type: ignore[arg-type]
    # r0 stores more events than its window keeps, and reports the three requests waiting.
    logs["r0"].extend([BlocksStored(block_hashes=(i,)) for i in range(5)])
    waiting = EngineStats(
        num_waiting=3, num_running=0, kv_cache_usage=1.0, block_size=BLOCK, num_total_blocks=64
    )
    gap = {"version": 2, "stats": waiting.model_dump(), "kv_events": logs["r0"].window()}
    replicas = [ReportingReplica("r0", gap), ReportingReplica("r1", report(logs["r1"], 2))]
    router.update_replicas(replicas)
    # The prompt blocks the routed requests left in r0's view may be gone: forgotten...
    request = pending("next")
    await router.choose_replicas(replicas, request)
    assert request.kwargs["routing"].predicted_tokens("r0") == 0
    # ...but the requests still run there and the report that came with the gap still counts.
    assert router.tracked_requests() == {"pending": 1, "routed": 3, "policy": 3}
    assert router._policy._queue["r0"] > 0


async def test_a_replica_leaving_before_its_first_report_is_forgotten() -> None:
    router = new_router()
    r0 = ReportingReplica("r0", report(KVEventLog("r0"), 1))
    new = ReportingReplica("r-new", {})  # running, its routing stats not polled yet
    router.update_replicas([r0, new])
    await asyncio.sleep(0)
    request = pending("a")
    await router.choose_replicas([r0, new], request)
    result = FakeResult()
    router.on_request_routed(request, new.replica_id, result)  # type: ignore[arg-type]
    result.complete()
    await settle()
    router.update_replicas([r0])  # it died before it ever reported
    request = pending("b")
    await router.choose_replicas([r0], request)
    assert "r-new" not in request.kwargs["routing"].predicted_cached_blocks
    assert "r-new" not in router._policy.index.held


# ---- per-request state: every way a request ends leaves none behind ----------------------------

IDLE = {"pending": 0, "routed": 0, "policy": 0}


async def settle() -> None:
    """Let callbacks queued from Ray's threads (call_soon_threadsafe) run."""
    for _ in range(20):
        await asyncio.sleep(0.001)


def fleet(router: PolicyRequestRouter) -> list[ReportingReplica]:
    replicas = [ReportingReplica(r, report(KVEventLog(r), 1)) for r in ("r0", "r1")]
    router.update_replicas(replicas)
    return replicas


async def routed(
    router: PolicyRequestRouter, replicas: list[ReportingReplica], request: PendingRequest
) -> tuple[ReportingReplica, FakeResult]:
    """Decide, then accept the call where the router ranked first, as Serve does."""
    groups = await router.choose_replicas(replicas, request)
    chosen = groups[0][0]
    result = FakeResult()
    router.on_request_routed(request, chosen.replica_id, result)  # type: ignore[arg-type]
    return next(r for r in replicas if r.replica_id == chosen.replica_id), result


def assert_in_flight_matches(router: PolicyRequestRouter) -> None:
    views = {r: router._view(ReportingReplica(r, {})).in_flight for r in ("r0", "r1")}
    assert sum(views.values()) == router.tracked_requests()["routed"]


async def test_finished_and_failed_requests_leave_no_state() -> None:
    router = new_router()
    replicas = fleet(router)
    results = []
    for i in range(4):
        _, result = await routed(router, replicas, pending(f"req-{i}"))
        results.append(result)
    assert router.tracked_requests() == {"pending": 0, "routed": 4, "policy": 4}
    assert_in_flight_matches(router)
    for result in results:  # finished, failed or cancelled: Ray completes the result alike
        result.complete()
    await settle()
    assert router.tracked_requests() == IDLE
    assert_in_flight_matches(router)


async def test_a_first_output_reaches_the_policy_of_the_router_that_routed_it() -> None:
    router, other = new_router(), new_router()
    await first_output_reaches_the_policy(router, other)


async def first_output_reaches_the_policy(
    router: PolicyRequestRouter, other: PolicyRequestRouter
) -> None:
    replicas = fleet(router)
    replica, result = await routed(router, replicas, pending("req-0", call_id="call-0"))
    prefilling = router._policy._prefilling  # type: ignore[attr-defined]
    target = replica.replica_id.unique_id
    assert prefilling[target] == len(PROMPT)  # nothing cached there yet
    first_output_seen("req-unknown")  # another model's request: ignored by both routers
    first_output_seen("req-0")  # from the app's event loop, as ServeBackend calls it
    await settle()
    assert prefilling[target] == 0
    assert other.tracked_requests() == IDLE
    result.complete()
    await settle()
    assert router.tracked_requests() == IDLE
    assert not router._calls


def test_a_router_shipped_by_value_hears_first_outputs(tmp_path: Path) -> None:
    # Serve pickles the request router's module by value (RequestRouterConfig): in the Router
    # replica the class's globals are a copy, and a registry kept there would not be the one
    # ServeBackend imports. Serve's own serialization, unpickled in a fresh process:
    config = RequestRouterConfig(request_router_class=PolicyRequestRouter)
    (tmp_path / "router.pkl").write_bytes(config.get_serialized_request_router_cls())
    script = f"""
import asyncio
from ray import cloudpickle
from tests.unit import test_serve_router as t
shipped = cloudpickle.loads(open({str(tmp_path / "router.pkl")!r}, "rb").read())
assert shipped is not t.PolicyRequestRouter
asyncio.run(t.first_output_reaches_the_policy(t.new_router(shipped), t.new_router()))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]


async def test_a_request_that_ended_before_it_was_routed_leaves_no_state() -> None:
    # Serve's completion callback can run before on_request_routed (a request that ended at
    # once): the routed entry must still end, with the result that had already completed.
    router = new_router()
    replicas = fleet(router)
    request = pending("quick")
    groups = await router.choose_replicas(replicas, request)
    router.on_request_completed(groups[0][0].replica_id, "quick")
    result = FakeResult()
    result.done = True
    router.on_request_routed(request, groups[0][0].replica_id, result)  # type: ignore[arg-type]
    await settle()
    assert router.tracked_requests() == IDLE


async def test_a_client_leaving_while_queued_leaves_no_state() -> None:
    router = new_router()
    replicas = fleet(router)
    request = pending("gone")
    await router.choose_replicas(replicas, request)
    assert router.tracked_requests()["pending"] == 1
    request.future.cancel()  # what Serve does when the handle call is cancelled while queued
    await settle()
    assert router.tracked_requests() == IDLE


async def test_a_call_refused_then_routed_again_is_counted_once() -> None:
    router = new_router()
    replicas = fleet(router)
    request = pending("busy")
    groups = await router.choose_replicas(replicas, request)
    refused_by = groups[0][0].replica_id
    request.future.set_result(groups[0][0])  # Serve sends it there; the replica refuses
    request.reset_future()  # and Serve queues the call again, with a new future
    # The refused attempt's completion comes after the call was decided again: the call is
    # still waiting, its decision must stay.
    await router.choose_replicas(replicas, request)
    router.on_request_completed(refused_by, "busy")
    assert router.tracked_requests()["pending"] == 1
    result = FakeResult()
    router.on_request_routed(request, refused_by, result)  # type: ignore[arg-type]
    assert router.tracked_requests() == {"pending": 0, "routed": 1, "policy": 1}
    request.future.cancel()  # a finished future's callbacks must not drop anything either
    await settle()
    assert router.tracked_requests()["routed"] == 1
    result.complete()
    await settle()
    assert router.tracked_requests() == IDLE


async def test_a_call_cancelled_while_its_replica_answers_leaves_no_state() -> None:
    # Serve sent the call (its future resolved to the replica) and the caller left before the
    # replica accepted it: no routed callback comes, only the attempt's completion.
    router = new_router()
    replicas = fleet(router)
    request = pending("left")
    groups = await router.choose_replicas(replicas, request)
    request.future.set_result(groups[0][0])
    router.on_request_completed(groups[0][0].replica_id, "left")
    await settle()
    assert router.tracked_requests() == IDLE


async def test_a_replica_dying_under_requests_and_their_retries_leave_no_state() -> None:
    router = new_router()
    replicas = fleet(router)
    first_calls = [await routed(router, replicas, pending(f"req-{i}")) for i in range(6)]
    dead = first_calls[0][0]
    on_dead = [result for replica, result in first_calls if replica is dead]
    # The replica dies: Serve removes it, and the app retries its requests (new calls, same
    # request ids) on the survivor while the old calls' results fail.
    router.update_replicas([r for r in replicas if r is not dead])
    survivors = [r for r in replicas if r is not dead]
    retries = [
        await routed(router, survivors, pending(f"req-{i}", call_id=f"retry-{i}"))
        for i, (replica, _) in enumerate(first_calls)
        if replica is dead
    ]
    for result in on_dead:
        result.complete()
    for _, result in first_calls:
        result.complete()
    for _, result in retries:
        result.complete()
    await settle()
    assert router.tracked_requests() == IDLE
    assert_in_flight_matches(router)


async def test_a_call_routed_to_a_replica_that_just_left_leaves_no_policy_state() -> None:
    """Serve awaits between choosing a replica and the routed notice; a scale-down in between
    removed the replica, and the notice re-created its load and index entries in the policy
    (one more per scale-down, never removed, and the index kept matching the replica)."""
    router = new_router()
    replicas = fleet(router)
    request = pending("late")
    groups = await router.choose_replicas(replicas, request)
    gone = groups[0][0]
    router.update_replicas([r for r in replicas if r.replica_id != gone.replica_id])
    result = FakeResult()
    router.on_request_routed(request, gone.replica_id, result)  # type: ignore[arg-type]
    policy = router._policy
    assert gone.replica_id.unique_id not in policy._loads  # type: ignore[attr-defined]
    assert gone.replica_id.unique_id not in policy.index.held  # type: ignore[attr-defined]
    assert router.tracked_requests() == {"pending": 0, "routed": 1, "policy": 0}
    result.complete()
    await settle()
    assert router.tracked_requests() == IDLE


async def test_the_tracked_requests_are_published_after_the_last_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("deployments.routing.serve_router._PUBLISH_PERIOD_S", 0.01)
    router = new_router()
    published: dict[str, float] = {}
    monkeypatch.setattr(
        router._tracked, "set", lambda value, tags: published.__setitem__(tags["kind"], value)
    )
    replicas = fleet(router)
    _, result = await routed(router, replicas, pending("a"))
    await asyncio.sleep(0.05)
    assert published == {"pending": 0, "routed": 1, "policy": 1}
    result.complete()
    await asyncio.sleep(0.05)
    assert published == IDLE


# ---- tracing: the decision as a `route` span (a no-op when tracing is off) ---------------------


async def test_the_route_span_records_the_decision() -> None:
    exporter = InMemorySpanExporter()
    router = new_router()
    router._tracer = tracer(
        tracer_provider(TracingConfig(), "router", SimpleSpanProcessor(exporter))
    )
    replicas = fleet(router)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    request = pending("traced", trace_context={"traceparent": parent})
    chosen, _ = await routed(router, replicas, request)
    untraced = pending("untraced")  # no trace context: no span
    await routed(router, replicas, untraced)
    [span] = exporter.get_finished_spans()
    assert span.name == "route" and span.parent is not None
    assert span.parent.span_id == 0xB7AD6B7169203331
    attributes = span.attributes or {}
    assert attributes["llm.routing.policy"] == "cache_load"
    assert set(attributes["llm.routing.candidates"]) == {"r0", "r1"}  # type: ignore[arg-type]
    assert attributes["llm.replica"] == chosen.replica_id.unique_id
    assert attributes["llm.routing.predicted_cached_blocks"] == 0
