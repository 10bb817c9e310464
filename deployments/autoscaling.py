"""Queue-depth autoscaling: a pure policy, and the thin Ray Serve adapter around it.

The policy (`decide`) is a function of (metrics, config, state, now) -> (decision, state) with the
clock injected, so the unit tests drive it with fake time and the simulator replays it in virtual
time. It never imports Ray. The adapter (`ServeAutoscalingPolicy`) turns Serve's
`AutoscalingContext` into `ScalingMetrics`, keeps the policy state in Serve's `policy_state`, and
makes every decision visible (a gauge of desired vs current replicas tagged with the reason, a log
line per change, and the recent decisions in Ray's internal KV for `inference-cluster status`).

The rules, in order:
  load     = running + waiting over the replicas that reported, plus requests queued at handles
  desired  = ceil(load / target_per_replica); +1 while KV usage stayed above its threshold
  up       at once to `desired` (one big step), capped by max_replicas and the cluster's capacity
  band     no change while load fits `target` replicas but not `target - 1` with the hysteresis
           margin: nothing flaps on noise around a boundary
  down     only after the load stayed low for `downscale_delay_s`, by at most `downscale_max_step`
           replicas, then the delay starts again
  zero     (min_replicas 0) after `scale_to_zero_idle_s` with no load; 0 -> 1 on the first queued
           request at once
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from deployments.config import ModelAutoscalingConfig, ScalingConfig

logger = logging.getLogger("ray.serve")

Direction = Literal["up", "down", "hold"]

# A scale-down waits for starting replicas at most this long (seconds).
STARTING_HOLD_MAX_S = 600.0

# Decisions kept in the policy state (and published for `status`): bounded, newest last.
DECISION_HISTORY = 20


@dataclass(frozen=True)
class ReplicaLoad:
    """What one replica reported (LLMServer.record_autoscaling_stats), averaged by Serve."""

    running: float
    waiting: float
    kv_cache_usage: float = 0.0


@dataclass(frozen=True)
class ScalingMetrics:
    """The policy's view of a deployment at one tick."""

    current_replicas: int  # running replicas
    target_replicas: int  # the current target (running + starting)
    replicas: Sequence[ReplicaLoad] = ()
    queued: float = 0.0  # requests waiting at the handles for any replica
    capacity: int | None = None  # replicas of this deployment the cluster can host; None: unknown

    @property
    def load(self) -> float:
        return sum(r.running + r.waiting for r in self.replicas) + self.queued

    @property
    def kv_cache_usage(self) -> float:
        """Mean KV usage over the replicas that reported (0 when none did)."""
        if not self.replicas:
            return 0.0
        return sum(r.kv_cache_usage for r in self.replicas) / len(self.replicas)


@dataclass(frozen=True)
class Decision:
    time_s: float
    previous: int
    target: int
    desired: int  # what the load asks for before the cluster's capacity caps it
    direction: Direction
    reason: str
    load: float
    capacity_limited: bool = False


