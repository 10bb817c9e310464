"""Chaos harness: load from `loadtest` while a fault happens, and the invariants of issue 7.

Invariants checked after every fault:
- no request failed that had not started streaming (the client never saw the fault);
- every stream ended with [DONE] or an error event (never cut, never hung);
- every engine's running and waiting counts return to 0;
- the fleet returns to its target size, every replica RUNNING;
- no routing state leaked: every live router's router_tracked_requests returns to 0
  (tests/integration/conftest.py: wait_for_no_routing_state).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import ray

from cluster import runtime
from loadtest.arrivals import ArrivalPlan
from loadtest.client import run_load
from loadtest.spec import RequestRecord, Session, Turn

# What LoadClient writes when a stream ended without [DONE] or an error event.
_CUT_STREAM = "the stream ended without [DONE]"


@dataclass
class ChaosCounts:
    requests: int = 0
    ok: int = 0
    failed_before_streaming: list[str] = field(default_factory=list)
    streams_started: int = 0
    streams_clean: int = 0
    streams_cut: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"requests={self.requests} ok={self.ok} "
            f"failed_before_streaming={len(self.failed_before_streaming)} "
            f"streams clean={self.streams_clean}/{self.streams_started} "
            f"cut={len(self.streams_cut)}"
        )


def classify(records: list[RequestRecord]) -> ChaosCounts:
    counts = ChaosCounts(requests=len(records))
    for record in records:
        counts.ok += record.ok
        started = bool(record.token_times_s)
        if not started:
            if not record.ok:
                counts.failed_before_streaming.append(f"{record.status}: {record.error}")
            continue
        counts.streams_started += 1
        error = record.error or ""
        # An httpx error ("RemoteProtocolError: ...") or a timeout means the stream was cut or
        # hung; any other error is the text of an error event the server sent.
        cut = error == _CUT_STREAM or error.startswith("timed out") or _is_httpx_error(error)
        if cut:
            counts.streams_cut.append(error)
        else:
            counts.streams_clean += 1
    return counts


def _is_httpx_error(error: str) -> bool:
    name = error.split(":", 1)[0]
    return isinstance(getattr(httpx, name, None), type)


def sessions(count: int, prompt_len: int, output_len: int, seed: int) -> list[Session]:
    rng = random.Random(seed)
    return [
        Session(
            f"chaos-{seed}-{i}",
            (Turn(tuple(rng.randrange(10, 3000) for _ in range(prompt_len)), output_len),),
        )
        for i in range(count)
    ]


async def load_during(
    base_url: str,
    fault: Callable[[], Awaitable[None]],
    *,
    count: int,
    rate: float,
    output_len: int,
    seed: int,
    model: str = "sim",
) -> tuple[ChaosCounts, list[RequestRecord]]:
    """`count` streaming completions at `rate`/s (Poisson) while `fault` runs."""
    load = asyncio.create_task(
        run_load(
            base_url,
            model,
            sessions(count, prompt_len=64, output_len=output_len, seed=seed),
            ArrivalPlan("poisson", rate=rate),
            endpoint="completions",
            progress=False,
            timeout_s=120,
            seed=seed,
        )
    )
    await fault()
    records = (await load).records
    return classify(records), records


def replica_actors(deployment_prefix: str) -> list[str]:
    return [
        name
        for name in runtime._replica_actor_names()
        if name.startswith(f"SERVE_REPLICA::{runtime.APP_NAME}#{deployment_prefix}")
    ]


def kill_actor(name: str) -> None:
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def wait_for_fleet(targets: dict[str, int], timeout_s: float = 120) -> None:
    """Until each deployment (by name prefix) has exactly its target of RUNNING replicas."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = runtime.cluster_status()
        sizes = {
            prefix: sum(
                d.replica_states.get("RUNNING", 0) for d in statuses if d.name.startswith(prefix)
            )
            for prefix in targets
        }
        settled = all(d.replica_states.keys() <= {"RUNNING"} for d in statuses)
        if sizes == targets and settled:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"fleet not back to {targets} in {timeout_s} s: {statuses}")
        time.sleep(1.0)


def wait_for_idle_engines(timeout_s: float = 30) -> list[tuple[int, int]]:
    """Every LLMServer replica's (running, waiting) once all are (0, 0); fails after timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = [
            (r.stats["num_running"], r.stats["num_waiting"])
            for d in runtime.cluster_status()
            if d.name.startswith("LLMServer")
            for r in d.replicas
            if r.stats is not None
        ]
        if counts and all(c == (0, 0) for c in counts):
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"engines still busy after {timeout_s} s: {counts}")
        time.sleep(0.5)
