"""Routing policies (see policy.py for the interface); registered by name in policy.POLICIES.

- `round_robin`: each request one further along the replicas.
- `pow2`: Ray Serve's default, the less loaded of two random replicas.
- `prefix_affinity`: a faithful baseline of Ray Serve LLM's PrefixCacheAffinityRouter.
- `cache_load`: ours; the replica where the request's first token is expected soonest.

Each policy class has a `Params` model (every field defaulted, unknown keys refused) so a config
can set and validate its parameters; `policy.create_policy(name, rng=..., **params)` builds one.
The policies import the interface types for annotations only, which lets policy.py import this
module for its registry.
"""

from __future__ import annotations

import math
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from itertools import islice, repeat
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from deployments.routing.prefix_index import PrefixIndex

if TYPE_CHECKING:
    from deployments.engines.base import EngineStats, KVCacheEvent
    from deployments.routing.policy import ReplicaView, RoutingRequest

# Entries of a policy's prefix index by default: a fleet of 32 replicas of the 8B/H100 profile
# caches ~27k blocks each (864k); a million entries take ~210 MB (python -m loadtest.bench_routing).
DEFAULT_MAX_INDEX_BLOCKS = 1_000_000


class PolicyParams(BaseModel):
    """Parameters of a policy; the base has none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _StatelessHooks:
    """The hooks of a policy that decides from the views alone."""

    def cached_blocks(self, request: RoutingRequest) -> dict[str, int] | None:
        return None

    def on_routed(self, request: RoutingRequest, replica_id: str) -> None:
        pass

    def on_first_output(self, request_id: str, replica_id: str) -> None:
        pass

    def on_finished(self, request_id: str, replica_id: str) -> None:
        pass

    def on_replica_stats(self, replica_id: str, stats: EngineStats) -> None:
        pass

    def on_replica_removed(self, replica_id: str) -> None:
        pass

    def on_kv_events(self, replica_id: str, events: Sequence[KVCacheEvent]) -> None:
        pass

    def tracked_requests(self) -> int:
        return 0


class RoundRobin(_StatelessHooks):
    """Each request starts one further along the candidates; the rest follow in cyclic order as
    fallbacks, so a full replica passes the request to the next one."""

    Params = PolicyParams

    def __init__(self, params: PolicyParams | None = None, *, rng: random.Random) -> None:
        del params, rng  # nothing to tune; deterministic by construction
        self._next = 0

    async def rank(
        self, request: RoutingRequest, replicas: Sequence[ReplicaView]
    ) -> list[list[str]]:
        n = len(replicas)
        if n == 0:
            return []
        start = self._next % n
        self._next = start + 1
        return [[replicas[(start + i) % n].replica_id] for i in range(n)]


def _pow2(rng: random.Random, replicas: Sequence[ReplicaView]) -> list[list[str]]:
    """Two replicas drawn at random, the one with fewer requests in flight first (ties at random:
    the draw order is random), then the others shuffled."""
    n = len(replicas)
    if n <= 1:
        return [[view.replica_id] for view in replicas]
    i, j = rng.sample(range(n), 2)
    a, b = replicas[i], replicas[j]
    if b.in_flight < a.in_flight:
        a, b = b, a
    groups = [[a.replica_id], [b.replica_id]]
    if n > 2:
        rest = [view.replica_id for k, view in enumerate(replicas) if k != i and k != j]
        rng.shuffle(rest)
        groups.append(rest)
    return groups


class PowerOfTwoChoices(_StatelessHooks):
    """Ray Serve's default: two replicas drawn at random, the one with fewer requests in flight
    at this router first (ties at random); the other replicas, shuffled, are the last resort."""

    Params = PolicyParams

    def __init__(self, params: PolicyParams | None = None, *, rng: random.Random) -> None:
        del params
        self._rng = rng

    async def rank(
        self, request: RoutingRequest, replicas: Sequence[ReplicaView]
    ) -> list[list[str]]:
        return _pow2(self._rng, replicas)


class PrefixAffinityParams(PolicyParams):
    """PrefixCacheAffinityRouter.initialize_state's defaults (Ray 2.60)."""

    imbalanced_threshold: float = Field(
        math.inf,
        gt=0,
        description="Load counts as imbalanced when the most and the least loaded candidates' "
        "requests in flight differ by more than this; then pow2 decides. Ray's default (inf) "
        "never looks at load.",
    )
    match_rate_threshold: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Below this share of the prompt matched, the request goes to the replicas "
        "the index credits with the fewest blocks (Ray's 'smallest tenants').",
    )
    max_index_blocks: int = Field(
        DEFAULT_MAX_INDEX_BLOCKS,
        ge=1,
        description="Entries of the prefix index (LRU beyond). Ray's tree is unbounded by default "
        "(do_eviction=False); the cap is never reached in the benchmarks.",
    )


