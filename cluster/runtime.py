"""Starting Ray, deploying the app onto it, and reading its state back.

The driver side of the cluster: nothing here runs inside a Serve replica.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import ray
from ray import serve
from ray.experimental import internal_kv
from ray.serve._private.common import RequestMetadata
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeInstanceDetails, ServeStatus

from cluster import ingress
from cluster.config import ClusterConfig, HTTPConfig
from deployments.app import build_app
from deployments.autoscaling import KV_NAMESPACE, decisions_key
from deployments.config import AppConfig, deployment_name
from deployments.placement import PlacementInfeasible, check_fits
from deployments.router import DRAIN_KEY, DRAIN_POLL_S

APP_NAME = "inference-cluster"
# How long a status call waits for a replica.
STATUS_TIMEOUT_S = 5.0
# How long the local Ray's GCS may stay silent before `serve` takes Ray for stopped: long enough
# for a stall on a loaded machine, short enough to stop cleanly before Ray's core worker ends the
# process 60 s after it lost the GCS.
GCS_LOST_AFTER_S = 20.0
# A local Ray's HAProxy folder, /tmp/haproxy-XXXXXXXX (see local_haproxy_env).
HAPROXY_FOLDER_PREFIX = "haproxy-"
_haproxy_folder: Path | None = None
# Whether start_ray started a local Ray (False: none yet, or a joined cluster, not ours to watch).
_local_ray = False
# Since when (time.monotonic()) the local Ray's GCS has not answered; None while it answers. Kept
# across calls, so that a check cut short by a signal does not start the window again, and so
# that a GCS silent for GCS_LOST_AFTER_S stays lost without another call.
_gcs_silent_since: float | None = None


class DeployError(RuntimeError):
    """The app could not be deployed; the message says which deployment and why."""


class RayStopped(RuntimeError):
    """Ray's GCS no longer answers this driver: Ray's processes stopped under it."""


class AppGone(RuntimeError):
    """The app was taken off the cluster under `serve` (`serve shutdown`, a delete elsewhere)."""


def start_ray(config: ClusterConfig) -> None:
    """Join `ray.address`, or start a local Ray that ends with this process.

    A local Ray gets the ingress settings (cluster/ingress.py) through this process's
    environment, which its processes inherit; a joined cluster's nodes must have been started
    with them (the KubeRay manifests set them on every pod).
    """
    global _local_ray
    if config.ray.address is not None:
        ray.init(address=config.ray.address, logging_level=logging.WARNING)
        return
    os.environ.update(ingress.ray_env(config.ingress))
    if config.ingress.haproxy:
        os.environ.update(local_haproxy_env())
    # Logical CPUs are bookkeeping: on a laptop the demo's replicas may reserve more than there
    # are cores, and they still run (they are mostly idle between requests).
    num_cpus = config.ray.num_cpus or max(os.cpu_count() or 1, int(config.reserved_cpus() + 1))
    ray.init(
        # "local" always starts a new Ray: a bare ray.init() would silently join any cluster
        # another program left running on this machine (`ray start` or ray.cluster_utils).
        address="local",
        num_cpus=num_cpus,
        include_dashboard=config.ray.include_dashboard,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
    )
    _local_ray = True


def local_haproxy_env() -> dict[str, str]:
    """A local Ray's HAProxy gets free ports for its stats page and metrics, its fallback proxy
    (Serve's Python proxy, which HAProxy sends requests to while no Router replica runs) free
    ports too, and a folder of its own (removed by stop_ray). Ray's defaults (8404, 9101, 8500,
    9500, /tmp/haproxy-serve) are one per host: a second `serve` on the machine failed to bind
    the first two, shared 8500 with the first (the kernel split the fallback's connections
    between the two apps), and every run left its folder."""
    global _haproxy_folder
    # HAProxy refuses socket paths over 97 characters, and Ray adds a 56-character node id:
    # a short folder in /tmp, as Ray's own default (/tmp/haproxy-serve), not in $TMPDIR.
    _haproxy_folder = Path(tempfile.mkdtemp(prefix=HAPROXY_FOLDER_PREFIX, dir="/tmp"))
    paths = {
        "CONFIG_FILE_LOC": "haproxy.cfg",
        "SOCKET_PATH": "admin.sock",
        "SERVER_STATE_FILE": "server-state",
        "METRICS_SOCKET_PATH": "metrics.sock",
    }
    return {
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(_haproxy_folder),
        **{f"RAY_SERVE_HAPROXY_{name}": str(_haproxy_folder / f) for name, f in paths.items()},
    }


def free_port() -> int:
    """A TCP port no process listens on now (the OS's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop_ray() -> None:
    """Disconnect from Ray: a local Ray (start_ray) stops, and its HAProxy goes with its folder."""
    global _haproxy_folder, _local_ray, _gcs_silent_since
    ray.shutdown()
    _local_ray, _gcs_silent_since = False, None
    if _haproxy_folder is not None:
        _stop_orphaned_haproxy(_haproxy_folder)
        shutil.rmtree(_haproxy_folder, ignore_errors=True)
        _haproxy_folder = None


def _stop_orphaned_haproxy(folder: Path) -> None:
    """Stop the HAProxy processes that run from `folder`. Serve's HAProxy manager actor stops
    its HAProxy when Serve shuts down, but the HAProxy outlives a manager that Ray's own death
    took (a SIGTERM to the whole process group, as systemd sends by default): it kept serving
    --port and refused the next `serve`. None is left after a clean stop."""
    orphans = []
    for process in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            args = process.info["cmdline"] or ()
            # HAProxy itself, not e.g. an operator's `tail -f` of a log in the folder.
            if process.info["name"] == "haproxy" and any(
                Path(arg).is_relative_to(folder) for arg in args
            ):
                process.terminate()
                orphans.append(process)
    _, alive = psutil.wait_procs(orphans, timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def check_ray_alive() -> None:
    """RayStopped once the local Ray's GCS has not answered for GCS_LOST_AFTER_S (asked with
    bounded calls; returns at once while it answers).

    A SIGTERM to `serve`'s whole process group (systemd's default) reaches Ray's processes too,
    and the GCS stops answering. The driver's other Ray calls (listing actors, setting a flag,
    Serve's shutdown) would then wait until Ray's core worker ends the process with exit 1, 60 s
    later, before `serve` could stop HAProxy. Only the local Ray is watched: a joined cluster's
    processes are not ours, a slow GCS there is not a stopped one, and Ray Client has no GCS
    client."""
    global _gcs_silent_since
    if not _local_ray:
        return
    gcs = internal_kv.internal_kv_get_gcs_client()
    while not _gcs_lost():
        try:
            gcs.internal_kv_get(DRAIN_KEY.encode(), KV_NAMESPACE.encode(), timeout=STATUS_TIMEOUT_S)
            _gcs_silent_since = None
            return
        except ray.exceptions.RpcError:
            if _gcs_silent_since is None:
                _gcs_silent_since = time.monotonic()
            if not _gcs_lost():
                time.sleep(1.0)  # a GCS that is gone may refuse at once
    raise RayStopped(
        f"Ray's GCS did not answer for {GCS_LOST_AFTER_S:g} s: Ray's processes have stopped"
    )


def _gcs_lost() -> bool:
    return (
        _gcs_silent_since is not None and time.monotonic() - _gcs_silent_since >= GCS_LOST_AFTER_S
    )


def stop_app(joined: bool) -> None:
    """Take down what `serve` deployed, unless Ray stopped first (check_ray_alive).

    On the local Ray, Serve itself shuts down (each replica's __del__ stops its engine). On a
    cluster joined with --address only this app goes: Serve, its proxies and the other apps
    there are the cluster's (Serve's own `serve run` shuts all of Serve down). An app deleted
    from elsewhere already is no error: Serve's delete skips a missing app."""
    try:
        check_ray_alive()
    except RayStopped:
        return  # said where it was found; stop_ray ends what is left of the local Ray
    if joined:
        # A controller killed (`serve shutdown` from elsewhere) took the app with it.
        with contextlib.suppress(ray.exceptions.RayActorError):
            serve.delete(APP_NAME)
    else:
        serve.shutdown()


def alive_node_resources() -> list[dict[str, float]]:
    return [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]


def deploy(
    app_config: AppConfig,
    *,
    host: str,
    port: int,
    timeout_s: float,
    on_progress: Callable[[str], None] = lambda _: None,
    stop: threading.Event | None = None,
) -> bool:
    """Deploy the app and wait until every replica is ready (True), or until `stop` is set
    (False: the caller shuts down what started); raise DeployError saying why it failed."""
    try:
        check_fits(app_config.models, alive_node_resources())
    except PlacementInfeasible as exc:
        raise DeployError(f"cannot place the models on this Ray cluster: {exc}") from None
    # A cluster joined with --address may keep the flag of a previous `serve` that drained.
    internal_kv._internal_kv_del(DRAIN_KEY, namespace=KV_NAMESPACE)
    try:
        serve.start(http_options={"host": host, "port": port})
    except RuntimeError as exc:  # e.g. HAProxy could not bind a port another process took
        raise DeployError(f"cannot start the HTTP ingress on {host}:{port}: {exc}") from None
    # Non-blocking so that we can report progress and give up with a reason instead of hanging.
    serve._run(build_app(app_config), name=APP_NAME, route_prefix="/", _blocking=False)
    return wait_until_running(timeout_s, on_progress, stop or threading.Event())


def wait_until_running(
    timeout_s: float, on_progress: Callable[[str], None], stop: threading.Event
) -> bool:
    """True once the app runs, False as soon as `stop` is set (a Ctrl-C or SIGTERM must not wait
    out a deploy that can take deploy_timeout_s)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    seen = False  # the app was on the cluster: gone again, it was deleted
    while True:
        try:
            app = serve_status(STATUS_TIMEOUT_S).applications.get(APP_NAME)
        except ray.exceptions.GetTimeoutError:
            check_ray_alive()  # RayStopped if it is the whole local Ray that is gone (OOM killer)
            app, detail = None, f"Serve's controller did not answer within {STATUS_TIMEOUT_S:g} s"
        except ray.exceptions.RayActorError:  # the controller was killed: `serve shutdown`
            raise DeployError("Serve was shut down on this Ray cluster during the deploy") from None
        else:
            if (seen and app is None) or (app is not None and app.status == "DELETING"):
                raise DeployError("the application was deleted from this Ray cluster")
            seen = seen or app is not None
            detail = _pending_detail(app)
        status = app.status if app else "NOT_STARTED"
        if status == "RUNNING":
            return True
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise DeployError(f"deployment failed: {app.message if app else ''} {detail}".strip())
        if stop.is_set():
            return False
        if detail != last:
            on_progress(detail)
            last = detail
        if time.monotonic() > deadline:
            raise DeployError(f"not ready after {timeout_s:g} s: {detail}")
        stop.wait(1.0)


def serve_status(timeout_s: float) -> ServeStatus:
    """serve.status(), but GetTimeoutError when Serve's controller does not answer within
    timeout_s: serve.status() waits for it forever, and a hung controller held `serve` past its
    deploy timeout, deaf to SIGTERM."""
    instance = _serve_instance(timeout_s)
    return instance._get_status() if instance else ServeStatus()  # None: Serve has not started


def _serve_instance(timeout_s: float) -> ServeInstanceDetails | None:
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    details = ray.get(client._controller.get_serve_instance_details.remote(), timeout=timeout_s)
    return ServeInstanceDetails(**details)


def app_health(timeout_s: float = STATUS_TIMEOUT_S) -> str | None:
    """The app's health: "RUNNING", or its status with each deployment's (a replica that failed
    its health check makes its deployment UNHEALTHY until Serve has replaced it); None when
    Serve's controller did not answer within timeout_s. AppGone once the app is being deleted
    or is gone, or Serve's controller with it."""
    try:
        app = serve_status(timeout_s).applications.get(APP_NAME)
    except ray.exceptions.GetTimeoutError:
        return None
    except ray.exceptions.RayActorError:  # the controller was killed: `serve shutdown`
        raise AppGone("Serve was shut down on this Ray cluster") from None
    if app is None or app.status == "DELETING":
        raise AppGone("the application was deleted from this Ray cluster")
    if app.status == "RUNNING":
        return "RUNNING"
    return f"{str(getattr(app.status, 'value', app.status)).lower()}: {_pending_detail(app)}"


def ingress_options(requested: HTTPConfig) -> HTTPConfig:
    """The host and port Serve's proxies listen on. On a joined cluster where Serve already ran
    they are that Serve's: serve.start() applies no http_options to a running Serve, and the
    ready banner printed --port's URL where nothing listened."""
    try:
        instance = _serve_instance(STATUS_TIMEOUT_S)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
        return requested  # a slow (or killed) controller: the banner shows --port
    if instance is None or instance.http_options is None:
        return requested
    listening = {"host": instance.http_options.host, "port": instance.http_options.port}
    return requested.model_copy(update=listening)


def _pending_detail(app: Any) -> str:
    if app is None:
        return "waiting for the application to start"
    parts = []
    for name, deployment in app.deployments.items():
        states = ", ".join(f"{n} {s.lower()}" for s, n in deployment.replica_states.items())
        status = str(getattr(deployment.status, "value", deployment.status)).lower()
        line = f"{name}: {status} ({states or 'no replicas yet'})"
        if deployment.message:
            line += f" - {deployment.message}"
        parts.append(line)
    return "; ".join(parts)


@dataclass
class ReplicaStatus:
    replica: str  # the replica actor's name
    stats: dict[str, Any] | None
    error: str | None = None
    # The routers' predictions of this replica's cache vs what its engine found, in tokens
    # summed over the requests routed here (LLMServer.replica_status()["predictions"]).
    predictions: dict[str, int] | None = None


@dataclass
class DeploymentStatus:
    name: str
    status: str
    replica_states: dict[str, int]
    message: str
    replicas: list[ReplicaStatus]
    # The autoscaler's recent decisions, oldest first (empty when it never changed anything).
    decisions: list[dict[str, Any]] = field(default_factory=list)


def start_draining() -> None:
    """Every router answers new requests with a 503 (Retry-After) and /health with "draining"
    from now on; returns once each has read the flag (two of its poll periods)."""
    check_ray_alive()
    internal_kv._internal_kv_put(DRAIN_KEY, b"1", namespace=KV_NAMESPACE)
    time.sleep(2 * DRAIN_POLL_S)


def drain(timeout_s: float, poll_s: float = 0.5) -> int:
    """Wait until no replica of the app has a request (two polls in a row, so a request between
    a router and its replica is not missed), or until timeout_s; returns what is still busy.
    RayStopped when Ray's processes stop under the drain (they took the replicas with them)."""
    deadline = time.monotonic() + timeout_s
    idle_polls = 0
    while True:
        check_ray_alive()
        busy = ongoing_requests(max(0.1, min(STATUS_TIMEOUT_S, deadline - time.monotonic())))
        idle_polls = idle_polls + 1 if busy == 0 else 0
        if idle_polls >= 2 or time.monotonic() >= deadline:
            return busy
        time.sleep(poll_s)


def ongoing_requests(timeout_s: float) -> int:
    """Requests in the app's replicas: the routers' (HTTP requests, those held for a replica
    included) and the LLMServers' (engine calls). Asked of every replica at once through the
    replica actor's own counter, the one Serve's request router probes: it takes no request slot,
    so a full replica answers at once (replica_status waits for a slot like any request, and a
    saturated replica timed out into "idle"). A replica that does not answer within timeout_s
    counts as one request: unknown is not idle. A replica that is gone has nothing left."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#"
    counts: list[ray.ObjectRef] = []
    for name in _replica_actor_names():
        if name.startswith(prefix):
            with contextlib.suppress(ValueError):  # stopped since it was listed
                counts.append(
                    ray.get_actor(name, namespace="serve").get_num_ongoing_requests.remote()
                )
    answered, unanswered = ray.wait(counts, num_returns=len(counts), timeout=timeout_s)
    busy = len(unanswered)
    for count in answered:
        with contextlib.suppress(ray.exceptions.RayActorError):
            busy += int(ray.get(count))
    return busy


def cluster_status(timeout_s: float = STATUS_TIMEOUT_S) -> list[DeploymentStatus]:
    """Every deployment of the app, and for LLMServers each replica's engine stats."""
    app = serve_status(timeout_s).applications.get(APP_NAME)
    if app is None:
        return []
    replica_actors = _replica_actor_names()
    result = []
    for name, deployment in app.deployments.items():
        prefix = f"SERVE_REPLICA::{APP_NAME}#{name}#"
        is_llm_server = name.startswith(deployment_name(""))
        replicas = [
            _replica_stats(actor, timeout_s) if is_llm_server else ReplicaStatus(actor, None)
            for actor in replica_actors
            if actor.startswith(prefix)
        ]
        result.append(
            DeploymentStatus(
                name=name,
                status=str(getattr(deployment.status, "value", deployment.status)),
                replica_states={str(k): v for k, v in deployment.replica_states.items()},
                message=deployment.message,
                replicas=replicas,
                decisions=autoscaling_decisions(name),
            )
        )
    return result


def autoscaling_decisions(deployment: str) -> list[dict[str, Any]]:
    """The recent decisions our autoscaling policy published for `deployment` (see
    deployments/autoscaling.py: Serve's controller keeps its policy state to itself)."""
    raw = internal_kv._internal_kv_get(decisions_key(deployment), namespace=KV_NAMESPACE)
    return list(json.loads(raw)) if raw else []


def _replica_actor_names() -> list[str]:
    return sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA::")
    )


def _replica_stats(actor_name: str, timeout_s: float) -> ReplicaStatus:
    try:
        actor = ray.get_actor(actor_name, namespace="serve")
        status = ray.get(_call_replica(actor, "replica_status"), timeout=timeout_s)
        return ReplicaStatus(actor_name, status["stats"], predictions=status["predictions"])
    except Exception as exc:  # a replica starting or dying is a status, not a crash
        return ReplicaStatus(actor_name, None, f"{type(exc).__name__}: {exc}"[:200])


def _call_replica(actor: ray.actor.ActorHandle, method: str) -> ray.ObjectRef:
    """Call `method` of the deployment's class on this one replica, through the replica actor's
    entry point for handle calls (as Ray LLM's broadcast utility does). A DeploymentHandle cannot
    address a given replica, and its broadcast() would build our request router (KV index,
    tracer) in this process; the actor's own record_routing_stats would run
    LLMServer.record_routing_stats, whose calls pick which window carries the routers' KV
    snapshot (Serve's controller polls it for the routers)."""
    request_id = f"inference-cluster-status-{uuid.uuid4().hex}"
    metadata = RequestMetadata(
        request_id=request_id,
        internal_request_id=request_id,
        call_method=method,
        app_name=APP_NAME,
    )
    return actor.handle_request.remote(pickle.dumps(metadata))
