"""The serving path's own overhead, with an engine that costs nothing (zero-latency profile).

    python -m loadtest.overhead [--requests 300] [--max-tokens 8] [--ingress haproxy|proxy]

Three ways to run the same request, interleaved so machine noise hits all three alike:
  engine    the simulated engine in this process (no Ray): the floor
  handle    LLMServer through a Serve deployment handle from the driver: "the engine directly"
  router    HTTP through the ingress (HAProxy as `serve` runs it, or Serve's Python proxy) and
            our Router deployment (tokenize, validate, SSE/JSON)
The router's overhead is `router - handle`. Prints p50/p99 per path; never asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import httpx
import ray
from ray import serve

from cluster import ingress, runtime
from cluster.config import IngressConfig
from cluster.embedded_model import ensure_embedded_model
from deployments.config import AppConfig, ModelConfig, RouterConfig, deployment_name
from deployments.engines.base import EngineRequest, SamplingParams
from deployments.engines.profiles import ZERO_LATENCY
from deployments.engines.simulated import SimulatedEngine
from deployments.tokenizer import PromptTokenizer
from loadtest.metrics import nearest_rank

MODEL = "zero"
PROMPT = "The serving path should cost as little as possible compared with the engine itself."


async def measure(requests: int, max_tokens: int, port: int) -> dict[str, dict[str, float]]:
    source = str(ensure_embedded_model())
    tokenizer = PromptTokenizer(source)
    prompt_ids = tuple(tokenizer.encode_text(PROMPT))
    sampling = SamplingParams(max_tokens=max_tokens)
    engine = SimulatedEngine(ZERO_LATENCY, detokenize=tokenizer.decode)
    await engine.start()
    handle = serve.get_deployment_handle(deployment_name(MODEL), runtime.APP_NAME)
    streaming = handle.options(stream=True)
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens}
    counter = 0

    def request() -> EngineRequest:
        nonlocal counter
        counter += 1
        return EngineRequest(
            request_id=f"bench-{counter}", prompt_token_ids=prompt_ids, sampling=sampling
        )

    async def via_engine() -> None:
        async for _ in engine.generate(request()):
            pass

    async def via_handle() -> None:
        async for _ in streaming.generate.remote(request()):
            pass

    async def via_router() -> None:
        response = await http.post("/v1/completions", json=body)
        response.raise_for_status()

    paths: dict[str, Callable[[], Awaitable[None]]] = {
        "engine": via_engine,
        "handle": via_handle,
        "router": via_router,
    }
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(requests + 20):
        for name, call in paths.items():
            start = time.perf_counter()
            await call()
            if i >= 20:  # warm-up rounds are not measured
                samples[name].append((time.perf_counter() - start) * 1000)
    await http.aclose()
    await engine.shutdown()
    return {
        name: {
            "p50_ms": round(nearest_rank(values, 50), 3),
            "p99_ms": round(nearest_rank(values, 99), 3),
            "mean_ms": round(statistics.fmean(values), 3),
        }
        for name, values in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="Measured requests per path.")
    parser.add_argument("--max-tokens", type=int, default=8, help="Tokens per request.")
    parser.add_argument("--port", type=int, default=8011, help="HTTP port of the benchmark app.")
    parser.add_argument(
        "--ingress",
        choices=("haproxy", "proxy"),
        default="haproxy",
        help="What serves HTTP: HAProxy (as `serve` runs it) or Serve's Python proxy.",
    )
    args = parser.parse_args()

    source = str(ensure_embedded_model())
    model = ModelConfig(
        name=MODEL,
        engine="simulated",
        source=source,
        device="cpu",
        max_model_len=4096,
        num_replicas=1,
        cpus_per_worker=0.1,
        replica_cpus=0.0,
        simulated={"profile": ZERO_LATENCY.name},
    )
    # Ray's processes inherit the ingress settings from this one (cluster/ingress.py).
    os.environ.update(ingress.ray_env(IngressConfig(haproxy=args.ingress == "haproxy")))
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        runtime.deploy(
            AppConfig(router=RouterConfig(cpus=0.1), models=[model]),
            host="127.0.0.1",
            port=args.port,
            timeout_s=300,
        )
        result = asyncio.run(measure(args.requests, args.max_tokens, args.port))
    finally:
        serve.shutdown()
        ray.shutdown()
    router, handle = result["router"], result["handle"]
    result["router_overhead"] = {
        "p50_ms": round(router["p50_ms"] - handle["p50_ms"], 3),
        "p99_ms": round(router["p99_ms"] - handle["p99_ms"], 3),
    }
    print(
        f"{args.requests} sequential requests per path, {args.max_tokens} tokens each, "
        f"ingress: {args.ingress}"
    )
    for name, figures in result.items():
        print(f"  {name:16s} " + "  ".join(f"{k} {v:8.3f}" for k, v in figures.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