class PrefixAffinity:
    """A faithful baseline of Ray Serve LLM's PrefixCacheAffinityRouter with its defaults
    (ray/llm/_internal/serve/routing_policies/prefix_aware/prefix_aware_router.py, Ray 2.60).

    Ray's logic, per request:
    1. pow2's choice is computed first and kept as the fallback;
    2. if the candidates' queue lengths differ by more than `imbalanced_threshold` (default inf:
       never), pow2 decides;
    3. else the prompt is matched against a prefix tree of everything routed so far: with a match
       rate (matched / prompt length) of at least `match_rate_threshold` (0.1) the replicas
       holding the longest match are chosen, else the "smallest tenants" (the replicas the tree
       credits with the least content); the caller takes the one with the fewest requests in
       flight among them;
    4. after routing, the whole prompt is inserted for the chosen replica. The tree never learns
       what the engines evict (do_eviction=False by default; even with it on, eviction is by the
       tree's own size, not engine truth).

    Where ours differs, and why it is still faithful:
    - Ray matches characters of the prompt text in a radix tree; this matches the prompt's token
      blocks (engine block size) in a PrefixIndex fed only by routing, never by KV events. The
      engine can reuse only whole blocks of an identical token prefix, so a block match is what a
      character match approximates; with the match rate measured in tokens the 0.1 threshold keeps
      its meaning (a tenth of the prompt). Tenant size is counted in blocks instead of characters.
    - Ray's tree is unbounded by default; ours has an LRU cap (`max_index_blocks`) so memory
      stays bounded. At the default cap it never evicts in the benchmarks.
    - Ray returns only the chosen replicas and retries with backoff while they are all full; the
      interface here wants every candidate ranked, so pow2's order follows as later groups and a
      full prefix holder spills rather than waits (a stronger baseline, if anything).
    - Ray's tree is one detached actor queried with blocking ray.get calls; ours is local.
    """

    Params = PrefixAffinityParams

    def __init__(self, params: PrefixAffinityParams | None = None, *, rng: random.Random) -> None:
        self._params = params or PrefixAffinityParams()
        self._rng = rng
        self._index = PrefixIndex(self._params.max_index_blocks)

    async def rank(
        self, request: RoutingRequest, replicas: Sequence[ReplicaView]
    ) -> list[list[str]]:
        fallback = _pow2(self._rng, replicas)
        if len(replicas) <= 1:
            return fallback
        loads = [view.in_flight for view in replicas]
        if max(loads) - min(loads) > self._params.imbalanced_threshold:
            return fallback
        chosen = self._prefix_choice(request, replicas)
        rest = [
            [replica_id for replica_id in group if replica_id not in chosen] for group in fallback
        ]
        return [list(chosen), *(group for group in rest if group)]

    def _prefix_choice(
        self, request: RoutingRequest, replicas: Sequence[ReplicaView]
    ) -> dict[str, None]:
        """The replicas Ray's _prefix_match_best_replicas picks, as an ordered set."""
        index = self._index
        matches = index.match(request.block_hashes)
        longest = max((matches.get(view.replica_id, 0) for view in replicas), default=0)
        matched_tokens = longest * (request.block_size or 0)
        if matched_tokens < self._params.match_rate_threshold * request.num_prompt_tokens:
            sizes = [index.blocks_held(view.replica_id) for view in replicas]
            smallest = min(sizes)
            return {
                view.replica_id: None
                for view, size in zip(replicas, sizes, strict=True)
                if size == smallest
            }
        # With no match at all Ray's tree answers with every candidate (only possible when the
        # threshold is 0).
        return {
            view.replica_id: None for view in replicas if matches.get(view.replica_id, 0) == longest
        }

    def cached_blocks(self, request: RoutingRequest) -> dict[str, int] | None:
        return self._index.match(request.block_hashes)

    def on_routed(self, request: RoutingRequest, replica_id: str) -> None:
        self._index.add(replica_id, request.block_hashes)

    def on_first_output(self, request_id: str, replica_id: str) -> None:
        pass

    def on_finished(self, request_id: str, replica_id: str) -> None:
        pass

    def on_replica_stats(self, replica_id: str, stats: EngineStats) -> None:
        pass

    def on_replica_removed(self, replica_id: str) -> None:
        self._index.remove_replica(replica_id)

    def on_kv_events(self, replica_id: str, events: Sequence[KVCacheEvent]) -> None:
        pass  # Ray's router never sees engine truth: that is the baseline

    def tracked_requests(self) -> int:
        return 0  # the index is per block, not per request


