"""Queue-depth autoscaling: a pure policy, and the thin Ray Serve adapter around it.

The policy (`decide`) is a function of (metrics, config, state, now) -> (decision, state) with the
clock injected, so the unit tests drive it with fake time and the simulator replays it in virtual
time. It never imports Ray. The adapter (`ServeAutoscalingPolicy`) turns Serve's
`AutoscalingContext` into `ScalingMetrics`, keeps the policy state in Serve's `policy_state`, and
makes every decision visible (a gauge of desired vs current replicas tagged with the reason, a log
line per change, and the recent decisions in Ray's internal KV for `inference-cluster status`).

The rules, in order:
  load     = running + waiting over the replicas that reported, plus requests queued at handles
  sizing   by throughput, with the backlog drained over a horizon rather than all at once.
           T = target_per_replica, the concurrency one replica holds within the SLO.
           in service = sum over replicas of min(running, T); backlog = the rest: running above
           T, waiting, queued at the handles; throughput = requests finished per second per
           replica. desired = in service / T                 (what holds today's batches)
                             + backlog growth / throughput   (what stops the queue growing)
                             + backlog / (drain_horizon_s x throughput)   (what drains it)
           Why: sizing running + queued at T per replica answered one backlog several times. It
           grows while replicas start (a 5x burst that 2 replicas serve got 29), and once they
           are up it floods their batches far above T, where it read as load again. Here the
           backlog counts once, at the rate replicas really finish requests, and starting
           replicas (in the target already) absorb what it asks for. Before any request finished
           (no throughput yet) the backlog counts as in service at T, as do the router's
           requests (its signal has no throughput). +1 while KV usage stayed above its threshold.
  up       at once to `desired` (one big step), capped by max_replicas and the cluster's capacity
  band     no change while load fits `target` replicas but not `target - 1` with the hysteresis
           margin: nothing flaps on noise around a boundary
  down     only after the load stayed low for `downscale_delay_s` (`downscale_delay_one_replica_s`
           for a step of a fall: one replica over, the last change a step down; see
           `_short_delay`), by at most `downscale_max_step`
           replicas, then the delay starts again; never below what the arrival rate (finished
           per second + backlog growth) needs at the per-replica throughput measured in a
           steady state with every batch near T (`rate_at_target`)
  rate     (with target_rate_per_replica) the fleet is sized on the arrival rate instead: what
           the replicas accepted per second plus the growth of the handles' queue, averaged
           over 3 s; desired = (rate + lead) / target rate, the lead being rate_lead_s of the
           rate's 30 s trend, ignored under 10% of the rate (noise) and capped at 30% (a step is
           no trend); down when the rate with its whole rise fits fewer replicas with the
           hysteresis margin, so never while it climbs. The in-flight rules above still scale
           up on a queue (batches above T). Why: the in-flight count grows without bound near
           a replica's capacity (Little's law with a latency that grows with the batch), so it
           cannot size a fleet run near capacity, which is where the cost is; the rate can.
  zero     (min_replicas 0) after `scale_to_zero_idle_s` with no load; 0 -> 1 on the first queued
           request at once. On Ray, Serve's cold-start path takes 0 -> 1 without calling the
           policy; the policy records that step when it next runs (it sees a target above the
           0 it last returned), so the decision record shows it too.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, NamedTuple

from deployments.config import ModelAutoscalingConfig, ScalingConfig

logger = logging.getLogger("ray.serve")

Direction = Literal["up", "down", "hold"]

# A scale-down waits for starting replicas at most this long (seconds).
STARTING_HOLD_MAX_S = 600.0

# Time constant (s) of the smoothing of the backlog's growth rate and of the throughput at
# target: long enough that Poisson noise around a full batch does not read as a trend (it added
# and removed replicas every few ticks unsmoothed), short against a 30 s replica start.
SMOOTHING_S = 5.0

# The throughput at T (`rate_at_target`) is learned while every batch holds at least this share
# of T (a replica finishes a little less there than at T: an estimate on the safe side), ...
LEARN_SHARE = 0.8
# ... the same replicas have reported for SETTLE_S seconds, ...
SETTLE_S = 10.0
# ... the requests in service change by at most this share per second, ...
STEADY_SHARE = 0.02
# ... and the backlog is at most this share of the requests in service.
QUEUE_FREE = 0.05
# Time constant (s) of its smoothing: one replica's 3 s average of completions swings +-15%.
LEARN_SMOOTHING_S = 10.0

# The arrival rate (rate sizing) is averaged over ARRIVALS_SMOOTHING_S, short so that a step is
# followed within seconds; its trend over TREND_SMOOTHING_S. A rise under LEAD_DEAD_ZONE of the
# rate is noise and leads nothing; a lead is at most LEAD_CAP of the rate (a 4x step read as a
# trend asked for twice the fleet the step needed).
ARRIVALS_SMOOTHING_S = 3.0
TREND_SMOOTHING_S = 30.0
LEAD_DEAD_ZONE = 0.1
LEAD_CAP = 0.3

# Decisions kept in the policy state (and published for `status`): bounded, newest last.
DECISION_HISTORY = 20


@dataclass(frozen=True)
class ReplicaLoad:
    """What one replica reported (LLMServer.record_autoscaling_stats), averaged by Serve."""

    running: float
    waiting: float
    kv_cache_usage: float = 0.0
    finished_per_s: float = 0.0  # requests completed per second, recently (in choices)
    arrived_per_s: float = 0.0  # requests accepted per second, recently (in choices)


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
        """Requests in the engines (running + waiting) and queued at the handles. How much of
        it is in service and how much is backlog depends on T: `_sized_load` splits it."""
        return sum(r.running + r.waiting for r in self.replicas) + self.queued

    @property
    def throughput_per_replica(self) -> float:
        """Requests finished per second per replica, over the replicas that finished any (0 when
        none did). A replica that just started has a full batch and nothing finished yet:
        counted, it diluted the mean 5x on a burst and the backlog read 5x too large."""
        rates = [r.finished_per_s for r in self.replicas if r.finished_per_s > 0]
        return sum(rates) / len(rates) if rates else 0.0

    @property
    def finished_per_s(self) -> float:
        return sum(r.finished_per_s for r in self.replicas)

    @property
    def arrived_per_s(self) -> float:
        return sum(r.arrived_per_s for r in self.replicas)

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
    last_target: int | None = None  # what the policy returned last (None: never ran)
    falling: bool = False  # the target's last change was a step down: a fall may be under way
    backlog: float | None = None  # the backlog at the last tick, for its growth rate
    backlog_s: float | None = None  # when it was seen
    growth: float = 0.0  # the backlog's growth rate (requests/s), smoothed
    in_service: float | None = None  # requests in service (up to T per replica) at the last tick
    service_growth: float = 0.0  # their growth rate (requests/s), smoothed
    reporting: int = 0  # replicas that reported at the last tick
    settled_since_s: float | None = None  # since when that many replicas report
    # Requests one replica finishes per second with about target_per_replica in its batch, in a
    # steady state, smoothed (None: never seen): the throughput a scale-down must leave enough of.
    rate_at_target: float | None = None
    # The same from any tick with every batch at T or more (low: batches filling), used until a
    # steady state measured rate_at_target.
    rate_provisional: float | None = None
    # Requests arriving per second (accepted by the replicas + the handles' queue growth),
    # averaged, and its trend (requests/s per second); None: not counted yet.
    arrivals: float | None = None
    arrivals_trend: float = 0.0
    queued: float | None = None  # requests queued at the handles at the last tick
    history: tuple[Decision, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PolicyState:
        if not data:
            return cls()
        # Fields missing from an older policy's state take their defaults; unknown ones go.
        scalars = {f.name for f in fields(cls)} - {"history"}
        return cls(
            **{name: value for name, value in data.items() if name in scalars},
            history=tuple(Decision(**d) for d in data.get("history", ())),
        )


def decide(
    metrics: ScalingMetrics, config: ScalingConfig, state: PolicyState, now: float
) -> tuple[Decision, PolicyState]:
    """One autoscaling decision. Pure: same inputs, same outputs."""
    load = metrics.load
    target = metrics.target_replicas
    per_replica = config.target_per_replica
    if state.last_target == 0 and target > 0:
        state = replace(_record(state, _serve_cold_start(metrics, now)), falling=False)

    sized, sizing, state, rate_floor = _sized_load(metrics, config, state, now)
    needed = math.ceil(sized / per_replica - 1e-9)
    reason = f"{sizing} at {per_replica:g} per replica needs {needed}"
    by_rate = _rate_sized(config, state)
    if by_rate is not None and by_rate.needed >= needed:
        needed, reason = by_rate.needed, by_rate.reason
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
    # A model whose replicas are loading has not been idle: the period starts once they run
    # (counted from the deploy, a model slower to load than scale_to_zero_idle_s went to zero
    # the moment it came up). Replicas stuck starting count as idle, so a model that cannot be
    # placed still goes to zero.
    idle_since = None
    if not load and not _starting_not_stuck(starting_since, now):
        idle_since = state.idle_since_s if state.idle_since_s is not None else now
    state = replace(
        state,
        kv_high_since_s=kv_high_since,
        idle_since_s=idle_since,
        starting_since_s=starting_since,
    )

    floor = _floor(config, state, target, now)
    # Fewest replicas that hold the load with the hysteresis margin: below this, scale down.
    fits_with_margin = math.ceil(sized / (per_replica * (1 - config.downscale_hysteresis)) - 1e-9)
    if by_rate is not None:
        # The rate alone says when fewer replicas do: near capacity the in-flight count swings
        # with the batch, and it would hold (or shed) what the rate does not need.
        fits_with_margin = by_rate.fits_with_margin
    elif rate_floor > fits_with_margin:
        # Little's law cuts both ways: at light load requests finish faster, so fewer are in
        # flight per request/s, and the in-flight count alone would shed replicas the arrival
        # rate still needs (a diurnal evening went 3 -> 1 and straight back up).
        fits_with_margin = rate_floor
        reason = f"{reason}; the arrival rate needs {rate_floor} at the measured throughput"
    kv_floor = _kv_floor(metrics, config)
    if kv_floor > fits_with_margin:
        # A replica the KV rule added is not asked for by the load: shed on the load alone, the
        # same KV would pass the threshold on fewer replicas and add it back, every delay.
        fits_with_margin = kv_floor
        reason = f"{reason}; KV usage {metrics.kv_cache_usage:.2f} needs {kv_floor} with the margin"

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
        # The surplus is the load's: min_replicas or the scale-to-zero floor stopping the step
        # short does not make a load that fell to nothing a drift of one replica.
        short = _short_delay(config, target - fits_with_margin, state)
        delay = _delay(config, target, short)
        if waited + 1e-9 >= delay:
            new = max(fits_with_margin, floor, target - config.downscale_max_step)
            direction = "down"
            reason = (
                f"{reason}; {fits_with_margin} with a {config.downscale_hysteresis:g} margin, "
                f"low for {waited:.0f} s"
                + (" (one replica over, in a fall)" if short is not None else "")
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
    if final != target or (capacity_limited and not _repeats_last(state, decision)):
        state = _record(state, decision)
    if final != target:
        state = replace(state, falling=final < target)
    return decision, replace(state, last_target=final)


def _record(state: PolicyState, decision: Decision) -> PolicyState:
    return replace(state, history=(*state.history, decision)[-DECISION_HISTORY:])


def _sized_load(
    metrics: ScalingMetrics, config: ScalingConfig, state: PolicyState, now: float
) -> tuple[float, str, PolicyState, int]:
    """The load the fleet is sized for, in requests in service at T per replica; how it was
    counted; the state with this tick's backlog, growth and throughput; and the fewest replicas
    whose throughput at T (as measured, without a margin) covers the arrival rate
    (0 while unknown, and with rate sizing, which has its own scale-down test).

    Little's law on the backlog: a replica finishes `throughput` requests per second, so a queue
    growing by g per second needs g / throughput more replicas to stop growing, and draining
    `backlog` within `drain_horizon_s` needs backlog / (horizon x throughput) more. Both are
    converted to requests in service (x T) and together never exceed the backlog itself, the old
    count (serving all of it at once is the fastest drain there is).
    """
    load = metrics.load
    if not isinstance(config, ModelAutoscalingConfig):
        return load, f"load {load:g}", state, 0
    per_replica = config.target_per_replica
    in_service = sum(min(r.running, per_replica) for r in metrics.replicas)
    backlog = load - in_service
    throughput = metrics.throughput_per_replica
    growth, service_growth = state.growth, state.service_growth
    rate_at_target, provisional = state.rate_at_target, state.rate_provisional
    arrivals, trend = state.arrivals, state.arrivals_trend
    # A replica that joins is flooded from the handles' queue at once, while the queue's
    # average lags by the look-back: for that tick the same requests count twice, and read as
    # growth (178/s on a 4x burst). The growth resumes from the new baseline the next tick.
    joined = len(metrics.replicas) != state.reporting
    settled_since = now if joined or state.settled_since_s is None else state.settled_since_s
    if state.backlog_s is not None and now > state.backlog_s:
        elapsed = now - state.backlog_s
        weight = min(1.0, elapsed / SMOOTHING_S)
        if not joined:
            growth += weight * ((backlog - (state.backlog or 0.0)) / elapsed - growth)
            service_growth += weight * (
                (in_service - (state.in_service or 0.0)) / elapsed - service_growth
            )
        # The arrival rate: what the replicas accepted plus the growth of the handles' queue.
        # Not while a joining replica's flood from the queue is in the averages (a look-back
        # and a push): accepted at once, its queue's average drops over the look-back, and the
        # two read as a surge (229/s on a 160/s burst).
        if now - settled_since >= config.look_back_period_s + config.metrics_interval_s:
            counted = metrics.arrived_per_s + (metrics.queued - (state.queued or 0.0)) / elapsed
            before = counted if arrivals is None else arrivals
            arrivals = before + min(1.0, elapsed / ARRIVALS_SMOOTHING_S) * (counted - before)
            trend += min(1.0, elapsed / TREND_SMOOTHING_S) * ((arrivals - before) / elapsed - trend)
        # The rate at T, learned in a steady state only: every batch near T, next to no queue,
        # the same replicas for SETTLE_S and the batches neither filling nor emptying. While
        # batches fill, requests finish at the rate they arrived a latency ago, below the rate
        # the batch sustains; a replica that just joined has a full batch and has finished
        # little, then finishes its flood at once. Learned there (whenever every batch was at T
        # or more), it read 9-15/s where a replica finishes 17.5 at T, and its rate floor held
        # 2-3 replicas too many all the way down a diurnal evening.
        near_target = metrics.replicas and all(
            r.running >= LEARN_SHARE * per_replica for r in metrics.replicas
        )
        steady = (
            now - settled_since >= SETTLE_S
            and abs(service_growth) <= STEADY_SHARE * in_service
            and backlog <= in_service * QUEUE_FREE
        )
        if near_target and steady and throughput > 0:
            previous = throughput if rate_at_target is None else rate_at_target
            learn = min(1.0, elapsed / LEARN_SMOOTHING_S)
            rate_at_target = previous + learn * (throughput - previous)
        # Until then, a provisional rate from any tick with every batch at T or more and not
        # deep in a queue: low (batches filling), so a floor on the safe side. Without any, a
        # burst's fleet went 11 -> 9 on the in-flight count, which under-counts at light
        # batches, and straight back up.
        at_target = metrics.replicas and all(r.running >= per_replica for r in metrics.replicas)
        if at_target and throughput > 0 and backlog <= in_service / 2:
            previous = throughput if provisional is None else provisional
            provisional = previous + weight * (throughput - previous)
    state = replace(
        state,
        backlog=backlog,
        backlog_s=now,
        growth=growth,
        in_service=in_service,
        service_growth=service_growth,
        reporting=len(metrics.replicas),
        settled_since_s=settled_since,
        rate_at_target=rate_at_target,
        rate_provisional=provisional,
        arrivals=arrivals,
        arrivals_trend=trend,
        queued=metrics.queued,
    )
    rate_at_target = rate_at_target or provisional  # from here on, the best estimate there is
    rate_floor = 0
    if rate_at_target:
        # A saturated replica (a batch far above T, long prefill chunks) finishes fewer requests
        # per second than at T, where the replicas being added will run: sized at the saturated
        # rate, a 4x burst asked for 20 replicas where 8 did.
        throughput = max(throughput, rate_at_target)
        if config.target_rate_per_replica is None:  # rate sizing has its own scale-down test
            # No hysteresis margin here: the rate was measured at T, below what a replica can
            # finish at most (with 0.2, a diurnal peak kept 11 replicas where 8 did).
            finished_and_growth = metrics.finished_per_s + max(0.0, growth)
            rate_floor = math.ceil(finished_and_growth / rate_at_target - 1e-9)
    if throughput <= 0 or backlog <= 0:
        return load, f"load {load:g}", state, rate_floor
    replicas = max(0.0, growth) / throughput + backlog / (config.drain_horizon_s * throughput)
    counted = min(backlog, replicas * per_replica)
    return (
        in_service + counted,
        (
            f"{in_service:g} in service + {backlog:g} waiting (growing {growth:.3g}/s; drained "
            f"over {config.drain_horizon_s:g} s at {throughput:.3g}/s per replica: "
            f"{counted:.3g} more in service)"
        ),
        state,
        rate_floor,
    )


class RateSizing(NamedTuple):
    needed: int  # replicas the arrival rate needs, ahead of its rise
    fits_with_margin: int  # fewest replicas the rate with its whole rise fits, with the margin
    reason: str


def _rate_sized(config: ScalingConfig, state: PolicyState) -> RateSizing | None:
    """Sizing on the arrival rate, when target_rate_per_replica is set and the rate counted."""
    if not isinstance(config, ModelAutoscalingConfig) or state.arrivals is None:
        return None
    per_replica = config.target_rate_per_replica
    if per_replica is None:
        return None
    rate = state.arrivals
    rising = max(0.0, config.rate_lead_s * state.arrivals_trend)
    lead = min(max(0.0, rising - LEAD_DEAD_ZONE * rate), LEAD_CAP * rate)
    needed = math.ceil((rate + lead) / per_replica - 1e-9)
    margin = per_replica * (1 - config.downscale_hysteresis)
    return RateSizing(
        needed=needed,
        fits_with_margin=math.ceil((rate + rising) / margin - 1e-9),
        reason=(
            f"arrival rate {rate:.3g}/s (+{lead:.3g} ahead of its rise) at "
            f"{per_replica:g}/s per replica needs {needed}"
        ),
    )


def _serve_cold_start(metrics: ScalingMetrics, now: float) -> Decision:
    """The 0 -> N step Serve's cold-start path took without calling the policy (ray/serve/
    autoscaling_policy.py `_get_cold_start_scale_up_replicas`: current replicas 0 and a queued
    request), recorded when the policy next runs so that the decision record has it."""
    return Decision(
        time_s=now,
        previous=0,
        target=metrics.target_replicas,
        desired=metrics.target_replicas,
        direction="up",
        reason=(
            f"cold start: Serve started {metrics.target_replicas} on a request queued at zero "
            "replicas (its fast path, seen at this tick)"
        ),
        load=metrics.load,
    )


def _kv_floor(metrics: ScalingMetrics, config: ScalingConfig) -> int:
    """The fewest replicas the reported KV usage fits on under the threshold, with the
    hysteresis margin (0 without KV reports): the scale-down test's counterpart of the KV rule."""
    if not isinstance(config, ModelAutoscalingConfig) or not metrics.replicas:
        return 0
    in_use = metrics.kv_cache_usage * len(metrics.replicas)  # in replicas' worth of KV cache
    limit = config.kv_usage_threshold * (1 - config.downscale_hysteresis)
    return math.ceil(in_use / limit - 1e-9)


