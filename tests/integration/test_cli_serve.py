"""`inference-cluster serve` as a user runs it: ready banner, a working curl, SIGTERM drains the
in-flight stream and then stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cluster import runtime
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration


def processes_in_session(sid: int) -> list[str]:
    """Live processes of a session: `serve` runs in its own, and Ray's processes inherit it."""
    out = subprocess.run(["ps", "-eo", "sid=,stat=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    return [row[2] for row in rows if len(row) == 3 and int(row[0]) == sid and "Z" not in row[1]]


def haproxy_folders() -> set[Path]:
    return set(Path("/tmp").glob(f"{runtime.HAPROXY_FOLDER_PREFIX}*"))


# Long enough (about 18 s on the simulated profile) that the drain is still waiting for it while
# the test probes for the 503s, and past two status calls that time out (5 s each) on its replica.
STREAM_TOKENS = 3000


def refused_while_draining(port: int) -> tuple[httpx.Response, httpx.Response]:
    """The first completion answered with something other than 200 after SIGTERM (the routers
    read the drain flag within a second), and /health then."""
    url = f"http://127.0.0.1:{port}"
    body = {"model": "sim", "prompt": "hi", "max_tokens": 1}
    deadline = time.monotonic() + 10
    while True:
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
        if response.status_code != 200 or time.monotonic() > deadline:
            return response, httpx.get(f"{url}/health", timeout=10)
        time.sleep(0.1)


def test_serve_answers_then_drains_and_stops_cleanly_on_sigterm(
    tmp_path: Path, embedded_model: Path
) -> None:
    port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "ray": {"num_cpus": 2, "include_dashboard": False},
                "router": {"cpus": 0.1},
                "models": [
                    {
                        "name": "sim",
                        "engine": "simulated",
                        "source": "embedded",
                        "device": "cpu",
                        "max_model_len": 4096,
                        "num_replicas": 2,
                        # The stream fills its replica: the drain must still see it (a status
                        # call waits for a free slot, and its timeout once counted as idle).
                        "max_ongoing_requests": 1,
                        "cpus_per_worker": 0.1,
                        "replica_cpus": 0.0,
                    }
                ],
            }
        )
    )
    haproxy_folders_before = haproxy_folders()
    process = subprocess.Popen(
        [sys.executable, "-m", "cluster", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 240
        for line in process.stdout:
            output.append(line)
            if line.startswith("Ctrl-C stops the cluster"):  # the banner's last line
                break
            assert time.monotonic() < deadline, "".join(output)
        assert any(line.startswith("ready in") for line in output), "".join(output)
        curl = next(line.strip() for line in output if line.strip().startswith("curl "))
        assert f"127.0.0.1:{port}/v1/chat/completions" in curl

        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
        assert any("raylet" in p for p in processes_in_session(process.pid))
        # HAProxy's files are in a folder of this run's (Ray's default is one per host).
        assert len(haproxy_folders() - haproxy_folders_before) == 1

        # SIGTERM (what Kubernetes sends) with a stream in flight: it finishes before the exit,
        # while new requests get a 503 with Retry-After and /health says draining.
        with (
            httpx.Client(timeout=60) as http,
            http.stream(
                "POST",
                f"http://127.0.0.1:{port}/v1/completions",
                json={"model": "sim", "prompt": "go", "max_tokens": STREAM_TOKENS, "stream": True},
            ) as stream,
        ):
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)
            refused, health = refused_while_draining(port)
            events = [first, *(line for line in lines if line.startswith("data: "))]
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "draining"
        assert refused.headers["retry-after"] == "5"
        assert health.status_code == 503 and health.json()["error"]["code"] == "draining"
        assert events[-1] == "data: [DONE]", events[-3:]
        assert len(events) > STREAM_TOKENS  # every token arrived (one chunk each, then [DONE])
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, "".join(output) + (
        process.stdout.read() if process.stdout else ""
    )
    deadline = time.monotonic() + 30
    while processes_in_session(process.pid) and time.monotonic() < deadline:
        time.sleep(1)
    leftovers = processes_in_session(process.pid)
    if leftovers:
        os.killpg(process.pid, signal.SIGKILL)
    assert leftovers == []
    assert haproxy_folders() - haproxy_folders_before == set()