class CacheLoadParams(PolicyParams):
    """cache_load's knobs; all in prefill-token equivalents or ratios, so none needs calibrating
    to a GPU (see CacheLoad)."""

    decode_weight_tokens: float = Field(
        4.0,
        ge=0,
        description="What one request in flight at a replica adds to a new request's wait, in "
        "prefill tokens: the attention reads of one decoding sequence in each step the new "
        "request waits for (8B/H100: ~2k context x 4.3e-5 ms = 0.1 ms vs 0.029 ms per prefill "
        "token, ~3.4), rounded up for the step already under way.",
    )
    footprint_weight: float = Field(
        0.3,
        ge=0,
        description="What each token a replica has cached (as the index credits it) adds to its "
        "score: the demand its cache will attract. A 2048-token prefix costs 614, a few requests' "
        "worth of decode, so new prefixes spread evenly over the caches (as evenly as Ray's "
        "'smallest tenant' rule spreads them), yet never pull a request away from its own prefix, "
        "which saves the whole prefix. At 0.01, a burst of 1,024 requests over 64 new prefixes "
        "left 8 replicas with unequal shares (the busiest 1.13x the mean, TTFT p99 5.2x).",
    )
    spill_sigmas: float = Field(
        3.0,
        ge=0,
        description="Hot-prefix guard: a replica with more requests in flight than the fleet "
        "mean plus this many standard deviations is passed over. A balanced fleet's counts "
        "scatter like Poisson arrivals (standard deviation sqrt(mean)), so only a real pile-up "
        "trips it; and the bound tightens with load (mean 32: 1.5x, mean 128: 1.3x), where a "
        "pile-up starts to cost throughput.",
    )
    spill_floor: int = Field(
        16,
        ge=0,
        description="The guard leaves alone a replica with at most this many requests in flight: "
        "far from a full batch (vLLM batches up to 256; an H100's 8B decode step barely grows "
        "up to 64) a few more cost nothing, and a conversation's next turn stays with its cache.",
    )
    queue_weight: float = Field(
        0.25,
        ge=0,
        description="What a token of prefill queued ahead at a replica costs, relative to a "
        "token of the request's own prefill. Below 1 because the queue is an estimate that "
        "swings between reports, while a cached prefix is certain: at 1.0, a burst of 1,024 "
        "requests over 64 prefixes split prefixes across replicas (hit rate 0.872 vs 0.882, "
        "TTFT p90 3.7x prefix_affinity's); at 0.25 every prefix stays on one replica and real "
        "overload is left to the guard below.",
    )
    prefill_weight: float = Field(
        0.1,
        ge=0,
        description="What a token of prefill still running at a replica costs: the uncached "
        "prompt tokens of this router's requests there that have not sent their first output. "
        "The queue above misses them: vLLM admits a request into its running batch as soon as "
        "its blocks fit and chunks the prefill, so a replica the autoscaler just added took "
        "every new prompt while its cache was free, and they waited there. Without the term "
        "(and the cap below), diurnal autoscaling behind this policy met the SLO in 88.3% / "
        "85.0% of windows (seeds 0 / 1) against pow2's 98.3% / 96.7%; with both, pow2's. At "
        "0.25, a burst of multi-turn conversations on 8 replicas lost 7% of its cache hits "
        "(their holders were busy prefilling the burst), at 0.1 under 1%.",
    )
    footprint_cap_tokens: int = Field(
        128,
        ge=0,
        description="The footprint term counts at most this many cached tokens more than the "
        "emptiest replica's: it spreads new prefixes among replicas of about equal content, "
        "but an empty replica (one the autoscaler just added) is not worth a whole cache's "
        "footprint (27,000 blocks of 16: 130k token-equivalents) and does not draw every new "
        "prompt. Uncapped, joining replicas had a TTFT p95 of 2.6-5.8 s against 0.2-1.7 s "
        "elsewhere. With the cap and prefill_weight, bench_policies moved by at most 3% (a "
        "multi-turn burst on 8 replicas -1.8% throughput, a hot-prefix burst on 32 -2.9%).",
    )
    demand_window: int = Field(
        1000,
        ge=1,
        description="Routed requests over which a prefix's share of the traffic is counted (by "
        "its first block). A prefix whose share x replicas exceeds the replicas holding it is "
        "under-replicated: its holders above the fleet's mean load are passed over.",
    )
    max_index_blocks: int = Field(
        DEFAULT_MAX_INDEX_BLOCKS,
        ge=1,
        description="Entries (replica, block) of the prefix index; least recently used go first.",
    )


