"""The whole cluster in virtual time: replicas, router, clients and (optionally) an autoscaler.

A discrete-event simulation on a heap of (time, sequence number, kind, payload): equal times run
in the order they were scheduled, so a run is a pure function of its inputs. Nothing sleeps and
nothing is random here besides what is injected (the policy's rng, the engines' seed).

- Replicas are `SimulatedEngineCore`s, the performance model the real simulated engine runs.
  Like `SimulatedEngine`'s step loop, a replica with work runs `step()` at once, its outputs are
  delivered `duration_s` later, and the next step starts at that same instant; requests added
  during a step join the next one.
- The router does what the real one does per request: chained block hashes of the prompt with the
  engines' block size, a `RoutingRequest`, one `ReplicaView` per routable replica (engine stats as
  last reported every `stats_period_s`, in-flight counts live), the policy's `rank`, then the
  first group with a replica below `max_ongoing_requests` (fewest in flight within a group). When
  every replica is full the request waits at the router, as in a Serve handle's queue, and is
  ranked again whenever a request finishes. The router's measured per-request overhead is one
  constant added between the client sending a request and the router placing it.
- Every `stats_period_s` each routable replica's KV cache events since the last report go to the
  policy (`on_kv_events`), then its engine stats (`on_replica_stats`): a real router's view of
  engine truth is that stale. The policy's own update when it routes a request is immediate.
- Clients behave as `loadtest run`'s: open loop, a session's first turn is due at its arrival
  time; closed loop, `max_concurrency` users each take the next session when their previous one
  ends. A later turn is due the think time after the previous answer (and not before a trace's
  recorded time), with the whole history as its prompt: previous prompt, the generated token ids
  (exact, where the HTTP client re-tokenizes the answer's text), the new turn's tokens. A failed
  turn ends its session. With `max_concurrency`, a due turn waits for one of that many request
  slots; `start_s` is when it got one, `scheduled_s` when it was due.
"""

from __future__ import annotations

import gc
import heapq
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from deployments.engines.base import EngineRequest, SamplingParams
from deployments.engines.profiles import PerformanceProfile
from deployments.engines.simulated import SampledToken, SimulatedEngineCore
from deployments.routing.hashing import block_hashes
from deployments.routing.policy import ReplicaView, RoutingPolicy, RoutingRequest
from loadtest.simulator.ideal import IdealPrefixCache
from loadtest.spec import RequestRecord, Session

T = TypeVar("T")

_OK = 200
_REJECTED = 400  # what the real router answers for a prompt too long for the model