def _repeats_last(state: PolicyState, decision: Decision) -> bool:
    """The decision holds at the same capacity limit as the last recorded one: recorded (logged,
    published) once, not on every control-loop tick while the cluster stays full. What the load
    asks for beyond it is not compared: its noise (3 one tick, 2 the next) made every tick a new
    record, and the holds pushed the real decisions out of `status`."""
    if not state.history:
        return False
    last = state.history[-1]
    return last.capacity_limited and last.target == decision.target


def _starting_not_stuck(starting_since_s: float | None, now: float) -> bool:
    """Replicas are starting, and not for so long that they look stuck (no room on the
    cluster, a crash loop): past that, the policy trusts the load again."""
    return starting_since_s is not None and now - starting_since_s < STARTING_HOLD_MAX_S


def _still_starting(metrics: ScalingMetrics, state: PolicyState, now: float) -> bool:
    """The last scale-up's replicas are starting (not stuck) beside running ones: no scale-down
    may cancel them yet."""
    return _starting_not_stuck(state.starting_since_s, now) and metrics.current_replicas > 0


def _floor(config: ScalingConfig, state: PolicyState, target: int, now: float) -> int:
    """The fewest replicas allowed now: min_replicas, except that a scale-to-zero model keeps one
    replica until it has been idle for `scale_to_zero_idle_s`, and goes to zero from one replica
    only (and, once at zero, stays there until a request arrives, which the cold-start rule
    handles). Why from one only: Serve's wrapper of a custom policy turns any other step to zero
    into a step to 1 (ray/serve/autoscaling_policy.py, "Downscaling to zero is only allowed
    from 1 -> 0"), and the next tick read the 1 it applied after the 0 asked for as a cold
    start, recording one that never happened."""
    if config.min_replicas > 0:
        return config.min_replicas
    if target == 0:
        return 0
    assert isinstance(config, ModelAutoscalingConfig)
    idle = state.idle_since_s
    if target == 1 and idle is not None and now - idle + 1e-9 >= config.scale_to_zero_idle_s:
        return 0
    return 1


