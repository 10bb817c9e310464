"""`inference-cluster` commands without Ray: the checks and shutdown paths around it."""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from cluster import cli, k8s_render, runtime
from cluster.cli import EXIT_CONFIG, main
from cluster.config import HTTPConfig
from deployments.llm_server import LLMServer

MODEL = {
    "name": "m",
    "engine": "simulated",
    "source": "/tmp/tok",
    "device": "cpu",
    "max_model_len": 1024,
}


def write_config(tmp_path: Path, **model: object) -> Path:
    path = tmp_path / "c.yaml"
    # A short deploy timeout: a `serve` that missed a stop request fails fast with exit 3.
    path.write_text(yaml.safe_dump({"models": [MODEL | model], "ray": {"deploy_timeout_s": 1}}))
    return path


@pytest.fixture
def signal_handlers() -> Iterator[None]:
    """`serve` installs its own SIGINT/SIGTERM handlers: give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--port", "70000"),
        ("--port", "-1"),
        ("--port", "0"),
        ("--host", "http://0.0.0.0"),
        ("--host", "10.0.0.1:8000"),
        ("--host", ""),
    ],
)
def test_serve_refuses_a_bad_listen_address_before_starting_ray(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    option: str,
    value: str,
) -> None:
    def start_ray(config: object) -> None:
        raise AssertionError(f"Ray started with an invalid {option}")

    monkeypatch.setattr(runtime, "start_ray", start_ray)
    assert main(["serve", "--config", str(write_config(tmp_path)), option, value]) == EXIT_CONFIG
    assert f"{option.removeprefix('--')}:" in capsys.readouterr().err


def test_serve_refuses_a_port_in_use_before_starting_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another process on the port: exit 2 with the reason, not Ray's traceback from the
    ingress failing to bind it (exit 1) after the deploy began."""
    monkeypatch.setattr(runtime, "start_ray", lambda config: pytest.fail("Ray started"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        argv = ["serve", "--config", str(write_config(tmp_path)), "--host", "127.0.0.1"]
        assert main([*argv, "--port", port]) == EXIT_CONFIG
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def controller_does_not_answer(timeout_s: float) -> None:
    """Serve's controller hung (or slow): a bounded call to it times out."""
    raise ray.exceptions.GetTimeoutError("no answer within 5 s")


def fake_serve(monkeypatch: pytest.MonkeyPatch, app_status: str) -> list[str]:
    """`serve` without Ray: the app reports `app_status`, a SIGTERM arrives once it is submitted,
    and the returned list records Serve's and Ray's shutdowns in order."""
    shut_down: list[str] = []
    app = types.SimpleNamespace(status=app_status, message="", deployments={})
    monkeypatch.setattr(runtime, "start_ray", lambda config: None)
    monkeypatch.setattr(runtime, "alive_node_resources", lambda: [{"CPU": 8.0}])
    monkeypatch.setattr(runtime, "build_app", lambda app_config: None)
    monkeypatch.setattr(runtime.internal_kv, "_internal_kv_del", lambda *a, **k: None)
    monkeypatch.setattr(runtime.serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(runtime.serve, "_run", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setattr(
        runtime,
        "serve_status",
        lambda timeout_s: types.SimpleNamespace(applications={runtime.APP_NAME: app}),
    )
    monkeypatch.setattr(runtime, "check_ray_alive", lambda: None)
    monkeypatch.setattr(runtime.serve, "shutdown", lambda: shut_down.append("serve"))
    monkeypatch.setattr(runtime.serve, "delete", lambda name: shut_down.append(f"delete {name}"))
    monkeypatch.setattr(runtime.ray, "shutdown", lambda: shut_down.append("ray"))
    return shut_down


def test_sigterm_during_the_deploy_wait_stops_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signal_handlers: None
) -> None:
    """A SIGTERM while replicas start ends `serve` cleanly (exit 0, Serve and Ray shut down),
    not after deploy_timeout_s with a deploy error (exit 3)."""
    # The signal arrives once the app is submitted, while `serve` waits for its replicas.
    shut_down = fake_serve(monkeypatch, app_status="DEPLOYING")

    # A port of its own: the default (8000) may be taken by a `serve` running on this machine.
    port = str(runtime.free_port())
    assert main(["serve", "--config", str(write_config(tmp_path)), "--port", port]) == 0
    assert shut_down == ["serve", "ray"]


def test_a_second_signal_during_the_drain_stops_serve_at_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signal_handlers: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The first SIGTERM drains; a second one stops without waiting for the drain: exit 130
    with a line saying so (it was a KeyboardInterrupt traceback), Serve and Ray still shut down."""
    shut_down = fake_serve(monkeypatch, app_status="RUNNING")
    monkeypatch.setattr(runtime, "start_draining", lambda: None)

    def drain(timeout_s: float) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the second signal did not stop the drain")

    monkeypatch.setattr(runtime, "drain", drain)

    port = str(runtime.free_port())
    assert main(["serve", "--config", str(write_config(tmp_path)), "--port", port]) == 130
    assert shut_down == ["serve", "ray"]
    assert "stopping at once (a second signal)" in capsys.readouterr().err


def test_signals_during_the_shutdown_cut_serves_short_but_not_rays(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signal_handlers: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C again while Serve shuts down: Ray still stops (it raised a KeyboardInterrupt
    traceback past Ray's stop); one during Ray's stop is ignored, so that it finishes."""
    shut_down = fake_serve(monkeypatch, app_status="RUNNING")
    monkeypatch.setattr(runtime, "start_draining", lambda: None)
    monkeypatch.setattr(runtime, "drain", lambda timeout_s: 0)

    def interrupted(name: str) -> Callable[[], None]:
        def shutdown() -> None:
            os.kill(os.getpid(), signal.SIGINT)
            shut_down.append(name)  # reached only when the signal did not interrupt

        return shutdown

    monkeypatch.setattr(runtime.serve, "shutdown", interrupted("serve"))
    monkeypatch.setattr(runtime.ray, "shutdown", interrupted("ray"))
    port = str(runtime.free_port())
    assert main(["serve", "--config", str(write_config(tmp_path)), "--port", port]) == 0
    assert shut_down == ["ray"]
    assert "stopping at once (a second signal): Ray's stop ends the replicas" in (
        capsys.readouterr().err
    )


def test_serve_on_a_joined_cluster_deletes_only_its_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signal_handlers: None
) -> None:
    """With --address the cluster is shared: stopping takes down this app, not Serve and the
    other apps on it (serve.shutdown() did)."""
    shut_down = fake_serve(monkeypatch, app_status="DEPLOYING")
    argv = ["serve", "--config", str(write_config(tmp_path)), "--address", "ray://elsewhere:10001"]
    assert main(argv) == 0
    assert shut_down == [f"delete {runtime.APP_NAME}", "ray"]


def test_the_ready_banner_on_a_joined_cluster_gives_its_running_serves_port(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signal_handlers: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """serve.start() applies no http_options to a Serve already running on a joined cluster: the
    banner gives the port its proxies listen on, not --port."""
    fake_serve(monkeypatch, app_status="RUNNING")
    monkeypatch.setattr(runtime, "start_draining", lambda: None)
    monkeypatch.setattr(runtime, "drain", lambda timeout_s: 0)
    running = types.SimpleNamespace(http_options=types.SimpleNamespace(host="0.0.0.0", port=28700))
    monkeypatch.setattr(runtime, "_serve_instance", lambda timeout_s: running)
    argv = ["serve", "--config", str(write_config(tmp_path)), "--address", "10.0.0.1:6379"]
    assert main([*argv, "--port", "8123"]) == 0
    out = capsys.readouterr().out
    assert "note: Serve already ran on this cluster, listening on 0.0.0.0:28700" in out
    assert "ready in" in out and "http://127.0.0.1:28700/v1" in out and ":8123" not in out


def test_a_slow_controller_leaves_the_banner_on_the_requested_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The controller did not answer in time once the app ran: the banner shows --port, as before
    (a GetTimeoutError escaped, and the freshly deployed app was deleted with a traceback)."""

    monkeypatch.setattr(runtime, "_serve_instance", controller_does_not_answer)
    requested = HTTPConfig(host="127.0.0.1", port=8123)
    assert runtime.ingress_options(requested) == requested


def test_serve_reports_the_app_turning_unhealthy_and_running_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signal_handlers: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A replica that fails its health check once the app runs is printed, and so is Serve's
    replacement of it (`serve` said nothing: the operator saw only the clients' errors)."""
    fake_serve(monkeypatch, app_status="RUNNING")
    monkeypatch.setattr(cli, "RAY_CHECK_INTERVAL_S", 0.01)
    monkeypatch.setattr(runtime.serve, "_run", lambda *a, **k: None)
    monkeypatch.setattr(runtime, "start_draining", lambda: None)
    monkeypatch.setattr(runtime, "drain", lambda timeout_s: 0)
    replica_failed = types.SimpleNamespace(
        status="UNHEALTHY",
        message="The deployments ['LLMServer:m'] are UNHEALTHY.",
        deployments={
            "LLMServer:m": types.SimpleNamespace(
                status="UNHEALTHY",
                replica_states={"RUNNING": 1, "STARTING": 1},
                message="A replica's health check failed.",
            )
        },
    )
    running = types.SimpleNamespace(status="RUNNING", message="", deployments={})
    # The deploy wait, two polls while serving, the replacement, then running on.
    answers = iter([running, replica_failed, replica_failed, running])
    monkeypatch.setattr(
        runtime,
        "serve_status",
        lambda timeout_s: types.SimpleNamespace(
            applications={runtime.APP_NAME: next(answers, running)}
        ),
    )
    checks = itertools.count(1)

    def sigterm_after_five_idle_checks() -> None:
        if next(checks) == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(runtime, "check_ray_alive", sigterm_after_five_idle_checks)
    port = str(runtime.free_port())
    assert main(["serve", "--config", str(write_config(tmp_path)), "--port", port]) == 0
    lines = capsys.readouterr().out.splitlines()
    health = [line for line in lines if line.startswith("app ")]
    assert health == [
        "app unhealthy: LLMServer:m: unhealthy (1 running, 1 starting) - A replica's health "
        "check failed.",
        "app running again",
    ]


# How an app leaves the cluster under `serve`, and what `serve` then says.
TAKEN_OFF = {"controller killed": "Serve was shut down", "app deleted": "application was deleted"}


def taken_off_after(monkeypatch: pytest.MonkeyPatch, statuses: list[str], how: str) -> None:
    """Serve's controller reports the app in `statuses`, one per call, then the app is off the
    cluster: the controller killed (`serve shutdown`), or the app deleted."""
    answers = iter(statuses)

    def serve_status(timeout_s: float) -> types.SimpleNamespace:
        if (status := next(answers, None)) is not None:
            app = types.SimpleNamespace(status=status, message="", deployments={})
            return types.SimpleNamespace(applications={runtime.APP_NAME: app})
        if how == "controller killed":
            raise ray.exceptions.RayActorError()
        return types.SimpleNamespace(applications={})

    monkeypatch.setattr(runtime, "serve_status", serve_status)


@pytest.mark.parametrize("joined", [False, True])
@pytest.mark.parametrize("how", sorted(TAKEN_OFF))
def test_an_app_taken_off_the_cluster_ends_serve(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signal_handlers: None,
    capsys: pytest.CaptureFixture[str],
    joined: bool,
    how: str,
) -> None:
    """`serve shutdown` (or a delete) from another driver while `serve` serves: it says so and
    exits 1, and leaves a joined cluster's Serve alone (the health check let the controller's
    ActorDiedError escape as a traceback)."""
    shut_down = fake_serve(monkeypatch, app_status="RUNNING")
    if how == "controller killed":  # the app's delete on a joined cluster meets it too

        def delete(name: str) -> None:
            raise ray.exceptions.RayActorError()

        monkeypatch.setattr(runtime.serve, "delete", delete)
    monkeypatch.setattr(cli, "RAY_CHECK_INTERVAL_S", 0.01)
    monkeypatch.setattr(runtime.serve, "_run", lambda *a, **k: None)
    monkeypatch.setattr(runtime, "_serve_instance", lambda timeout_s: None)  # the banner's call
    taken_off_after(monkeypatch, ["RUNNING", "RUNNING"], how)  # the deploy wait, one check
    checks = itertools.count(1)

    def sigterm_if_still_serving() -> None:  # a `serve` that missed it must not run forever
        if next(checks) == 50:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(runtime, "check_ray_alive", sigterm_if_still_serving)
    argv = ["serve", "--config", str(write_config(tmp_path))]
    argv += ["--address", "10.0.0.1:6379"] if joined else ["--port", str(runtime.free_port())]
    assert main(argv) == 1
    if not joined:
        assert shut_down == ["serve", "ray"]
    elif how == "app deleted":  # Serve's delete of a missing app does nothing
        assert shut_down == [f"delete {runtime.APP_NAME}", "ray"]
    else:  # the killed controller's error is not raised past the delete
        assert shut_down == ["ray"]
    assert TAKEN_OFF[how] in capsys.readouterr().err


@pytest.mark.parametrize("how", sorted(TAKEN_OFF))
def test_an_app_taken_off_the_cluster_during_the_deploy_wait_is_a_deploy_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signal_handlers: None,
    capsys: pytest.CaptureFixture[str],
    how: str,
) -> None:
    """The killed controller's ActorDiedError escaped as a traceback; a deleted app was waited
    for until deploy_timeout_s, as "waiting for the application to start"."""
    shut_down = fake_serve(monkeypatch, app_status="DEPLOYING")
    monkeypatch.setattr(runtime.serve, "_run", lambda *a, **k: None)
    taken_off_after(monkeypatch, ["DEPLOYING"], how)
    argv = ["serve", "--config", str(write_config(tmp_path)), "--port", str(runtime.free_port())]
    assert main(argv) == cli.EXIT_DEPLOY
    assert TAKEN_OFF[how] in capsys.readouterr().err
    assert shut_down == ["serve", "ray"]


def ray_lost() -> None:
    raise runtime.RayStopped("Ray's GCS did not answer for 20 s")


@pytest.mark.parametrize("phase", ["deploy wait", "serving", "drain"])
def test_ray_stopped_under_serve_ends_it_with_exit_1_and_a_hint(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signal_handlers: None,
    capsys: pytest.CaptureFixture[str],
    phase: str,
) -> None:
    """Ray's processes stopped under `serve` (a SIGTERM to its whole process group, the OOM
    killer): it says so and exits 1, skipping Serve's shutdown, which would wait for the lost GCS
    until Ray's core worker ended the process 60 s later, before HAProxy was stopped."""
    shut_down = fake_serve(
        monkeypatch, app_status="DEPLOYING" if phase == "deploy wait" else "RUNNING"
    )
    monkeypatch.setattr(cli, "RAY_CHECK_INTERVAL_S", 0.01)
    if phase == "serving":  # no signal: `serve` finds out by itself while it serves
        monkeypatch.setattr(runtime.serve, "_run", lambda *a, **k: None)
    monkeypatch.setattr(runtime, "check_ray_alive", ray_lost)
    port = str(runtime.free_port())
    assert main(["serve", "--config", str(write_config(tmp_path)), "--port", port]) == 1
    assert shut_down == ["ray"]
    err = capsys.readouterr().err
    assert "did not answer for 20 s; requests in flight were lost" in err
    assert "KillMode=mixed" in err


class LostGcs:
    def __init__(self, answers_after: int | None = None) -> None:
        self.calls = 0
        self.answers_after = answers_after

    def internal_kv_get(self, key: bytes, namespace: bytes, timeout: float) -> None:
        self.calls += 1
        assert timeout == runtime.STATUS_TIMEOUT_S
        if self.answers_after is None or self.calls <= self.answers_after:
            raise ray.exceptions.RpcError("Timed out while waiting for GCS to become available.")


def test_check_ray_alive_takes_the_local_ray_for_stopped_after_a_silent_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gcs = LostGcs(answers_after=2)
    monkeypatch.setattr(runtime.internal_kv, "internal_kv_get_gcs_client", lambda: gcs)
    monkeypatch.setattr(runtime.time, "sleep", lambda s: None)
    monkeypatch.setattr(runtime, "_local_ray", True)
    monkeypatch.setattr(runtime, "_gcs_silent_since", None)
    runtime.check_ray_alive()  # a stall shorter than GCS_LOST_AFTER_S is not a stop
    assert gcs.calls == 3

    gcs = LostGcs()
    monkeypatch.setattr(runtime, "GCS_LOST_AFTER_S", 0.0)
    with pytest.raises(runtime.RayStopped, match="did not answer for 0 s"):
        runtime.check_ray_alive()
    with pytest.raises(runtime.RayStopped):  # once lost, lost: no more 20 s waits
        runtime.check_ray_alive()
    assert gcs.calls == 1


def test_a_check_cut_short_by_a_signal_does_not_restart_the_silent_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second Ctrl-C during the check ends it; the check before Serve's shutdown then goes on
    from when the GCS fell silent (it waited a whole new window: a second signal made the stop
    slower than one)."""
    clock = [100.0]
    monkeypatch.setattr(runtime.internal_kv, "internal_kv_get_gcs_client", LostGcs)
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(runtime, "_local_ray", True)
    monkeypatch.setattr(runtime, "_gcs_silent_since", None)

    def signal_during_the_wait(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime.time, "sleep", signal_during_the_wait)
    with pytest.raises(KeyboardInterrupt):
        runtime.check_ray_alive()
    clock[0] += runtime.GCS_LOST_AFTER_S
    with pytest.raises(runtime.RayStopped):
        runtime.check_ray_alive()


def test_check_ray_alive_leaves_a_joined_cluster_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A joined cluster's GCS is not ours: a slow one is not a stopped one (and Ray Client has
    no GCS client at all)."""
    monkeypatch.setattr(runtime.internal_kv, "internal_kv_get_gcs_client", lambda: None)
    monkeypatch.setattr(runtime, "_local_ray", False)
    runtime.check_ray_alive()


def test_stop_ray_stops_a_haproxy_left_running_from_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HAProxy of a Ray that stopped under `serve` kept serving its port: stop_ray ends the
    HAProxy processes started from the run's folder (one that ignores SIGTERM too), and no
    other process: not another run's HAProxy, nor a `tail -f` of a log in the folder."""
    folder = tmp_path / "haproxy-run"
    folder.mkdir()
    haproxy = tmp_path / "bin" / "haproxy"  # a process named haproxy
    haproxy.parent.mkdir()
    haproxy.symlink_to(sys.executable)
    sleep = "import time; time.sleep(60)"
    ignores_sigterm = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + sleep
    orphans = [
        subprocess.Popen([haproxy, "-c", sleep, "-f", f"{folder}/node/haproxy.cfg"]),
        subprocess.Popen([haproxy, "-c", ignores_sigterm, str(folder)]),
    ]
    bystanders = [
        subprocess.Popen([haproxy, "-c", sleep, "-f", f"{folder}def/node/haproxy.cfg"]),
        subprocess.Popen([sys.executable, "-c", sleep, f"{folder}/admin.sock.1.stdout.log"]),
    ]
    monkeypatch.setattr(runtime.ray, "shutdown", lambda: None)
    monkeypatch.setattr(runtime, "_haproxy_folder", folder)
    time.sleep(0.5)  # the second one has set its handler
    try:
        runtime.stop_ray()
        for process in orphans:  # already reaped by stop_ray (psutil), else a TimeoutExpired
            process.wait(timeout=1)
        assert [process.poll() for process in bystanders] == [None, None]
        assert not folder.exists()
    finally:
        for process in [*orphans, *bystanders]:
            process.kill()
            process.wait()


def test_a_controller_that_does_not_answer_bounds_the_deploy_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Serve's controller hung: the wait still ends at its deadline with the reason, and a stop
    still ends it at once (serve.status() waited for the controller forever)."""

    monkeypatch.setattr(runtime, "serve_status", controller_does_not_answer)
    monkeypatch.setattr(runtime, "_local_ray", False)  # a joined cluster: its GCS is not checked
    progress: list[str] = []
    with pytest.raises(runtime.DeployError, match="controller did not answer within 5 s"):
        runtime.wait_until_running(0.0, progress.append, threading.Event())
    stop = threading.Event()
    stop.set()
    assert runtime.wait_until_running(60.0, progress.append, stop) is False
    # On the local Ray, a controller that does not answer may be all of Ray gone (OOM killer):
    # said at once, not after deploy_timeout_s or Ray's own exit 60 s later.
    monkeypatch.setattr(runtime, "check_ray_alive", ray_lost)
    with pytest.raises(runtime.RayStopped):
        runtime.wait_until_running(60.0, progress.append, threading.Event())


def test_status_says_when_the_controller_does_not_answer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(runtime, "serve_status", controller_does_not_answer)
    assert main(["status"]) == 3
    assert "Serve's controller did not answer: no answer within 5 s" in capsys.readouterr().err


class _KVLog:
    def extend(self, events: list[Any]) -> None:
        pass

    def window(self, with_snapshot: bool) -> dict[str, bool]:
        return {"snapshot": with_snapshot}


class _StatsOnlyServer(LLMServer):
    """An LLMServer's stats state, without an engine process or Ray."""

    def __init__(self, kv_snapshot_every: int) -> None:
        stats = types.SimpleNamespace(model_dump=lambda: {"num_running": 0, "num_waiting": 0})
        self._kv_log = _KVLog()
        self._stats_version = 0
        self._engine = types.SimpleNamespace(drain_kv_events=lambda: [], stats=lambda: stats)
        self._model = types.SimpleNamespace(
            routing=types.SimpleNamespace(kv_snapshot_every=kv_snapshot_every)
        )
        self._telemetry = types.SimpleNamespace(stats=lambda s: None)
        self._predictions = types.SimpleNamespace(totals=lambda: {"predicted_cached_tokens": 0})

    def __del__(self) -> None:
        """No engine to shut down."""


class _ReplicaActor:
    """Ray Serve's replica actor around `server`: its routing-stats call, and its entry point
    for handle calls, which runs the method the request metadata names."""

    def __init__(self, server: LLMServer) -> None:
        self.record_routing_stats = types.SimpleNamespace(
            remote=lambda: asyncio.run(server.record_routing_stats())
        )
        self.handle_request = types.SimpleNamespace(
            remote=lambda metadata: asyncio.run(
                getattr(server, pickle.loads(metadata).call_method)()
            )
        )


def test_status_leaves_the_routers_kv_snapshot_turns_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every kv_snapshot_every-th record_routing_stats call carries the KV snapshot that a
    restarted router waits for: `status` and the drain loop must not take one of those turns."""
    server = _StatsOnlyServer(kv_snapshot_every=3)
    monkeypatch.setattr(runtime.ray, "get_actor", lambda name, namespace: _ReplicaActor(server))
    monkeypatch.setattr(runtime.ray, "get", lambda result, timeout: result)

    polls = []
    for _ in range(7):
        polls.append(asyncio.run(server.record_routing_stats()))  # Serve's controller
        status = runtime._replica_stats("SERVE_REPLICA::inference-cluster#LLMServer-m#a", 1.0)
        assert status.stats == {"num_running": 0, "num_waiting": 0}, status.error
        assert status.predictions == {"predicted_cached_tokens": 0}
    assert [p["version"] for p in polls] == list(range(1, 8))
    assert [p["kv_events"]["snapshot"] for p in polls] == [i % 3 == 0 for i in range(7)]


def test_render_k8s_writes_paths_under_home_for_the_pods_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Loading the config expands `~` to the renderer's home; the pods have their own."""
    monkeypatch.setenv("HOME", "/home/alice")
    config = write_config(tmp_path, source="~/models/X", tokenizer="/home/alice/tok")
    assert main(["render-k8s", "--config", str(config)]) == 0
    patch = yaml.safe_load(capsys.readouterr().out)
    serve_config = yaml.safe_load(patch["spec"]["serveConfigV2"])
    model = serve_config["applications"][0]["args"]["models"][0]
    assert (model["source"], model["tokenizer"]) == ("~/models/X", "~/tok")


def test_render_k8s_without_the_repository_base_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Installed from a wheel there is no k8s/ folder: say so instead of a traceback."""
    monkeypatch.setattr(k8s_render, "BASE_RAYSERVICE", tmp_path / "k8s" / "rayservice.yaml")
    assert main(["render-k8s", "--config", str(write_config(tmp_path))]) == EXIT_CONFIG
    assert "checkout" in capsys.readouterr().err