def resolve(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends, without an event loop.

    Policies never await real I/O, so the first `send` runs them to the end. One that suspends
    (awaits a future) cannot run in virtual time: that is an error here, not a hang.
    """
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError(
        f"{coro.__qualname__} suspended: the simulator runs only coroutines that "
        "never await real I/O"
    )


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """The replicas and the router being simulated."""

    profile: PerformanceProfile
    num_replicas: int
    engine_seed: int = 0  # the config's simulated.seed, as every real replica gets
    vocab_size: int | None = None  # the tokenizer's, as the real replicas use; None: the profile's
    max_model_len: int | None = None  # prompt + max_tokens above it is rejected (400)
    max_ongoing_requests: int = 256  # per replica, as Serve enforces it
    router_overhead_s: float = 0.0
    stats_period_s: float = 1.0  # how often replicas report engine stats to the router

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {self.num_replicas}")
        if self.router_overhead_s < 0:
            raise ValueError(f"router_overhead_s must be >= 0, got {self.router_overhead_s}")
        if self.stats_period_s <= 0:
            raise ValueError(f"stats_period_s must be positive, got {self.stats_period_s}")


@dataclass(frozen=True, slots=True)
class AutoscalingMetrics:
    """What an autoscaling policy sees at each evaluation."""

    num_replicas: int  # replicas taking requests (draining ones excluded)
    # Per replica, what LLMServer.record_autoscaling_stats() reports: waiting, running,
    # kv_cache_usage, finished_per_s.
    replica_metrics: Mapping[str, Mapping[str, float]]
    num_queued: int  # requests held at the router because every replica was full
    num_starting: int = 0  # replicas asked for but not routable yet (replica_start_s)


# (metrics, state, now) -> (target replicas, state); the state starts as None.
AutoscalingHook = Callable[[AutoscalingMetrics, Any, float], tuple[int, Any]]


@dataclass(frozen=True, slots=True)
class SimulationResult:
    records: list[RequestRecord]  # in send order
    duration_s: float  # from the start to the last request's end
    cache_hit_rate: float
    ideal_cache_hit_rate: float
    load_imbalance: float  # the busiest replica's busy time over the mean
    replicas_over_time: list[tuple[float, int]]
    # Replicas holding resources (routable, starting, and removed but finishing their requests)
    # at each change: what an autoscaler pays.
    allocated_over_time: list[tuple[float, int]]
    busy_s: dict[str, float]  # per replica that ever existed
    # Per replica that ever existed, its requests in flight (its queue: waiting + running)
    # averaged over the run; and the largest of these over their mean.
    mean_in_flight: dict[str, float]
    queue_imbalance: float
    # Over completed requests the policy predicted for (none for policies without a cache
    # view): cached prompt tokens it predicted at the chosen replica, and those the engine found.
    cached_tokens_predicted: int = 0
    cached_tokens_found: int = 0

    def figures(self) -> dict[str, Any]:
        """The simulate-only figures of summary.json."""
        return {
            "cache_hit_rate": self.cache_hit_rate,
            "ideal_cache_hit_rate": self.ideal_cache_hit_rate,
            "load_imbalance": self.load_imbalance,
            "queue_imbalance": self.queue_imbalance,
            "replicas_over_time": [[t, n] for t, n in self.replicas_over_time],
            "replica_busy_s": self.busy_s,
            "replica_mean_in_flight": self.mean_in_flight,
            "cached_tokens_predicted": self.cached_tokens_predicted,
            "cached_tokens_found": self.cached_tokens_found,
        }


def simulate(
    fleet: FleetSpec,
    policy: RoutingPolicy,
    sessions: Sequence[Session],
    arrival_times: Sequence[float] | None,
    *,
    max_concurrency: int | None = None,
    autoscaler: AutoscalingHook | None = None,
    autoscaling_interval_s: float = 1.0,
    replica_start_s: float = 0.0,
) -> SimulationResult:
    """Run the workload to completion in virtual time.

    `arrival_times` holds one time per session (open loop); None is a closed loop of
    `max_concurrency` users (one when None). Without an autoscaler the fleet is fixed. A replica
    the autoscaler adds takes `replica_start_s` to become routable (engine start, weights load).
    """
    if arrival_times is not None and len(arrival_times) != len(sessions):
        raise ValueError(
            f"{len(arrival_times)} arrival times for {len(sessions)} sessions: one each"
        )
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
    if any(not session.turns for session in sessions):
        raise ValueError("every session needs at least one turn")
    if autoscaling_interval_s <= 0:
        raise ValueError(f"autoscaling_interval_s must be positive, got {autoscaling_interval_s}")
    if replica_start_s < 0:
        raise ValueError(f"replica_start_s must be >= 0, got {replica_start_s}")
    run = _Run(
        fleet,
        policy,
        sessions,
        max_concurrency,
        autoscaler,
        autoscaling_interval_s,
        replica_start_s=replica_start_s,
    )
    return run.execute(arrival_times)


# Event kinds: indexes into _Run._handlers.
_DUE, _ROUTE, _STEP_END, _STATS, _SCALE, _READY = range(6)


class _Replica:
    __slots__ = (
        "arrived",
        "arrived_reported",
        "busy_s",
        "core",
        "finished",
        "finished_reported",
        "in_flight",
        "in_flight_s",
        "in_flight_since",
        "outputs",
        "replica_id",
        "stepping",
        "view",
    )

    def __init__(self, replica_id: str, core: SimulatedEngineCore) -> None:
        self.replica_id = replica_id
        self.core = core
        self.view: ReplicaView | None = None  # cached until its in-flight count changes
        self.in_flight = 0
        # The integral of in_flight over time, up to in_flight_since.
        self.in_flight_s = 0.0
        self.in_flight_since = 0.0
        self.busy_s = 0.0
        # Requests it completed and accepted, and those counts at the last autoscaling tick (for
        # the rates).
        self.finished = 0
        self.finished_reported = 0
        self.arrived = 0
        self.arrived_reported = 0
        self.stepping = False  # a step is under way; its outputs are in `outputs`
        self.outputs: list[SampledToken] = []

    def add_in_flight(self, t: float, delta: int) -> None:
        self.in_flight_s += self.in_flight * (t - self.in_flight_since)
        self.in_flight_since = t
        self.in_flight += delta
        self.view = None

    def current_view(self) -> ReplicaView:
        if self.view is None:
            self.view = ReplicaView(self.replica_id, in_flight=self.in_flight)
        return self.view


class _SessionRun:
    __slots__ = ("history", "index", "next_turn", "session", "stored_tokens")

    def __init__(self, index: int, session: Session) -> None:
        self.index = index
        self.session = session
        self.next_turn = 0
        # The previous turns' prompts and answers: the prefix of the next turn's prompt.
        self.history: tuple[int, ...] = ()
        # Tokens of that history whose KV the engine computed (all but the last answer token).
        self.stored_tokens = 0


class _Flight:
    """One request between the client sending it and its last token."""

    __slots__ = (
        "generated",
        "predicted",
        "prompt",
        "record",
        "replica",
        "request",
        "run",
        "sampling",
    )

    def __init__(
        self,
        run: _SessionRun,
        prompt: tuple[int, ...],
        sampling: SamplingParams,
        record: RequestRecord,
    ) -> None:
        self.run = run
        self.prompt = prompt
        self.sampling = sampling
        self.record = record
        self.request: RoutingRequest | None = None
        self.replica: _Replica | None = None
        # Only kept when a later turn needs the answer in its history.
        self.generated: list[int] | None = None
        # Prompt tokens the policy believed its replica had cached (None: it keeps no view).
        self.predicted: int | None = None


class _Run:
    def __init__(
        self,
        fleet: FleetSpec,
        policy: RoutingPolicy,
        sessions: Sequence[Session],
        max_concurrency: int | None,
        autoscaler: AutoscalingHook | None,
        autoscaling_interval_s: float,
        replica_start_s: float = 0.0,
    ) -> None:
        self._fleet = fleet
        self._replica_start_s = replica_start_s
        self._policy = policy
        self._block_size = fleet.profile.block_size
        self._runs = [_SessionRun(i, s) for i, s in enumerate(sessions)]
        self._remaining = sum(len(s.turns) for s in sessions)  # turns neither ended nor dropped
        self._max_concurrency = max_concurrency
        self._autoscaler = autoscaler
        self._autoscaler_state: Any = None
        self._autoscaling_interval_s = autoscaling_interval_s
        self._last_scale_s = 0.0

        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._handlers: tuple[Callable[[float, Any], None], ...] = (
            self._on_due,
            self._on_route,
            self._on_step_end,
            self._on_stats,
            self._on_scale,
            self._on_ready,
        )
        self._starting: dict[str, _Replica] = {}  # added by the autoscaler, not routable yet
        # Removed by the autoscaler and finishing their requests: still holding their GPUs.
        self._draining: dict[str, _Replica] = {}
        self._allocated_series: list[tuple[float, int]] = []

        self._replicas: dict[str, _Replica] = {}  # routable, in creation order
        self._all_replicas: list[_Replica] = []
        self._next_replica = 0
        self._replica_series: list[tuple[float, int]] = []
        self._flights: dict[str, _Flight] = {}
        self._router_queue: deque[_Flight] = deque()
        self._router_queue_draining = False
        # Closed loop: the sessions no user has taken yet.
        self._unstarted: deque[_SessionRun] = deque()
        # Request slots (--concurrency): free ones, and the turns waiting for one, FIFO.
        self._free_slots = max_concurrency
        self._slot_queue: deque[tuple[_SessionRun, float]] = deque()
        self._records: list[RequestRecord] = []
        self._sampling: dict[int, SamplingParams] = {}
        self._ideal = IdealPrefixCache(self._block_size)
        self._last_end = 0.0
        # Over the completed requests the policy made a prediction for: the cached prompt
        # tokens it predicted at their replica, and those the engine found.
        self._cached_predicted = 0
        self._cached_found = 0

    # -- the loop ------------------------------------------------------------------------------

    def execute(self, arrival_times: Sequence[float] | None) -> SimulationResult:
        for _ in range(self._fleet.num_replicas):
            self._add_replica()
        self._replica_series.append((0.0, len(self._replicas)))
        self._allocated_series.append((0.0, len(self._replicas)))
        self._push(0.0, _STATS, None)
        if self._autoscaler is not None:
            self._push(self._autoscaling_interval_s, _SCALE, None)
        if arrival_times is None:
            # Closed loop: each user takes the next session when its previous one ends.
            self._unstarted.extend(self._runs)
            for _ in range(min(self._max_concurrency or 1, len(self._runs))):
                self._push(0.0, _DUE, self._unstarted.popleft())
        else:
            for run, arrival in zip(self._runs, arrival_times, strict=True):
                self._push(float(arrival), _DUE, run)

        heap = self._heap
        handlers = self._handlers
        pop = heapq.heappop
        # The run allocates millions of short-lived acyclic objects (outputs, token times): the
        # cyclic collector would rescan the growing set of live records again and again (a fifth
        # of the run time at 10,000 requests) and find nothing to free.
        collecting = gc.isenabled()
        gc.disable()
        try:
            while heap:
                t, _, kind, payload = pop(heap)
                handlers[kind](t, payload)
        finally:
            if collecting:
                gc.enable()
        return self._result()

    def _push(self, t: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    # -- clients -------------------------------------------------------------------------------

    def _on_due(self, t: float, run: _SessionRun) -> None:
        """The session's next turn is due: send it, or queue it for a request slot."""
        slots = self._free_slots
        if slots is not None:
            if slots == 0:
                self._slot_queue.append((run, t))
                return
            self._free_slots = slots - 1
        self._send(t, run, t)

    def _send(self, t: float, run: _SessionRun, scheduled: float) -> None:
        k = run.next_turn
        turn = run.session.turns[k]
        prompt = run.history + turn.prompt_token_ids
        record = RequestRecord(
            index=len(self._records),  # send order, as the HTTP runner numbers them
            session_id=run.session.session_id,
            turn=k,
            scheduled_s=scheduled,
            start_s=t,
            end_s=t,
            status=0,
            prompt_tokens=len(prompt),
        )
        self._records.append(record)
        sampling = self._sampling.get(turn.max_tokens)
        if sampling is None:
            # ignore_eos: the load test asks for exactly max_tokens, as the HTTP runner does.
            sampling = SamplingParams(max_tokens=turn.max_tokens, ignore_eos=True)
            self._sampling[turn.max_tokens] = sampling
        flight = _Flight(run, prompt, sampling, record)
        if k + 1 < len(run.session.turns):
            flight.generated = []
        # Always an event, even without overhead: no chain of calls grows with the workload.
        self._push(t + self._fleet.router_overhead_s, _ROUTE, flight)

    # -- the router ----------------------------------------------------------------------------

    def _on_route(self, t: float, flight: _Flight) -> None:
        max_len = self._fleet.max_model_len
        max_tokens = flight.sampling.max_tokens
        if max_len is not None and len(flight.prompt) + max_tokens > max_len:
            message = (
                f"prompt ({len(flight.prompt)}) + max_tokens ({max_tokens}) exceeds the model's "
                f"max_model_len ({max_len})"
            )
            self._finish(t, flight, _REJECTED, message)
            return
        flight.request = RoutingRequest(
            request_id=f"s{flight.run.index}-t{flight.record.turn}",
            block_hashes=block_hashes(flight.prompt, self._block_size),
            num_prompt_tokens=len(flight.prompt),
            block_size=self._block_size,
        )
        if self._router_queue or not self._place(t, flight):
            self._router_queue.append(flight)  # FIFO behind the ones already waiting

    def _place(self, t: float, flight: _Flight) -> bool:
        """Rank the routable replicas for the request and send it to the first with room."""
        request = flight.request
        assert request is not None
        replicas = self._replicas
        views = [replica.current_view() for replica in replicas.values()]
        groups = resolve(self._policy.rank(request, views))
        limit = self._fleet.max_ongoing_requests
        for group in groups:
            best: _Replica | None = None
            for replica_id in group:
                replica = replicas[replica_id]
                load = replica.in_flight
                if load < limit and (best is None or load < best.in_flight):
                    best = replica
            if best is not None:
                self._dispatch(t, flight, best)
                return True
        return False

    def _drain_router_queue(self, t: float) -> None:
        # A request the engine refuses finishes inside the drain, and finishing drains the queue:
        # that inner drain leaves the work to this loop (nesting one per refusal overflowed the
        # stack behind a few hundred refused requests).
        if self._router_queue_draining:
            return
        self._router_queue_draining = True
        queue = self._router_queue
        while queue:
            flight = queue.popleft()
            if not self._place(t, flight):
                queue.appendleft(flight)
                break
        self._router_queue_draining = False

    def _dispatch(self, t: float, flight: _Flight, replica: _Replica) -> None:
        request = flight.request
        assert request is not None
        # Built without validation: every field comes from data validated when it was made.
        engine_request = EngineRequest.model_construct(
            request_id=request.request_id,
            prompt_token_ids=flight.prompt,
            sampling=flight.sampling,
            cache_salt=None,
        )
        try:
            # The router's hashes: the same block size and (no) salt as the engine's.
            replica.core.add_request(engine_request, request.block_hashes)
        except ValueError as exc:  # more KV blocks than the whole cache: the engine refuses it
            self._finish(t, flight, _REJECTED, str(exc))
            return
        run = flight.run
        if run.stored_tokens:
            # The previous turn's answer was cached when it finished.
            self._ideal.store(request.block_hashes[: run.stored_tokens // self._block_size])
        self._ideal.observe(request.block_hashes, request.num_prompt_tokens)
        flight.replica = replica
        flight.record.replica = replica.replica_id
        self._flights[request.request_id] = flight
        replica.add_in_flight(t, 1)
        replica.arrived += 1
        believed = self._policy.cached_blocks(request)
        if believed is not None:
            flight.predicted = believed.get(replica.replica_id, 0) * self._block_size
        self._policy.on_routed(request, replica.replica_id)
        if not replica.stepping:
            self._step(t, replica)

    # -- the replicas --------------------------------------------------------------------------

    def _step(self, t: float, replica: _Replica) -> None:
        # The step's tokens, not validated EngineOutputs: a run has millions.
        duration_s, outputs = replica.core.step_sampled()
        if not outputs and not replica.core.has_work():
            replica.stepping = False  # nothing to run: the next request wakes it
            return
        replica.stepping = True
        replica.busy_s += duration_s
        replica.outputs = outputs
        self._push(t + duration_s, _STEP_END, replica)

    def _on_step_end(self, t: float, replica: _Replica) -> None:
        outputs = replica.outputs
        # As in SimulatedEngine's loop, the next step starts before anyone reacts to these outputs.
        if replica.core.has_work():
            self._step(t, replica)
        else:
            replica.stepping = False
            replica.outputs = []
        flights = self._flights
        for output in outputs:
            flight = flights[output.request_id]
            record = flight.record
            if not record.token_times_s:
                request = flight.request
                assert request is not None and flight.replica is not None
                self._policy.on_first_output(request.request_id, flight.replica.replica_id)
            record.token_times_s.append(t)
            record.output_tokens += 1
            if flight.generated is not None:
                flight.generated.append(output.token_id)
            if output.finish_reason is not None:
                record.cached_tokens = output.num_cached_tokens
                if flight.predicted is not None:
                    self._cached_predicted += flight.predicted
                    self._cached_found += output.num_cached_tokens
                self._finish(t, flight, _OK, None)

    def _on_stats(self, t: float, _: None) -> None:
        policy = self._policy
        for replica in self._replicas.values():
            events = replica.core.drain_kv_events()
            if events:
                policy.on_kv_events(replica.replica_id, events)
            policy.on_replica_stats(replica.replica_id, replica.core.stats())
        if self._remaining:
            self._push(t + self._fleet.stats_period_s, _STATS, None)

    def _finish(self, t: float, flight: _Flight, status: int, error: str | None) -> None:
        record = flight.record
        record.end_s = t
        record.status = status
        record.error = error
        self._remaining -= 1
        self._last_end = max(self._last_end, t)
        replica = flight.replica
        if replica is not None:
            request = flight.request
            assert request is not None
            del self._flights[request.request_id]
            replica.add_in_flight(t, -1)
            if status == _OK:
                replica.finished += 1
            if not replica.in_flight and self._draining.pop(replica.replica_id, None):
                self._note_allocated(t)
            self._policy.on_finished(request.request_id, replica.replica_id)

        if self._free_slots is not None:
            # The slot passes straight to the longest-waiting turn.
            if self._slot_queue:
                waiting, scheduled = self._slot_queue.popleft()
                self._send(t, waiting, scheduled)
            else:
                self._free_slots += 1

        run = flight.run
        run.next_turn += 1
        turns = run.session.turns
        if status == _OK and flight.generated is not None:
            run.history = flight.prompt + tuple(flight.generated)
            run.stored_tokens = len(run.history) - 1
            due = t + run.session.think_time_s
            # A trace's turn also waits for the time it was recorded at.
            recorded = turns[run.next_turn].arrival_s
            self._push(due if recorded is None else max(due, recorded), _DUE, run)
        else:
            # The session is over: done, or a failed turn leaves the rest unsent.
            self._remaining -= len(turns) - run.next_turn
            if self._unstarted:
                self._on_due(t, self._unstarted.popleft())
        if self._router_queue:
            self._drain_router_queue(t)

    # -- the fleet -----------------------------------------------------------------------------

    def _add_replica(self, t: float = 0.0, start_s: float = 0.0) -> None:
        fleet = self._fleet
        replica_id = f"replica-{self._next_replica}"
        self._next_replica += 1
        core = SimulatedEngineCore(
            fleet.profile, seed=fleet.engine_seed, vocab_size=fleet.vocab_size
        )
        replica = _Replica(replica_id, core)
        self._all_replicas.append(replica)
        if start_s > 0:
            self._starting[replica_id] = replica
            self._push(t + start_s, _READY, replica)
        else:
            self._replicas[replica_id] = replica

    def _on_ready(self, t: float, replica: _Replica) -> None:
        if self._starting.pop(replica.replica_id, None) is None:
            return  # cancelled by a scale-down while it was starting
        self._replicas[replica.replica_id] = replica
        self._replica_series.append((t, len(self._replicas)))
        self._drain_router_queue(t)

    def _on_scale(self, t: float, _: None) -> None:
        assert self._autoscaler is not None
        elapsed = t - self._last_scale_s
        self._last_scale_s = t
        metrics = AutoscalingMetrics(
            num_replicas=len(self._replicas),
            replica_metrics={
                replica_id: _autoscaling_stats(replica, elapsed)
                for replica_id, replica in self._replicas.items()
            },
            num_queued=len(self._router_queue),
            num_starting=len(self._starting),
        )
        target, self._autoscaler_state = self._autoscaler(metrics, self._autoscaler_state, t)
        # Scale to zero is not modelled: a request waiting for a replica that never comes would
        # keep the simulation running forever.
        target = max(1, target)
        routable = len(self._replicas)
        allocated = routable + len(self._starting)
        if target > allocated:
            for _ in range(target - allocated):
                self._add_replica(t, self._replica_start_s)
            self._drain_router_queue(t)
        while target < allocated and self._starting:
            # Like Serve, a scale-down first cancels replicas that are still starting.
            cancelled = self._starting.pop(next(reversed(self._starting)))
            self._all_replicas.remove(cancelled)  # it never ran: no busy time to account
            allocated -= 1
        current = len(self._replicas)
        if target < current:
            # Stop the replicas with the least in flight, newest first on ties; like Serve's
            # graceful shutdown, a stopped replica gets no new requests but finishes its own.
            newest_first = reversed(list(self._replicas.values()))
            victims = sorted(newest_first, key=lambda r: r.in_flight)[: current - target]
            for replica in victims:
                del self._replicas[replica.replica_id]
                if replica.in_flight:
                    self._draining[replica.replica_id] = replica
                self._policy.on_replica_removed(replica.replica_id)
        if len(self._replicas) != routable:
            self._replica_series.append((t, len(self._replicas)))
        self._note_allocated(t)
        if self._remaining:
            self._push(t + self._autoscaling_interval_s, _SCALE, None)

    def _allocated(self) -> int:
        return len(self._replicas) + len(self._starting) + len(self._draining)

    def _note_allocated(self, t: float) -> None:
        if self._allocated() != self._allocated_series[-1][1]:
            self._allocated_series.append((t, self._allocated()))

    # -- figures -------------------------------------------------------------------------------

    def _result(self) -> SimulationResult:
        queries = hits = 0
        for replica in self._all_replicas:
            stats = replica.core.stats()
            queries += stats.prefix_cache_queries
            hits += stats.prefix_cache_hits
        busy = {replica.replica_id: replica.busy_s for replica in self._all_replicas}
        mean_busy = sum(busy.values()) / len(busy)
        end = self._last_end
        in_flight: dict[str, float] = {}
        for replica in self._all_replicas:
            replica.add_in_flight(end, 0)
            in_flight[replica.replica_id] = replica.in_flight_s / end if end > 0 else 0.0
        mean_in_flight = sum(in_flight.values()) / len(in_flight)
        series = [*self._replica_series, (self._last_end, len(self._replicas))]
        return SimulationResult(
            records=self._records,
            duration_s=self._last_end,
            cache_hit_rate=hits / queries if queries else 0.0,
            ideal_cache_hit_rate=self._ideal.hit_rate,
            # Every replica idle the whole run (zero-latency profile) is perfectly balanced.
            load_imbalance=max(busy.values()) / mean_busy if mean_busy > 0 else 1.0,
            replicas_over_time=series,
            allocated_over_time=[*self._allocated_series, (self._last_end, self._allocated())],
            busy_s=busy,
            mean_in_flight=in_flight,
            queue_imbalance=(
                max(in_flight.values()) / mean_in_flight if mean_in_flight > 0 else 1.0
            ),
            cached_tokens_predicted=self._cached_predicted,
            cached_tokens_found=self._cached_found,
        )


def _autoscaling_stats(replica: _Replica, elapsed_s: float) -> dict[str, float]:
    """The same keys as LLMServer.record_autoscaling_stats; the completion and arrival rates are
    over the time since the previous tick, as the real replica's are since its previous report."""
    stats = replica.core.stats()
    finished = replica.finished - replica.finished_reported
    replica.finished_reported = replica.finished
    arrived = replica.arrived - replica.arrived_reported
    replica.arrived_reported = replica.arrived
    return {
        "waiting": float(stats.num_waiting),
        "running": float(stats.num_running),
        "kv_cache_usage": stats.kv_cache_usage,
        "finished_per_s": finished / elapsed_s if elapsed_s > 0 else 0.0,
        "arrived_per_s": arrived / elapsed_s if elapsed_s > 0 else 0.0,
    }
