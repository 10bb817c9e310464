"""Chaos on the embedded default (2 vLLM CPU replicas): the EngineCore process inside one replica
is killed under load. Its replica's health check fails, Serve replaces it, and meanwhile the
requests it held end cleanly and new ones go to the live replica (`make test-chaos`)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from cluster.config import default_config_path, load_config
from tests.chaos.harness import (
    load_during,
    replica_actors,
    wait_for_fleet,
    wait_for_idle_engines,
)
from tests.e2e.conftest import deployed

pytestmark = pytest.mark.chaos
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def default_cluster() -> Iterator[str]:
    yield from deployed(load_config(default_config_path()))


def engine_core_pids() -> list[int]:
    """This test's vLLM engine processes (vLLM titles them `VLLM::EngineCore`): descendants of
    this process, which started Ray (raylet -> replica worker -> EngineCore)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    parents = {int(r[0]): int(r[1]) for r in rows if len(r) >= 2}
    engines = [int(r[0]) for r in rows if len(r) == 3 and r[2].startswith("VLLM::EngineCore")]
    return [pid for pid in engines if _descends_from(pid, os.getpid(), parents)]


def _descends_from(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    while pid > 1:
        pid = parents.get(pid, 0)
        if pid == ancestor:
            return True
    return False


async def test_kill_the_engine_process_inside_a_replica(default_cluster: str) -> None:
    pids = engine_core_pids()
    assert len(pids) == 2, pids  # one engine per replica

    before = set(replica_actors("LLMServer"))

    async def fault() -> None:
        await asyncio.sleep(3.0)
        os.kill(pids[0], signal.SIGKILL)

    counts, _ = await load_during(
        default_cluster, fault, count=60, rate=4, output_len=64, seed=4, model=MODEL
    )
    print(counts.summary())
    assert not counts.failed_before_streaming, counts.failed_before_streaming[:5]
    assert not counts.streams_cut, counts.streams_cut[:5]
    assert counts.ok > 0
    # Serve's health check (every 10 s) fails on the dead engine and a new replica starts
    # (another engine start: a minute or two here).
    deadline = time.monotonic() + 400
    # Replaced: one of the two replicas is a new actor, with its own new engine.
    while len(set(replica_actors("LLMServer")) & before) != 1 or len(engine_core_pids()) < 2:
        assert time.monotonic() < deadline, (replica_actors("LLMServer"), before)
        await asyncio.sleep(2)
    wait_for_fleet({"LLMServer": 2, "Router": 1}, timeout_s=400)
    wait_for_idle_engines()
    async with httpx.AsyncClient(base_url=default_cluster, timeout=60) as http:
        health = await http.get("/health")
    assert health.status_code == 200, health.text