class _ReplicaLoad:
    """The router's view of the prefill waiting at one replica (see CacheLoad), in tokens."""

    __slots__ = (
        "foreign",
        "foreign_tokens",
        "free_blocks",
        "ours",
        "prefilling",
        "prefilling_tokens",
        "queued",
        "queued_tokens",
    )

    # This router's requests remembered per replica at most: a hook the caller never calls
    # cannot grow it forever (vLLM's max_num_seqs is 256 by default, max_ongoing_requests too).
    MAX_TRACKED = 4096

    def __init__(self) -> None:
        # This router's requests in flight there, in routing order: id -> (uncached tokens, KV
        # blocks they take at admission).
        self.ours: OrderedDict[str, tuple[int, int]] = OrderedDict()
        # Those believed waiting for admission, oldest first: id -> uncached tokens.
        self.queued: OrderedDict[str, int] = OrderedDict()
        self.queued_tokens = 0
        # Waiting requests the replica reported beyond all of ours (another router's), and their
        # prefill priced at the mean of ours when reported.
        self.foreign = 0
        self.foreign_tokens = 0.0
        # KV blocks free at the last report, less what the requests admitted since took.
        self.free_blocks = math.inf
        # Ours without a first output yet (queued or prefilling): id -> uncached tokens. The
        # router's own truth, current at every call (no engine report needed).
        self.prefilling: dict[str, int] = {}
        self.prefilling_tokens = 0

    @property
    def total(self) -> float:
        return self.queued_tokens + self.foreign_tokens

    def arrive(self, request_id: str, tokens: int, blocks: int) -> None:
        """A request is at the replica: admitted at its next step if nothing waits ahead and its
        blocks fit, else it queues (vLLM's FCFS admission)."""
        if not self.queued and not self.foreign and self.free_blocks >= blocks:
            self.free_blocks -= blocks
        else:
            self.queued[request_id] = tokens
            self.queued_tokens += tokens

    def routed(self, request_id: str, tokens: int, blocks: int) -> None:
        self.finished(request_id)  # routed again (a retry): count it once
        self.ours[request_id] = (tokens, blocks)
        self.prefilling[request_id] = tokens
        self.prefilling_tokens += tokens
        if len(self.ours) > self.MAX_TRACKED:
            self.finished(next(iter(self.ours)))
        self.arrive(request_id, tokens, blocks)

    def first_output(self, request_id: str) -> None:
        tokens = self.prefilling.pop(request_id, None)
        if tokens is not None:
            self.prefilling_tokens -= tokens

    def finished(self, request_id: str) -> None:
        self.ours.pop(request_id, None)
        self.first_output(request_id)
        tokens = self.queued.pop(request_id, None)
        if tokens is not None:
            self.queued_tokens -= tokens

    def reported(self, stats: EngineStats, mean_tokens: float) -> None:
        """Engine truth: the newest `num_waiting` of ours are the waiting ones (FCFS); they are
        admitted at the next step as far as the free blocks reach, the rest queue."""
        self.queued.clear()
        self.queued_tokens = 0
        waiting = min(stats.num_waiting, len(self.ours))
        self.foreign = stats.num_waiting - waiting
        self.foreign_tokens = self.foreign * mean_tokens
        self.free_blocks = (1.0 - stats.kv_cache_usage) * stats.num_total_blocks
        newest = reversed(self.ours.items())
        for request_id, (tokens, blocks) in reversed(list(islice(newest, waiting))):
            self.arrive(request_id, tokens, blocks)