def _short_delay(config: ScalingConfig, surplus: int, state: PolicyState) -> float | None:
    """downscale_delay_one_replica_s if it applies: the load fits exactly one replica fewer, in
    a fall (the target's last change was a step down). A slow fall sheds one replica at a time,
    and each step follows it closely. A burst's end leaves several, and bursts recur: its first
    step waits the whole delay. So does the first step after a rise: a load that swings across
    one replica's worth would otherwise take a replica off and back every swing. What it still
    takes off and back: a dip of one replica's worth, longer than the short delay and shorter
    than downscale_delay_s, any time after a step down until the load rises again; once, as
    that rise ends the fall. (Ending a fall after downscale_delay_s without a step as well cost
    diurnal seed 1 1.198 -> 1.205x the oracle: a slow fall's steps come further apart.)"""
    return config.downscale_delay_one_replica_s if surplus == 1 and state.falling else None


def _delay(config: ScalingConfig, target: int, short: float | None) -> float:
    """How long the load must stay low before a step down from `target` (`short`: the
    one-replica delay, when it applies)."""
    if target == 1 and isinstance(config, ModelAutoscalingConfig):
        # 1 -> 0 is governed by the idle period (checked in _floor), not the downscale delay.
        return 0.0
    return config.downscale_delay_s if short is None else short


