"""`inference-cluster` (also `python -m cluster`): serve, status, render-k8s, config."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from cluster.config import ConfigError, HTTPConfig, default_config_path, format_errors, load_config

EXIT_CONFIG = 2
EXIT_DEPLOY = 3
EXIT_INTERRUPTED = 130  # a shell's code for a process ended by Ctrl-C
EXIT_RAY_STOPPED = 1  # Ray's processes stopped under `serve`: in-flight requests were lost
EXIT_APP_GONE = 1  # the app was taken off the cluster under `serve`: nothing left to serve
# Ray's processes share `serve`'s process group, and a signal sent to the whole group stops them
# at once. A terminal's Ctrl-C is harmless (they ignore SIGINT), systemd's SIGTERM is not.
RAY_STOPPED_HINT = "a SIGTERM to the whole process group? under systemd, set KillMode=mixed"
RAY_CHECK_INTERVAL_S = 5.0  # how often a serving `serve` checks that its local Ray still runs
STATUS_DECISIONS = 5  # the autoscaler's most recent decisions shown per deployment


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:  # a command given an unusable config file: say why, exit 2
        print(exc, file=sys.stderr)
        return EXIT_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inference-cluster",
        description="An LLM inference cluster on Ray Serve with an OpenAI-compatible API.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="Start (or join) Ray, deploy, serve until Ctrl-C.")
    serve.add_argument(
        "--config",
        type=Path,
        default=None,
        help="Cluster YAML (default: the embedded tiny Llama "
        "on 2 vLLM CPU replicas, cluster/configs/local.yaml).",
    )
    serve.add_argument("--address", help="Ray address to join instead of starting a local Ray.")
    serve.add_argument("--host", help="Listen address (overrides http.host).")
    serve.add_argument("--port", type=int, help="Listen port (overrides http.port).")
    serve.set_defaults(run=_serve)

    status = commands.add_parser("status", help="Models, replicas and per-replica engine stats.")
    status.add_argument("--address", default="auto", help="Ray address (default: auto).")
    status.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    status.set_defaults(run=_status)

    render = commands.add_parser(
        "render-k8s",
        help="Write the KubeRay RayService patch (serveConfigV2 + worker groups) of a config.",
    )
    render.add_argument("--config", type=Path, required=True, help="Cluster YAML.")
    render.add_argument(
        "--out",
        type=Path,
        help="Folder to write rayservice-patch.yaml into (e.g. k8s/overlays/gpu); "
        "default: print it.",
    )
    render.set_defaults(run=_render_k8s)

    dashboard = commands.add_parser(
        "dashboard", help="Write the Grafana dashboard JSON (k8s/base/dashboards/...)."
    )
    dashboard.add_argument("--out", type=Path, help="File to write; default: print it.")
    dashboard.set_defaults(run=_dashboard)

    config = commands.add_parser("config", help="Work with config files.")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    validate = config_commands.add_parser("validate", help="Exit 0 if FILE is valid, else 2.")
    validate.add_argument("file", type=Path)
    validate.set_defaults(run=_validate)
    reference = config_commands.add_parser(
        "reference", help="Print every config field (Markdown table, as in README.md)."
    )
    reference.set_defaults(run=_reference)
    return parser


def _render_k8s(args: argparse.Namespace) -> int:
    from cluster import k8s_render

    config = load_config(args.config)
    text = k8s_render.render_file(config, config_name=args.config.as_posix())
    if args.out is None:
        print(text, end="")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / k8s_render.PATCH_FILE
    target.write_text(text)
    print(f"wrote {target}")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from cluster.dashboard import render

    if args.out is None:
        print(render(), end="")
    else:
        args.out.write_text(render())
        print(f"wrote {args.out}")
    return 0


def _reference(args: argparse.Namespace) -> int:
    from cluster.config_reference import render

    print(render())
    return 0


def _validate(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    names = ", ".join(f"{m.name} ({m.engine} x{m.num_replicas})" for m in config.models)
    print(f"{args.file}: valid; models: {names}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from cluster import runtime

    path = args.config or default_config_path()
    config = load_config(path)
    http = _http_options(config.http, host=args.host, port=args.port)
    if args.address:
        config = config.model_copy(
            update={"ray": config.ray.model_copy(update={"address": args.address})}
        )
    if config.ray.address is None:  # the ingress binds on this machine: is the port free?
        _check_port_free(http)

    started = time.monotonic()
    print(f"config: {path}", flush=True)
    app_config = config.app_config()  # generates the embedded model on first use
    runtime.start_ray(config)
    # After ray.init, which installs its own SIGTERM handler (sys.exit: no drain).
    stop = _stop_event()
    try:
        deployed = runtime.deploy(
            app_config,
            host=http.host,
            port=http.port,
            timeout_s=config.ray.deploy_timeout_s,
            on_progress=lambda line: print(f"  waiting: {line}", flush=True),
            stop=stop,
        )
        if not deployed:  # Ctrl-C or SIGTERM while replicas were starting: nothing to drain
            runtime.check_ray_alive()  # unless the signal went to Ray's processes too
            print("stopping before the deployment was ready...", flush=True)
            return 0
        if config.ray.address is not None:
            requested, http = http, runtime.ingress_options(http)
            if http != requested:
                print(
                    f"note: Serve already ran on this cluster, listening on {http.host}:"
                    f"{http.port}; --host/--port and http: apply only to a new Serve",
                    flush=True,
                )
        url = f"http://{'127.0.0.1' if http.host == '0.0.0.0' else http.host}:{http.port}"
        model = app_config.models[0].name
        print(
            f"\nready in {time.monotonic() - started:.1f} s: {url}/v1 "
            f"(models: {', '.join(m.name for m in app_config.models)})\n"
            f"try:\n  curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"""-d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], """
            f""""max_tokens": 32}}'\n"""
            "Ctrl-C stops the cluster.",
            flush=True,
        )
        health = "RUNNING"
        while not stop.wait(RAY_CHECK_INTERVAL_S):
            runtime.check_ray_alive()  # Ray stopped under us (OOM killer, `ray stop`): say so
            health = _report_health(health)
        # Serve's shutdown stops the HTTP proxies at once, cutting every open stream: let the
        # in-flight requests finish first, taking no new ones (a second Ctrl-C still stops at
        # once).
        print(
            f"draining: new requests get 503, in-flight ones finish (at most "
            f"{config.ray.drain_timeout_s:g} s)...",
            flush=True,
        )
        runtime.start_draining()
        busy = runtime.drain(config.ray.drain_timeout_s)
        print(f"stopping ({busy} requests still running)..." if busy else "stopping...", flush=True)
        return 0
    except runtime.DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DEPLOY
    except KeyboardInterrupt:  # a second Ctrl-C or SIGTERM (_stop_event): stop without draining
        print("stopping at once (a second signal)...", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except runtime.RayStopped as exc:  # the replicas went with Ray: their requests were cut
        print(f"error: {exc}; requests in flight were lost ({RAY_STOPPED_HINT})", file=sys.stderr)
        return EXIT_RAY_STOPPED
    except runtime.AppGone as exc:
        print(f"error: {exc} while `serve` served it; stopping", file=sys.stderr)
        return EXIT_APP_GONE
    finally:
        _stop(joined=config.ray.address is not None)


def _report_health(last: str) -> str:
    """Print the app's health when it changed since `last` (a replica failed its health check,
    Serve replaced it); returns the health now. A controller that did not answer changes
    nothing: Ray itself is checked first."""
    from cluster import runtime

    health = runtime.app_health()
    if health is None or health == last:
        return last
    print("app running again" if health == "RUNNING" else f"app {health}", flush=True)
    return health


def _stop(*, joined: bool) -> None:
    """Serve's shutdown, then Ray's. One more signal cuts Serve's shutdown short (a local Ray's
    stop takes the replicas down anyway); none interrupts Ray's stop, which leaves no processes
    behind only if it finishes."""
    from cluster import runtime

    try:
        runtime.stop_app(joined=joined)
    except KeyboardInterrupt:
        _ignore_signals()  # at once: a third signal must not escape either
        left = "the app may still be on the cluster" if joined else "Ray's stop ends the replicas"
        print(f"stopping at once (a second signal): {left}...", file=sys.stderr, flush=True)
    finally:
        _ignore_signals()
        runtime.stop_ray()  # a local Ray started here ends with us: no leftover processes


def _ignore_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _http_options(http: HTTPConfig, *, host: str | None, port: int | None) -> HTTPConfig:
    """`http` with the --host/--port overrides, validated as the config file's fields are (a
    model_copy would not validate), so that a bad port exits 2 before Ray starts."""
    updates = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    try:
        return HTTPConfig.model_validate(http.model_dump() | updates)
    except ValidationError as exc:
        raise ConfigError(f"invalid --host/--port:\n{format_errors(exc)}") from None


def _check_port_free(http: HTTPConfig) -> None:
    """ConfigError when another process listens on the port, before Ray starts: Ray's ingress
    would fail to bind it only after the deploy began, with a traceback."""
    with socket.socket(socket.AF_INET6 if ":" in http.host else socket.AF_INET) as probe:
        # As a listener binds it: a port left in TIME_WAIT by a closed connection is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((http.host, http.port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {http.host}:{http.port}: {exc.strerror} (another `serve`? "
                "choose one with --port)"
            ) from None