@dataclass(frozen=True)
class PolicyState:
    low_since_s: float | None = None  # since when the load fitted fewer replicas
    kv_high_since_s: float | None = None  # since when KV usage stayed above the threshold
    idle_since_s: float | None = None  # since when the load was exactly zero
    starting_since_s: float | None = None  # since when fewer replicas run than the target
    history: tuple[Decision, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PolicyState:
        if not data:
            return cls()
        return cls(
            low_since_s=data.get("low_since_s"),
            kv_high_since_s=data.get("kv_high_since_s"),
            idle_since_s=data.get("idle_since_s"),
            starting_since_s=data.get("starting_since_s"),
            history=tuple(Decision(**d) for d in data.get("history", ())),
        )


def decide(
    metrics: ScalingMetrics, config: ScalingConfig, state: PolicyState, now: float
) -> tuple[Decision, PolicyState]:
    """One autoscaling decision. Pure: same inputs, same outputs."""
    load = metrics.load
    target = metrics.target_replicas
    per_replica = config.target_per_replica

    needed = math.ceil(load / per_replica - 1e-9)
    reason = f"load {load:g} at {per_replica:g} per replica needs {needed}"
    kv_high_since = state.kv_high_since_s
    if isinstance(config, ModelAutoscalingConfig) and metrics.replicas:
        if metrics.kv_cache_usage > config.kv_usage_threshold:
            kv_high_since = now if kv_high_since is None else kv_high_since
            if now - kv_high_since >= config.kv_sustain_s and needed <= target:
                needed = target + 1
                reason = (
                    f"KV usage {metrics.kv_cache_usage:.2f} > {config.kv_usage_threshold:g} "
                    f"for {now - kv_high_since:.0f} s: one more replica"
                )
                # The next extra replica waits for another sustained period.
                kv_high_since = now
        else:
            kv_high_since = None
    starting_since = None
    if metrics.current_replicas < target:
        starting_since = state.starting_since_s if state.starting_since_s is not None else now
    idle_since = None
    if not load:
        idle_since = state.idle_since_s if state.idle_since_s is not None else now
    state = replace(
        state,
        kv_high_since_s=kv_high_since,
        idle_since_s=idle_since,
        starting_since_s=starting_since,
    )

    floor = _floor(config, state, target, now)
    # Fewest replicas that hold the load with the hysteresis margin: below this, scale down.
    fits_with_margin = math.ceil(load / (per_replica * (1 - config.downscale_hysteresis)) - 1e-9)

    if target == 0 and load > 0:
        new = max(1, needed)
        direction: Direction = "up"
        reason = f"cold start: {reason}"
        state = replace(state, low_since_s=None)
    elif needed > target or target < floor:
        new = max(needed, floor)
        direction = "up"
        state = replace(state, low_since_s=None)
    elif max(fits_with_margin, floor) < target and _still_starting(metrics, state, now):
        # The last scale-up has not landed: starting replicas cost CPU on their hosts and the
        # demand they were asked for may be stuck upstream, so the load reads low. Scaling down
        # now would cancel them and flap; the low period starts once the fleet is complete.
        new = target
        direction = "hold"
        starting = target - metrics.current_replicas
        reason = f"{reason}; {starting} replicas still starting: no scale-down before they are up"
        state = replace(state, low_since_s=None)
    elif max(fits_with_margin, floor) < target:
        low_since = state.low_since_s if state.low_since_s is not None else now
        waited = now - low_since
        delay = _delay(config, target)
        if waited + 1e-9 >= delay:
            new = max(fits_with_margin, floor, target - config.downscale_max_step)
            direction = "down"
            reason = (
                f"{reason} with a {config.downscale_hysteresis:g} margin, low for {waited:.0f} s"
            )
            if new == 0 and idle_since is not None:
                reason = f"idle for {now - idle_since:.0f} s: scale to zero"
            # Every further step waits out the delay again.
            state = replace(state, low_since_s=now)
        else:
            new = target
            direction = "hold"
            reason = f"{reason}; low for {waited:.0f} of {delay:g} s before scaling down"
            state = replace(state, low_since_s=low_since)
    else:
        new = target
        direction = "hold"
        reason = f"{reason}; within the hysteresis band of {target}"
        state = replace(state, low_since_s=None)

    desired = min(new, config.max_replicas)
    if new > config.max_replicas:
        reason = f"{reason}; capped at max_replicas {config.max_replicas}"
    final = desired
    capacity_limited = False
    if direction == "up" and metrics.capacity is not None and desired > metrics.capacity:
        final = max(metrics.capacity, min(target, desired))
        capacity_limited = True
        reason = (
            f"{reason}; the cluster can host {metrics.capacity} replicas, "
            f"{desired - final} more cannot be placed"
        )
    if final == target and direction != "hold":
        direction = "hold"
    decision = Decision(
        time_s=now,
        previous=target,
        target=final,
        desired=desired,
        direction=direction,
        reason=reason,
        load=load,
        capacity_limited=capacity_limited,
    )
    if final != target or capacity_limited:
        state = replace(state, history=(*state.history, decision)[-DECISION_HISTORY:])
    return decision, state


def _still_starting(metrics: ScalingMetrics, state: PolicyState, now: float) -> bool:
    """Replicas are starting, and not for so long that they look stuck (no room on the
    cluster, a crash loop): then the policy trusts the load again and may cancel them."""
    return (
        state.starting_since_s is not None
        and now - state.starting_since_s < STARTING_HOLD_MAX_S
        and metrics.current_replicas > 0
    )


def _floor(config: ScalingConfig, state: PolicyState, target: int, now: float) -> int:
    """The fewest replicas allowed now: min_replicas, except that a scale-to-zero model keeps one
    replica until it has been idle for `scale_to_zero_idle_s` (and, once at zero, stays there
    until a request arrives, which the cold-start rule handles)."""
    if config.min_replicas > 0:
        return config.min_replicas
    if target == 0:
        return 0
    assert isinstance(config, ModelAutoscalingConfig)
    idle = state.idle_since_s
    if idle is not None and now - idle + 1e-9 >= config.scale_to_zero_idle_s:
        return 0
    return 1


def _delay(config: ScalingConfig, target: int) -> float:
    if target == 1 and isinstance(config, ModelAutoscalingConfig):
        # 1 -> 0 is governed by the idle period (checked in _floor), not the downscale delay.
        return 0.0
    return config.downscale_delay_s


# ---- the Ray Serve adapter ----------------------------------------------------------------------

KV_NAMESPACE = "inference_cluster"
METRIC_KEYS = ("running", "waiting", "kv_cache_usage")


def decisions_key(deployment: str) -> str:
    """Internal-KV key of a deployment's recent decisions (read by `inference-cluster status`)."""
    return f"autoscaling:{deployment}"


class ServeAutoscalingPolicy:
    """Serve's deployment-scoped autoscaling policy: `AutoscalingPolicy(policy_function=this
    class, policy_kwargs=...)`. Serve instantiates it once in its controller and calls it every
    control-loop tick with an `AutoscalingContext`.

    signal "engine": load from the replicas' record_autoscaling_stats (running + waiting, KV
    usage) plus handle-queued requests. signal "ongoing": Serve's own ongoing-request count
    (running + queued), for deployments without engine stats such as the router.
    """

    def __init__(
        self,
        config: dict[str, Any],
        signal: Literal["engine", "ongoing"],
        placement: dict[str, Any] | None = None,
    ) -> None:
        self._config: ScalingConfig = (
            ModelAutoscalingConfig.model_validate(config)
            if signal == "engine"
            else ScalingConfig.model_validate(config)
        )
        self._signal = signal
        self._placement = placement
        self._gauges: tuple[Any, Any] | None = None
        self._capacity_cache: tuple[float, int | None] = (-math.inf, None)
        self._publish: Callable[[str, bytes], None] | None = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = ctx.current_time
        metrics = self._metrics(ctx, now)
        ours = ctx.policy_state.get(KV_NAMESPACE)
        decision, state = decide(metrics, self._config, PolicyState.from_dict(ours), now)
        self._report(ctx.deployment_name, metrics, decision)
        policy_state = dict(ctx.policy_state)
        policy_state[KV_NAMESPACE] = state.to_dict()
        return decision.target, policy_state

    def _metrics(self, ctx: Any, now: float) -> ScalingMetrics:
        capacity = self._capacity(ctx.target_num_replicas, now)
        if self._signal == "ongoing":
            # Serve's total is running + handle-queued requests over the look-back window.
            return ScalingMetrics(
                current_replicas=ctx.current_num_replicas,
                target_replicas=ctx.target_num_replicas,
                queued=float(ctx.total_num_requests or 0.0),
                capacity=capacity,
            )
        aggregated = ctx.aggregated_metrics or {}
        replicas = [
            ReplicaLoad(
                running=aggregated.get("running", {}).get(replica, 0.0),
                waiting=aggregated.get("waiting", {}).get(replica, 0.0),
                kv_cache_usage=aggregated.get("kv_cache_usage", {}).get(replica, 0.0),
            )
            for replica in ctx.running_replicas
            if any(replica in aggregated.get(key, {}) for key in METRIC_KEYS)
        ]
        return ScalingMetrics(
            current_replicas=ctx.current_num_replicas,
            target_replicas=ctx.target_num_replicas,
            replicas=replicas,
            queued=float(ctx.total_queued_requests or 0.0),
            capacity=capacity,
        )

    def _capacity(self, target: int, now: float) -> int | None:
        """Replicas of this deployment the cluster can host: the current target plus what fits
        in the nodes' free resources (refreshed every 10 s: it costs a GCS call)."""
        if self._placement is None:
            return None
        checked_at, spare = self._capacity_cache
        if now - checked_at >= 10.0:
            from deployments.placement import ReplicaPlacement, replicas_that_fit

            try:
                # Serve's own scheduler reads the same per-node view (cluster_node_info_cache).
                from ray._private.state import available_resources_per_node

                free = list(available_resources_per_node().values())
            except Exception:  # no Ray state (e.g. the controller is shutting down)
                return None
            spare = replicas_that_fit(ReplicaPlacement(**self._placement), free)
            self._capacity_cache = (now, spare)
        return None if spare is None else target + spare

    def _report(self, deployment: str, metrics: ScalingMetrics, decision: Decision) -> None:
        desired_gauge, current_gauge = self._metric_gauges()
        tags = {"deployment": deployment, "reason": _reason_kind(decision)}
        desired_gauge.set(decision.target, tags=tags)
        current_gauge.set(metrics.current_replicas, tags=tags)
        if decision.target == decision.previous and not decision.capacity_limited:
            return
        logger.info(
            "autoscaling %s: %d -> %d replicas (%s)",
            deployment,
            decision.previous,
            decision.target,
            decision.reason,
        )
        self._publish_decision(deployment, decision)

    def _metric_gauges(self) -> tuple[Any, Any]:
        if self._gauges is None:
            from ray.util.metrics import Gauge

            keys = ("deployment", "reason")
            self._gauges = (
                Gauge(
                    "autoscaler_desired_replicas",
                    description="Replicas the autoscaling policy asks for.",
                    tag_keys=keys,
                ),
                Gauge(
                    "autoscaler_current_replicas",
                    description="Running replicas when the policy decided.",
                    tag_keys=keys,
                ),
            )
        return self._gauges

    def _publish_decision(self, deployment: str, decision: Decision) -> None:
        """Append the decision to the deployment's record in Ray's internal KV (GCS): the
        controller's policy state is not readable from outside, this record is."""
        from ray.experimental import internal_kv

        key = decisions_key(deployment)
        try:
            old = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
            history = json.loads(old) if old else []
            history = [*history, asdict(decision)][-DECISION_HISTORY:]
            internal_kv._internal_kv_put(
                key, json.dumps(history).encode(), overwrite=True, namespace=KV_NAMESPACE
            )
        except Exception:  # visibility must never break scaling
            logger.exception("could not publish the autoscaling decision of %s", deployment)


def _reason_kind(decision: Decision) -> str:
    """A bounded tag value: the reason's category, not its free text (metric cardinality)."""
    if decision.capacity_limited:
        return "capacity"
    if decision.reason.startswith("cold start"):
        return "cold_start"
    if decision.reason.startswith("KV usage"):
        return "kv_cache"
    if "scale to zero" in decision.reason:
        return "idle"
    if "capped at max_replicas" in decision.reason:
        return "max_replicas"
    return {"up": "queue_depth", "down": "low_load", "hold": "steady"}[decision.direction]


def serve_autoscaling_config(
    scaling: ScalingConfig,
    initial_replicas: int,
    signal: Literal["engine", "ongoing"],
    placement: dict[str, Any] | None = None,
) -> Any:
    """Serve's AutoscalingConfig running our policy. Serve wraps every custom policy in its own
    delays and smoothing (serve/autoscaling_policy.py `_apply_autoscaling_config`); they are set
    to pass-through (0 s, factor 1) so our policy alone decides when and how far to move."""
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

    return AutoscalingConfig(
        min_replicas=scaling.min_replicas,
        max_replicas=scaling.max_replicas,
        initial_replicas=initial_replicas,
        metrics_interval_s=scaling.metrics_interval_s,
        look_back_period_s=scaling.look_back_period_s,
        upscale_delay_s=0.0,
        downscale_delay_s=0.0,
        downscale_to_zero_delay_s=0.0,
        policy=AutoscalingPolicy(
            policy_function=ServeAutoscalingPolicy,
            policy_kwargs={
                "config": scaling.model_dump(mode="json"),
                "signal": signal,
                "placement": placement,
            },
        ),
    )
