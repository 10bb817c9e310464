"""Ray Serve's default autoscaling policy, re-implemented for the simulator (Ray 2.60).

From ray/serve/autoscaling_policy.py and serve/_private/{autoscaling_state,replica,router}.py:
- replicas and handles record their ongoing requests (running at the replica + queued at the
  handle) every min(look_back_period_s x 0.2, metrics_interval_s) seconds and push them to the
  controller every metrics_interval_s (RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR);
- the controller averages what was pushed over look_back_period_s (aggregation_function MEAN);
- `_core_replica_queue_length_policy`: desired = running replicas x total / (target x running),
  i.e. total / target_ongoing_requests;
- `_apply_scaling_factors` with factor 1: ceil(desired);
- `_apply_delay_logic`: a change happens once the policy has wanted the same direction
  continuously for upscale_delay_s (up) or downscale_delay_s (down; never below 1 except 1 -> 0);
- then min/max replicas.
Defaults as in `AutoscalingConfig`: target 2, upscale delay 30 s, downscale delay 600 s,
look-back 30 s, metrics every 10 s.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RayAutoscalingConfig:
    target_ongoing_requests: float = 2.0
    min_replicas: int = 1
    max_replicas: int = 100
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float = 10.0


@dataclass
class MetricWindow:
    """Samples recorded on the replicas/handles' schedule, visible to the controller only up to
    the last push, averaged over the look-back window (the same pipeline for every policy)."""

    look_back_s: float
    push_interval_s: float
    record_interval_s: float
    samples: deque[tuple[float, float]] = field(default_factory=deque)
    _next_record_s: float = 0.0

    @classmethod
    def of(cls, look_back_s: float, push_interval_s: float) -> MetricWindow:
        return cls(look_back_s, push_interval_s, min(look_back_s * 0.2, push_interval_s))

    def observe(self, now: float, value: float) -> float | None:
        """Record `value` if a sample is due; the controller's current average (None before the
        first push)."""
        if now + 1e-9 >= self._next_record_s:
            self.samples.append((now, value))
            self._next_record_s = now + self.record_interval_s
        pushed_at = math.floor(now / self.push_interval_s + 1e-9) * self.push_interval_s
        while self.samples and self.samples[0][0] < pushed_at - self.look_back_s - 1e-9:
            self.samples.popleft()
        visible = [v for t, v in self.samples if t <= pushed_at + 1e-9]
        return sum(visible) / len(visible) if visible else None


@dataclass
class RayDefaultPolicy:
    config: RayAutoscalingConfig
    window: MetricWindow = field(init=False)
    _counter: int = 0  # > 0 wanting up, < 0 wanting down (Ray's decision counter)
    _since: float | None = None  # when the current wish started

    def __post_init__(self) -> None:
        self.window = MetricWindow.of(
            self.config.look_back_period_s, self.config.metrics_interval_s
        )

    def decide(self, now: float, ongoing: float, running: int, target: int) -> int:
        """The new target given the ongoing requests now, the running replicas and the target."""
        total = self.window.observe(now, ongoing)
        if total is None or running == 0:
            return target
        desired = math.ceil(total / self.config.target_ongoing_requests - 1e-9)
        decision = target
        if desired > target:
            if self._counter < 0:
                self._counter, self._since = 0, None
            self._counter += 1
            self._since = now if self._since is None else self._since
            if now - self._since + 1e-6 >= self.config.upscale_delay_s:
                self._counter, self._since = 0, None
                decision = desired
        elif desired < target:
            if self._counter > 0:
                self._counter, self._since = 0, None
            self._counter -= 1
            self._since = now if self._since is None else self._since
            if now - self._since + 1e-6 >= self.config.downscale_delay_s:
                self._counter, self._since = 0, None
                decision = desired if target == 1 else max(1, desired)
        else:
            self._counter, self._since = 0, None
        return max(self.config.min_replicas, min(self.config.max_replicas, decision))