def _stop_event() -> threading.Event:
    """Ctrl-C and SIGTERM (kubectl, systemd) both end `serve` through the same clean path."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():  # a second Ctrl-C: the user wants out now
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _status(args: argparse.Namespace) -> int:
    import ray

    from cluster import runtime

    try:
        ray.init(address=args.address, logging_level="ERROR")
    except ConnectionError as exc:
        print(f"error: no Ray cluster at {args.address!r}: {exc}", file=sys.stderr)
        return EXIT_DEPLOY
    try:
        deployments = runtime.cluster_status()
    except ray.exceptions.GetTimeoutError as exc:
        print(f"error: Serve's controller did not answer: {exc}", file=sys.stderr)
        return EXIT_DEPLOY
    finally:
        ray.shutdown()
    if not deployments:
        print(f"no `{runtime.APP_NAME}` application on this Ray cluster", file=sys.stderr)
        return EXIT_DEPLOY
    if args.json:
        print(
            json.dumps(
                [d.__dict__ | {"replicas": [r.__dict__ for r in d.replicas]} for d in deployments],
                indent=2,
                default=str,
            )
        )
        return 0
    for d in deployments:
        states = ", ".join(f"{n} {s.lower()}" for s, n in d.replica_states.items())
        message = f" - {d.message}" if d.message else ""
        print(f"{d.name}: {d.status.lower()} ({states}){message}")
        for r in d.replicas:
            if r.stats is not None:
                s = r.stats
                p = r.predictions or {}
                print(
                    f"  {r.replica.rsplit('#', 1)[-1]}: waiting {s['num_waiting']}, running "
                    f"{s['num_running']}, KV {s['kv_cache_usage']:.1%} of {s['num_total_blocks']}"
                    f" blocks, prefix hits {s['prefix_cache_hits']}/{s['prefix_cache_queries']}"
                    f", cached tokens found/predicted by routers "
                    f"{p.get('actual_cached_tokens', 0)}/{p.get('predicted_cached_tokens', 0)}"
                )
            elif r.error is not None:
                print(f"  {r.replica.rsplit('#', 1)[-1]}: {r.error}")
        for decision in d.decisions[-STATUS_DECISIONS:]:
            when = time.strftime("%H:%M:%S", time.localtime(decision["time_s"]))
            print(
                f"  autoscaler {when}: {decision['previous']} -> {decision['target']} "
                f"replicas: {decision['reason']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