# ---- the Ray Serve adapter ----------------------------------------------------------------------

KV_NAMESPACE = "inference_cluster"
METRIC_KEYS = ("running", "waiting", "kv_cache_usage", "finished_per_s", "arrived_per_s")


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
        before = PolicyState.from_dict(ctx.policy_state.get(KV_NAMESPACE))
        decision, state = decide(metrics, self._config, before, now)
        recorded = [d for d in state.history if d not in before.history]
        self._report(ctx.deployment_name, metrics, decision, recorded)
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
            ReplicaLoad(**{key: aggregated.get(key, {}).get(replica, 0.0) for key in METRIC_KEYS})
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
        checked_at, capacity = self._capacity_cache
        if now - checked_at >= 10.0:
            from deployments.placement import ReplicaPlacement, replicas_that_fit

            try:
                # Serve's own scheduler reads the same per-node view (cluster_node_info_cache).
                from ray._private.state import available_resources_per_node

                free = list(available_resources_per_node().values())
            except Exception:  # no Ray state (e.g. the controller is shutting down)
                return None
            spare = replicas_that_fit(ReplicaPlacement(**self._placement), free)
            # The capacity itself is what stays true until the next check: the spare room is
            # taken by the replicas a scale-up adds in the meantime.
            capacity = None if spare is None else target + spare
            self._capacity_cache = (now, capacity)
        return capacity

    def _report(
        self,
        deployment: str,
        metrics: ScalingMetrics,
        decision: Decision,
        recorded: Sequence[Decision],
    ) -> None:
        """The gauges for this tick; a log line and a published record per recorded change."""
        desired_gauge, current_gauge = self._metric_gauges()
        tags = {"deployment": deployment, "reason": _reason_kind(decision)}
        desired_gauge.set(decision.target, tags=tags)
        current_gauge.set(metrics.current_replicas, tags=tags)
        for change in recorded:
            logger.info(
                "autoscaling %s: %d -> %d replicas (%s)",
                deployment,
                change.previous,
                change.target,
                change.reason,
            )
        if recorded:
            self._publish_decisions(deployment, recorded)

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

    def _publish_decisions(self, deployment: str, decisions: Sequence[Decision]) -> None:
        """Append the decisions to the deployment's record in Ray's internal KV (GCS): the
        controller's policy state is not readable from outside, this record is."""
        from ray.experimental import internal_kv

        key = decisions_key(deployment)
        try:
            old = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
            history = json.loads(old) if old else []
            history = [*history, *map(asdict, decisions)][-DECISION_HISTORY:]
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