class CacheLoad:
    """Ours, the default: the replica where the request's first token is expected soonest.

    Score of replica r (estimated TTFT there, in prefill-token equivalents: tokens whose prefill
    would take as long):

        queue_weight x queued prefill tokens at r      (its queue, see below)
      + prefill_weight x prefill tokens running at r (this router's requests there without a
                                                      first output yet, at their uncached tokens)
      + prompt tokens not cached at r            (prompt - leading blocks r holds x block size)
      + decode_weight_tokens x requests in flight at r   (decode work sharing the steps)
      + footprint_weight x tokens r has cached   (the demand its cache will attract, beyond the
                                                  emptiest replica's and at most
                                                  footprint_cap_tokens; a replica holding part
                                                  of the prompt pays only the emptiest's)

    Why tokens rather than seconds: prefill is compute-bound, so every term that is prefill scales
    with the same per-token cost and it cancels out of the comparison; only the decode term needs
    a ratio, which depends on the model's shape (KV bytes per token vs FLOPs per token), not on a
    measured latency. No calibration run, no drift when the GPU or the batch changes.

    The queue is the prefill waiting for admission at r: the router's own accounting, reconciled
    with engine truth at each stats report. vLLM admits a request at its next step when nothing
    waits ahead of it and its new blocks fit in the free KV cache, and a step prefills thousands
    of tokens; so a request routed to r counts as admitted, taking its uncached blocks out of r's
    free blocks as last reported, until r is believed full; from then on requests queue there
    with their uncached tokens. When r reports W requests waiting, vLLM's FCFS means the newest
    W of ours are those, and its free blocks are known again: the waiting ones are re-admitted
    against them (a request that arrived during the step being reported is not a queue); waiting
    requests beyond all of ours (another router's) count at the mean size of ours.
    Two simpler rules fail in the simulator. Counting every request routed since the last
    report as queued is wrong for up to a stats period (a 2k-token prefill takes ~60 ms on an
    H100, the report comes every second or so) and splits prefixes needlessly. Taking W at face
    value for a whole period makes every replica that just got a request look loaded until the
    next report, and the traffic herds onto the few that did not (random prompts: queues 2x the
    mean, TTFT p90 8x pow2's).

    Which blocks r holds comes from a PrefixIndex: added at once when a request is routed there
    (so the next request of a burst already sees it), then corrected by r's KV cache events
    (stored, removed, cleared): an evicted prefix stops attracting requests. The queue counts
    at `queue_weight` (a quarter) because it is an estimate that swings between reports while a
    cached prefix is certain: at full weight a burst splits prefixes that one replica each could
    serve better.

    The last term is the one that looks ahead. A new prefix's first request finds the same cost
    everywhere but load; yet wherever it lands, the prefix's later requests will follow. Without
    the term, new prefixes go wherever in-flight counts happen to be lowest at that instant, and
    the replicas end up owning unequal shares of the traffic (8 replicas, 64 prefixes: 7 to 10
    each, queues 1.2x the mean). Spreading cached content evenly spreads that future traffic
    (the same reason Ray's router sends unmatched requests to its "smallest tenant"), and the
    index counts what the engines really hold, evictions included. It only spreads new
    content: a replica holding part of the prompt pays the emptiest replica's footprint, so a
    conversation never leaves its own history for an emptier cache (multi-turn: without that
    floor, 0.70 of the possible 0.78 hit rate in a burst).

    Hot-prefix guard: a replica with more requests in flight than the fleet mean plus
    `spill_sigmas` standard deviations (and more than `spill_floor`) is passed over. Its best
    rival then gets the request, caches the prefix, and from then on shares it: a hot prefix ends
    up on as many replicas as its load needs. A fixed ratio (say 2x the mean) was tried: it
    either lets the holders of an 80% prefix carry twice their share at saturation (throughput
    14% under pow2's) or, set tighter, splits evenly spread prefixes on every Poisson burst at
    light load.

    Replication by demand: the guard alone lets a prefix carrying most of the traffic pile onto
    its first holders up to the bound (32 replicas, 80% on one prefix: TTFT p50 2x pow2's).
    So the policy counts each prefix's share of the last `demand_window` routed requests (by
    first block); while its holders are fewer than that share of the fleet (less two standard
    deviations of its count, so evenly shared prefixes never qualify), a holder above the mean
    in-flight count is passed over, and the prefix spreads to one more replica.

    Ties (e.g. idle replicas, none caching the prompt) are broken at random with the injected rng.
    Cost per decision: one index walk (O(prompt blocks)) and a few passes over the replicas.
    Groups returned: the choice, the runner-up, then the rest (the caller takes the least loaded).
    """

    Params = CacheLoadParams

    # The mean uncached tokens of routed requests: a plain mean of the first samples, then an
    # exponential one with this weight per new sample.
    _MEAN_WINDOW = 20
    _MIN_DEMAND_SAMPLES = 100

    def __init__(self, params: CacheLoadParams | None = None, *, rng: random.Random) -> None:
        self._params = params or CacheLoadParams()
        self._rng = rng
        self._index = PrefixIndex(self._params.max_index_blocks)
        self._loads: dict[str, _ReplicaLoad] = {}
        # Each replica's _ReplicaLoad.total and .prefilling_tokens, as plain dicts: rank reads
        # them once per replica.
        self._queue: dict[str, float] = {}
        self._prefilling: dict[str, int] = {}
        self._mean_tokens = 0.0
        self._samples = 0
        # The matches of the request last ranked, reused when on_routed follows for it.
        self._last_request: str | None = None
        self._last_matches: dict[str, int] = {}
        # The first block of each of the last `demand_window` routed prompts, and how many of
        # them each first block begins: a prefix's share of the recent traffic.
        self._recent: deque[int] = deque()
        self._demand: Counter[int] = Counter()

    def _replicas_needed(self, first_block: int, num_replicas: int) -> float:
        """How many replicas a prefix's recent traffic surely needs to keep them at the fleet's
        mean load: its share of the recent requests (at least _MIN_DEMAND_SAMPLES of them, so
        a prefix's first requests are not all of the traffic) times the replicas, counting two
        standard deviations fewer of its requests (a Poisson count's), so that the scatter of
        evenly shared prefixes never reads as a hot one."""
        count = self._demand[first_block]
        samples = max(len(self._recent), self._MIN_DEMAND_SAMPLES)
        return max(count - 2 * math.sqrt(count), 0.0) / samples * num_replicas

    @property
    def index(self) -> PrefixIndex:
        return self._index

    async def rank(
        self, request: RoutingRequest, replicas: Sequence[ReplicaView]
    ) -> list[list[str]]:
        n = len(replicas)
        if n <= 1:
            return [[view.replica_id] for view in replicas]
        matches = self._index.match(request.block_hashes)
        self._last_request = request.request_id
        self._last_matches = matches
        params = self._params
        weight = params.decode_weight_tokens
        prompt = request.num_prompt_tokens
        # Per replica in a few C-level passes (this runs for every request over every replica).
        ids = [view.replica_id for view in replicas]
        in_flight = [view.in_flight for view in replicas]
        block_size = request.block_size or 0
        pressure = params.footprint_weight * block_size
        queue_weight, prefill_weight = params.queue_weight, params.prefill_weight
        # The footprint counts the blocks held beyond the emptiest replica's, capped.
        held = list(map(self._index.held.get, ids, repeat(0)))
        least = min(held)
        cap = least + (params.footprint_cap_tokens / block_size if block_size else 0.0)
        scores = [
            prompt
            + queue_weight * queued
            + prefill_weight * prefilling
            + weight * count
            + pressure * (min(blocks, cap) - least)
            for queued, prefilling, count, blocks in zip(
                map(self._queue.get, ids, repeat(0.0)),
                map(self._prefilling.get, ids, repeat(0)),
                in_flight,
                held,
                strict=True,
            )
        ]
        if matches:
            # A replica holding part of the prompt pays no more for its footprint than the
            # emptiest replica: the term spreads new prefixes, never pulls a request off its own.
            for i, matched in enumerate(map(matches.get, ids, repeat(0))):
                if matched:
                    scores[i] -= matched * block_size + pressure * (min(held[i], cap) - least)
        # The guard: a replica over the bound ranks last whatever its cache holds.
        mean = sum(in_flight) / n
        bound = max(mean + params.spill_sigmas * math.sqrt(mean), params.spill_floor)
        if max(in_flight) > bound:
            for i, count in enumerate(in_flight):
                if count > bound:
                    scores[i] = math.inf
        if matches and len(matches) < self._replicas_needed(request.block_hashes[0], n):
            # The prefix draws more traffic than its holders can take at the fleet's mean load:
            # a holder above the mean is passed over, so the prefix spreads to one more replica.
            for i, matched in enumerate(map(matches.get, ids, repeat(0))):
                if matched and in_flight[i] > mean:
                    scores[i] = math.inf
        # The choice and the runner-up by C-level scans (this runs for every request).
        best = min(scores)
        if scores.count(best) == 1:
            chosen = scores.index(best)
        else:
            chosen = self._rng.choice([i for i, score in enumerate(scores) if score == best])
        scores[chosen] = math.inf
        second = min(scores)
        runner_up = scores.index(second)
        if runner_up == chosen:  # everything was passed over: the next one in order
            runner_up = scores.index(second, chosen + 1)
        groups = [[ids[chosen]], [ids[runner_up]]]
        if n > 2:
            groups.append([ids[i] for i in range(n) if i != chosen and i != runner_up])
        return groups

    def cached_blocks(self, request: RoutingRequest) -> dict[str, int] | None:
        return self._matches(request)

    def _matches(self, request: RoutingRequest) -> dict[str, int]:
        if self._last_request == request.request_id:
            return self._last_matches
        return self._index.match(request.block_hashes)

    def on_routed(self, request: RoutingRequest, replica_id: str) -> None:
        matched = self._matches(request).get(replica_id, 0)
        self._last_request = None
        block_size = request.block_size or 0
        uncached = request.num_prompt_tokens - matched * block_size
        # Its new blocks, plus room for the first generated token (vLLM's admission check).
        blocks = -(-(uncached + 1) // block_size) if block_size else 0
        load = self._load(replica_id)
        load.routed(request.request_id, uncached, blocks)
        self._queue[replica_id] = load.total
        self._prefilling[replica_id] = load.prefilling_tokens
        self._samples += 1
        self._mean_tokens += (uncached - self._mean_tokens) / min(self._samples, self._MEAN_WINDOW)
        # At once, before the engine confirms: the next request with this prefix follows it.
        self._index.add(replica_id, request.block_hashes)
        if request.block_hashes:
            self._count_demand(request.block_hashes[0])

    def _count_demand(self, first_block: int) -> None:
        recent, demand = self._recent, self._demand
        recent.append(first_block)
        demand[first_block] += 1
        if len(recent) > self._params.demand_window:
            oldest = recent.popleft()
            demand[oldest] -= 1
            if not demand[oldest]:
                del demand[oldest]

    def on_first_output(self, request_id: str, replica_id: str) -> None:
        load = self._loads.get(replica_id)
        if load is not None:
            load.first_output(request_id)
            self._prefilling[replica_id] = load.prefilling_tokens

    def on_finished(self, request_id: str, replica_id: str) -> None:
        load = self._loads.get(replica_id)
        if load is not None:
            load.finished(request_id)
            self._queue[replica_id] = load.total
            self._prefilling[replica_id] = load.prefilling_tokens

    def on_replica_stats(self, replica_id: str, stats: EngineStats) -> None:
        load = self._load(replica_id)
        load.reported(stats, self._mean_tokens)
        self._queue[replica_id] = load.total

    def on_replica_removed(self, replica_id: str) -> None:
        self._loads.pop(replica_id, None)
        self._queue.pop(replica_id, None)
        self._prefilling.pop(replica_id, None)
        self._index.remove_replica(replica_id)

    def on_kv_events(self, replica_id: str, events: Sequence[KVCacheEvent]) -> None:
        self._index.apply(replica_id, events)

    def tracked_requests(self) -> int:
        # A request is queued only while it is one of ours (_ReplicaLoad.finished drops both).
        return sum(len(load.ours) for load in self._loads.values())

    def _load(self, replica_id: str) -> _ReplicaLoad:
        load = self._loads.get(replica_id)
        if load is None:
            load = self._loads[replica_id] = _ReplicaLoad()
        return load
