"""build_app: the Serve application of an AppConfig (for `serve run`, KubeRay and our CLI).

serve run deployments.app:build_app   (args: the AppConfig as a dict)
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from deployments.autoscaling import serve_autoscaling_config
from deployments.config import AppConfig, deployment_name
from deployments.engines.vllm import engine_environment
from deployments.llm_server import LLMServer
from deployments.placement import replica_placement
from deployments.rate_limits import RateLimits
from deployments.router import Router
from deployments.routing.serve_router import PolicyRequestRouter

ROUTER_DEPLOYMENT = "Router"
RATE_LIMITS_DEPLOYMENT = "RateLimits"


def build_app(args: AppConfig | dict[str, Any]) -> Application:
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    llm_servers = {}
    for model in config.models:
        placement = replica_placement(model)
        scaling = model.autoscaling
        replicas: dict[str, Any] = {"num_replicas": model.num_replicas}
        if scaling.enabled:
            replicas = {
                "autoscaling_config": serve_autoscaling_config(
                    scaling,
                    model.num_replicas,
                    "engine",
                    asdict(placement) if scaling.cap_at_free_resources else None,
                )
            }
        llm_servers[model.name] = (
            serve.deployment(LLMServer)
            .options(
                name=deployment_name(model.name),
                **replicas,
                max_ongoing_requests=model.max_ongoing_requests,
                # The router turns the handle's BackPressureError into an OpenAI-shaped 503. It is
                # also the bounded buffer of a model at zero replicas (held until one is ready).
                max_queued_requests=model.max_queued_requests,
                # The replica actor sits in the first bundle (which reserves replica_cpus for it
                # on top of the first worker's share).
                ray_actor_options={
                    "num_cpus": model.replica_cpus,
                    "runtime_env": {"env_vars": engine_environment(model)},
                },
                placement_group_bundles=placement.bundles,
                placement_group_strategy=placement.strategy,
                # Engine start takes a minute on CPU; health checks wait for it.
                request_router_config=RequestRouterConfig(
                    request_router_class=PolicyRequestRouter,
                    request_router_kwargs={
                        "tracing": config.observability.tracing.model_dump(),
                        "policy": model.routing.policy,
                        "seed": model.routing.seed,
                        "params": model.routing.params,
                    },
                    request_routing_stats_period_s=model.routing.stats_period_s,
                ),
                health_check_period_s=10,
                health_check_timeout_s=30,
                # A replica being removed leaves the routers' replica set first (Serve's
                # long-poll update), then waits for its ongoing requests up to this long.
                graceful_shutdown_timeout_s=model.drain_timeout(),
            )
            .bind(model, config.observability)
        )
    router_scaling = config.router.autoscaling
    router_replicas: dict[str, Any] = (
        {
            "autoscaling_config": serve_autoscaling_config(
                router_scaling, config.router.num_replicas, "ongoing"
            )
        }
        if router_scaling.enabled
        else {"num_replicas": config.router.num_replicas}
    )
    router = serve.deployment(Router).options(
        name=ROUTER_DEPLOYMENT,
        **router_replicas,
        max_ongoing_requests=config.router.max_ongoing_requests,
        max_queued_requests=config.router.max_queued_requests,
        graceful_shutdown_timeout_s=config.router.shutdown_timeout(),
        backpressure_config=BackpressureConfig(
            status_code=503, retry_after_s=config.router.overload_retry_after_s
        ),
        ray_actor_options={"num_cpus": config.router.cpus},
    )
    auth = config.router.auth
    rate_limits = None
    if (
        auth.shared_limits
        and auth.limited()
        and (router_scaling.enabled or config.router.num_replicas > 1)
    ):
        rate_limits = (
            serve.deployment(RateLimits)
            .options(
                name=RATE_LIMITS_DEPLOYMENT,
                num_replicas=1,
                # One call per request of a limited key, from every router replica at once.
                max_ongoing_requests=config.router.max_ongoing_requests,
                ray_actor_options={"num_cpus": 0},
            )
            .bind(auth)
        )
    return router.bind(config, llm_servers, rate_limits)
