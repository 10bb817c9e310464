"""The simulated engine: a performance model of one vLLM v1 replica.

`SimulatedEngineCore` is the model itself: synchronous and free of asyncio and Ray, so the cluster
simulator drives it in virtual time (call `step()`, advance the clock by `duration_s`, deliver the
outputs). `SimulatedEngine` runs the same core in real time behind the `Engine` protocol.

What it models, after vLLM v1's scheduler and KV cache manager:
- continuous batching: every decoding sequence gets one token per step, the rest of the token
  budget goes FCFS to prefill chunks (chunked prefill); a sequence samples its first token at the
  end of the step in which its prefill completes;
- a prefix cache of `num_kv_blocks` blocks keyed by the router's chained block hashes: blocks of
  finished requests stay cached and are evicted least recently used first, and a full hit still
  recomputes the prompt's last token;
- recompute preemption when a decoding sequence needs a block and none is free;
- admission only when the whole prompt fits in the free blocks (vLLM's
  scheduler_reserve_full_isl). Unlike vLLM, which then takes blocks chunk by chunk, the model
  takes the whole prompt's blocks at admission: while a prompt longer than a step's token budget
  is prefilled, KV usage counts all its blocks (a 30k-token prompt under an 8192 budget: 1875
  from its first chunk on, where vLLM counts 512, 1024, 1536, then 1875) and its later chunks
  never preempt. A prompt of the benchmarks (1024 tokens) is at most 64 of the 8B/H100
  profile's 27,000 blocks;
- step time from the profile's additive cost model (see profiles.py).

Generated tokens are uniform random ids, deterministic per (engine seed, request seed or id, choice)
and independent of scheduling, so a run replays exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from deployments.engines.base import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    EngineDeadError,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    KVCacheEvent,
    SamplingParams,
    TokenLogprob,
)
from deployments.engines.profiles import PerformanceProfile
from deployments.routing.hashing import block_hashes, chain_hashes

Detokenize = Callable[[Sequence[int]], str]

DEFAULT_MAX_KV_EVENTS = 10_000
_REPLACEMENT_CHAR = "\ufffd"


class Clock(Protocol):
    """Time as the engine sees it; injected so tests and simulations need not wait."""

    def now(self) -> float:
        """Seconds on a monotonic scale."""

    async def sleep(self, seconds: float) -> None:
        """Let `seconds` pass; must yield to the event loop even when time is virtual."""


class RealClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True, slots=True)
class StepResult:
    """One engine step: it lasts `duration_s`, and `outputs` are delivered at its end."""

    duration_s: float
    outputs: list[EngineOutput]


class SampledToken(NamedTuple):
    """One choice's token from one step: the fields of its `EngineOutput`, not yet validated.

    The virtual-time simulator takes these from `step_sampled()`: it consumes millions per run,
    and validating an EngineOutput per token was a third of its run time.
    """

    request_id: str
    index: int
    token_id: int
    text: str
    logprobs: TokenLogprob | None
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int

    def output(self) -> EngineOutput:
        return EngineOutput(
            request_id=self.request_id,
            index=self.index,
            token_ids=(self.token_id,),
            text=self.text,
            logprobs=None if self.logprobs is None else (self.logprobs,),
            finish_reason=self.finish_reason,
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=self.num_cached_tokens,
        )


_WAITING, _RUNNING, _FINISHED = 0, 1, 2
_NO_TOKENS: frozenset[int] = frozenset()


class _Seq:
    """One choice of a request: vLLM v1 runs each of the n choices as its own request."""

    __slots__ = (
        "blocks",
        "hashes",
        "holdback",
        "index",
        "min_text_len",
        "num_cached",
        "num_computed",
        "num_hashed",
        "num_prompt",
        "prefilled",
        "request_id",
        "rng",
        "salt",
        "sampling",
        "state",
        "stop_ids",
        "text_sent",
        "tokens",
    )

    def __init__(
        self, request: EngineRequest, index: int, hashes: list[int], rng: random.Random
    ) -> None:
        sampling = request.sampling
        self.request_id = request.request_id
        self.index = index
        self.sampling: SamplingParams = sampling
        self.salt = request.cache_salt
        self.stop_ids = frozenset(sampling.stop_token_ids)
        # Like vLLM's detokenizer, hold back what could be the start of a stop string, so no
        # emitted text ever has to be taken back.
        self.holdback = max(map(len, sampling.stop), default=1) - 1
        # Length of the text of the first min_tokens tokens: a stop string must end after it.
        self.min_text_len = 0
        self.rng = rng
        self.tokens: list[int] = list(request.prompt_token_ids)
        self.num_prompt = len(self.tokens)
        # Tokens whose KV is in this sequence's blocks.
        self.num_computed = 0
        # Prompt tokens found in the prefix cache at the first admission; -1 until then.
        self.num_cached = -1
        # True once it has sampled since its last admission: it decodes from then on.
        self.prefilled = False
        self.blocks: list[int] = []
        # Chained hashes of the full blocks of the tokens known at admission.
        self.hashes = hashes
        # Leading blocks already offered to the prefix cache.
        self.num_hashed = 0
        self.state = _WAITING
        self.text_sent = 0


class SimulatedEngineCore:
    """vLLM v1's scheduler and KV cache, as a cost model; one `step()` is one forward pass."""

    def __init__(
        self,
        profile: PerformanceProfile,
        *,
        seed: int = 0,
        detokenize: Detokenize | None = None,
        vocab_size: int | None = None,
        max_kv_events: int = DEFAULT_MAX_KV_EVENTS,
    ) -> None:
        if vocab_size is not None and vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if max_kv_events <= 0:
            raise ValueError(f"max_kv_events must be positive, got {max_kv_events}")
        self._seed = seed
        self._detokenize = detokenize
        self._vocab = vocab_size if vocab_size is not None else profile.vocab_size
        self._vocab_bits = self._vocab.bit_length()
        self._logprob = -math.log(self._vocab)
        self._block_size = profile.block_size
        self._num_blocks = profile.num_kv_blocks
        self._max_seqs = profile.max_num_seqs
        self._max_batched_tokens = profile.max_num_batched_tokens
        # Per-step cost constants, in seconds; a table because decode_ms interpolates per call.
        self._decode_s = [profile.decode_ms(b) / 1000 for b in range(self._max_seqs + 1)]
        self._kv_read_s = profile.kv_read_ms_per_token / 1000
        self._prefill_s = profile.prefill_ms_per_token / 1000
        self._cached_s = profile.cached_prefix_ms_per_token / 1000

        self._requests: dict[str, list[_Seq]] = {}
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # admission order: the tail is preempted first

        # Physical blocks, as vLLM's block pool. Blocks are created on first use (a huge cache
        # costs nothing up front); like vLLM's free queue, never-used blocks go first, then
        # released ones in release order, so the least recently used cached block is evicted.
        self._num_pristine = self._num_blocks
        self._ref: list[int] = []
        self._block_hash: list[int | None] = []
        self._free: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}

        self._events: deque[KVCacheEvent] = deque()
        self._max_events = max_kv_events
        self._events_dropped = 0
        self._queries = 0
        self._hits = 0
        self._preemptions = 0

    # -- requests ------------------------------------------------------------------------------

    def add_request(
        self, request: EngineRequest, prompt_hashes: Sequence[int] | None = None
    ) -> None:
        """Queue a request; raises ValueError for a duplicate id or one the cache cannot hold.

        `prompt_hashes`: the prompt's `block_hashes` with this engine's block size and the
        request's salt, from a caller that has them already (the simulator's router), so they
        are not computed twice.
        """
        request_id = request.request_id
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already in the engine")
        sampling = request.sampling
        bs = self._block_size
        # vLLM refuses at startup a KV cache that cannot hold max_model_len; here the check is
        # per request, as a request larger than the cache would wait (or preempt itself) forever.
        needed = -(-(len(request.prompt_token_ids) + sampling.max_tokens) // bs)
        if needed > self._num_blocks:
            raise ValueError(
                f"request {request_id!r} needs {needed} KV blocks for prompt + max_tokens; the "
                f"cache holds {self._num_blocks}"
            )
        if prompt_hashes is None:
            hashes = block_hashes(request.prompt_token_ids, bs, request.cache_salt)
        else:
            hashes = list(prompt_hashes)
        key = f"seed:{sampling.seed}" if sampling.seed is not None else f"id:{request_id}"
        seqs = [_Seq(request, i, hashes, self._rng(key, i)) for i in range(sampling.n)]
        self._requests[request_id] = seqs
        self._waiting.extend(seqs)

    def abort(self, request_id: str) -> bool:
        """Drop a request and release its blocks to the prefix cache; False if unknown."""
        seqs = self._requests.pop(request_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            if seq.state == _RUNNING:
                self._running.remove(seq)
                self._release(seq)
            elif seq.state == _WAITING:
                self._waiting.remove(seq)
            seq.state = _FINISHED
        return True

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> StepResult:
        """Schedule and run one forward pass. Zero duration and no outputs when idle."""
        duration_s, sampled = self.step_sampled()
        return StepResult(duration_s, [token.output() for token in sampled])

    def step_sampled(self) -> tuple[float, list[SampledToken]]:
        """`step()`, with each output as the unvalidated `SampledToken` it is built from."""
        budget = self._max_batched_tokens
        running = self._running
        decodes: list[_Seq] = []
        prefills: list[tuple[_Seq, int]] = []
        context = 0
        new_tokens = 0
        cached_under = 0
        preemptions_before = self._preemptions

        # 1. One token for every decoding sequence, in admission order.
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            i += 1
            if not seq.prefilled:
                continue
            n = seq.num_computed
            if n // self._block_size >= len(seq.blocks) and not self._grow(seq):
                break  # it preempted itself: it was the most recently admitted
            decodes.append(seq)
            context += n + 1
            budget -= 1

        # 2. Then the chunked prefills already under way, then 3. admissions, FCFS; like vLLM, no
        # admissions in a step that had to preempt (the cache is full).
        pending: deque[_Seq] = deque(seq for seq in running if not seq.prefilled)
        admit = self._preemptions == preemptions_before
        waiting = self._waiting
        while budget > 0:
            if pending:
                seq = pending.popleft()
            elif admit and waiting and len(running) < self._max_seqs and self._admit(waiting[0]):
                seq = waiting.popleft()
                running.append(seq)
            else:
                break
            chunk = min(len(seq.tokens) - seq.num_computed, budget)
            cached_under += seq.num_computed
            new_tokens += chunk
            budget -= chunk
            prefills.append((seq, chunk))
            # vLLM commits blocks when it schedules them, so a request admitted later in this
            # same step already hits them (the forward pass writes KV before attending to it).
            self._commit(seq, (seq.num_computed + chunk) // self._block_size)

        num_seqs = len(decodes) + len(prefills)
        if num_seqs == 0:
            return 0.0, []
        duration = (
            self._decode_s[num_seqs]
            + self._kv_read_s * context
            + self._prefill_s * new_tokens
            + self._cached_s * cached_under
        )

        outputs: list[SampledToken] = []
        finished = False
        for seq in decodes:
            seq.num_computed += 1
            finished |= self._sample(seq, outputs)
        for seq, chunk in prefills:
            seq.num_computed += chunk
            if seq.num_computed == len(seq.tokens):
                finished |= self._sample(seq, outputs)
        if finished:
            self._running = [seq for seq in self._running if seq.state == _RUNNING]
        return duration, outputs

    # -- observation ---------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        # Counts are per choice: vLLM runs the n choices of a request as n requests.
        return EngineStats(
            num_waiting=len(self._waiting),
            num_running=len(self._running),
            kv_cache_usage=(self._num_blocks - self._num_free()) / self._num_blocks,
            block_size=self._block_size,
            num_total_blocks=self._num_blocks,
            prefix_cache_queries=self._queries,
            prefix_cache_hits=self._hits,
        )

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block, as vLLM's reset_prefix_cache: refused (False) while any
        request holds blocks, since their blocks could not be forgotten (a waiting one holds
        none)."""
        if self._num_free() < self._num_blocks:
            return False
        for block in self._hash_to_block.values():
            self._block_hash[block] = None
        self._hash_to_block.clear()
        self._emit_event(AllBlocksCleared())
        return True

    def drain_kv_events(self) -> list[KVCacheEvent]:
        """KV cache events since the last drain, oldest first."""
        events = list(self._events)
        self._events.clear()
        return events

    @property
    def kv_events_dropped(self) -> int:
        """Events lost because nobody drained the bounded buffer in time."""
        return self._events_dropped

    @property
    def num_preemptions(self) -> int:
        return self._preemptions

    # -- scheduling internals ------------------------------------------------------------------

    def _admit(self, seq: _Seq) -> bool:
        """Look the sequence up in the prefix cache and take its blocks, if they fit now."""
        bs = self._block_size
        num_tokens = len(seq.tokens)
        # At least the last token is recomputed: its logits are needed to sample.
        limit = min((num_tokens - 1) // bs, len(seq.hashes))
        hit: list[int] = []
        for h in seq.hashes[:limit]:
            block = self._hash_to_block.get(h)
            if block is None:
                break
            hit.append(block)
        ref = self._ref
        hit_evictable = sum(1 for block in hit if ref[block] == 0)
        # Room for the first generated token too, so admission does not cause a preemption.
        if -(-(num_tokens + 1) // bs) - len(hit) > self._num_free() - hit_evictable:
            return False
        for block in hit:
            if ref[block] == 0:
                del self._free[block]
            ref[block] += 1
        seq.blocks = hit + self._allocate(-(-num_tokens // bs) - len(hit))
        seq.num_hashed = len(hit)
        seq.num_computed = len(hit) * bs
        seq.state = _RUNNING
        if seq.num_cached < 0:
            # vLLM's counters: prompt tokens queried and hit, first admissions only (a resumed
            # sequence's lookup would count its recompute as hits).
            seq.num_cached = seq.num_computed
            self._queries += num_tokens
            self._hits += seq.num_computed
        return True

    def _grow(self, seq: _Seq) -> bool:
        """Give a decoding sequence its next block, preempting from the tail if needed."""
        running = self._running
        while self._num_free() == 0:
            victim = running[-1]
            self._preempt_last()
            if victim is seq:
                return False
        seq.blocks.extend(self._allocate(1))
        return True

    def _preempt_last(self) -> None:
        """vLLM's recompute preemption of the most recently admitted sequence: drop its KV,
        requeue it first, recompute it on readmission."""
        seq = self._running.pop()
        self._release(seq)
        self._hash_blocks(seq, len(seq.tokens) // self._block_size)
        seq.num_computed = 0
        seq.num_hashed = 0
        seq.prefilled = False
        seq.state = _WAITING
        self._waiting.appendleft(seq)
        self._preemptions += 1

    def _sample(self, seq: _Seq, outputs: list[SampledToken]) -> bool:
        """Append the sequence's next token and its output; True if the sequence finished."""
        # seq.rng.randrange(vocab), inlined as CPython implements it (_randbelow_with_getrandbits:
        # draw bit_length(vocab) bits until below vocab), so the same ids without its two Python
        # calls per token (test_tokens_replay_earlier_runs pins ids randrange drew).
        getrandbits = seq.rng.getrandbits
        vocab = self._vocab
        sampling = seq.sampling
        # No stop token is drawn before min_tokens: vLLM's MinTokensLogitsProcessor masks them.
        early = len(seq.tokens) - seq.num_prompt < sampling.min_tokens
        banned = seq.stop_ids if early else _NO_TOKENS
        token = getrandbits(self._vocab_bits)
        while token >= vocab or token in banned:
            token = getrandbits(self._vocab_bits)
        seq.tokens.append(token)
        seq.prefilled = True
        finish: FinishReason | None = None
        if token in seq.stop_ids:
            finish = "stop"
        elif len(seq.tokens) - seq.num_prompt >= sampling.max_tokens:
            finish = "length"
        text = ""
        if self._detokenize is not None:
            text, hit_stop = self._text_delta(seq, finish is not None, finish == "stop")
            if hit_stop:
                finish = "stop"
        logprobs = None
        if sampling.logprobs is not None:
            logprobs = self._token_logprob(token, sampling.logprobs)
        outputs.append(
            SampledToken(
                seq.request_id,
                seq.index,
                token,
                text,
                logprobs,
                finish,
                seq.num_prompt,
                seq.num_cached,
            )
        )
        if finish is None:
            return False
        self._release(seq)
        seq.state = _FINISHED
        seqs = self._requests[seq.request_id]
        if all(s.state == _FINISHED for s in seqs):
            del self._requests[seq.request_id]
        return True

    def _text_delta(self, seq: _Seq, finished: bool, by_stop_token: bool) -> tuple[str, bool]:
        """New text of the choice since the last output, and whether a stop string ended it."""
        assert self._detokenize is not None
        sampling = seq.sampling
        output_ids = seq.tokens[seq.num_prompt :]
        num_output = len(output_ids)
        if by_stop_token and not sampling.include_stop_str_in_output:
            output_ids = output_ids[:-1]  # vLLM keeps a stop token's id but not its text
        text = self._detokenize(output_ids)
        if num_output == sampling.min_tokens:
            seq.min_text_len = len(text)
        hit_stop = False
        if sampling.stop and num_output > sampling.min_tokens:
            # Held-back text is never emitted, so an occurrence cannot start before text_sent;
            # like vLLM's detokenizer, one that ends within the first min_tokens tokens' text
            # does not count.
            found = [
                (i, i + len(s) if sampling.include_stop_str_in_output else i)
                for s in sampling.stop
                if (i := text.find(s, max(seq.text_sent, seq.min_text_len - len(s) + 1))) >= 0
            ]
            if found:
                text = text[: min(found)[1]]
                hit_stop = finished = True
        end = len(text)
        if not finished:
            end -= seq.holdback
            while end > seq.text_sent and text[end - 1] == _REPLACEMENT_CHAR:
                end -= 1  # an incomplete multi-byte character: wait for its other tokens
        if end <= seq.text_sent:
            return "", hit_stop
        delta = text[seq.text_sent : end]
        seq.text_sent = end
        return delta, hit_stop

    def _token_logprob(self, token: int, num_top: int) -> TokenLogprob:
        # The model is uniform: every token, the sampled one first, ties for the top.
        detokenize = self._detokenize
        lp = self._logprob
        top = tuple(
            (alt, detokenize([alt]) if detokenize else "", lp)
            for alt in ((token + i) % self._vocab for i in range(min(num_top, self._vocab)))
        )
        return TokenLogprob(
            token_id=token, token=detokenize([token]) if detokenize else "", logprob=lp, top=top
        )

    def _rng(self, key: str, index: int) -> random.Random:
        # hashlib, not hash(): the same stream in every process, whatever PYTHONHASHSEED is.
        digest = hashlib.blake2b(
            f"{self._seed}\x00{key}\x00{index}".encode(), digest_size=8
        ).digest()
        return random.Random(int.from_bytes(digest, "little"))

    # -- KV cache internals --------------------------------------------------------------------

    def _num_free(self) -> int:
        """Blocks no request holds: never used, empty, or cached and evictable."""
        return self._num_pristine + len(self._free)

    def _allocate(self, count: int) -> list[int]:
        blocks: list[int] = []
        evicted: list[int] = []
        ref = self._ref
        for _ in range(count):
            if self._num_pristine:
                self._num_pristine -= 1
                block = len(ref)
                ref.append(1)
                self._block_hash.append(None)
            else:
                block, _ = self._free.popitem(last=False)
                h = self._block_hash[block]
                if h is not None:
                    del self._hash_to_block[h]
                    self._block_hash[block] = None
                    evicted.append(h)
                ref[block] = 1
            blocks.append(block)
        if evicted:
            self._emit_event(BlocksRemoved(block_hashes=tuple(evicted)))
        return blocks

    def _commit(self, seq: _Seq, num_full_blocks: int) -> None:
        """Offer the sequence's leading full blocks to the prefix cache."""
        end = min(num_full_blocks, len(seq.hashes))
        if end <= seq.num_hashed:
            return
        stored: list[int] = []
        table = self._hash_to_block
        for i in range(seq.num_hashed, end):
            h = seq.hashes[i]
            # Another sequence computed the same block first: keep that one, as vLLM does.
            if h not in table:
                block = seq.blocks[i]
                table[h] = block
                self._block_hash[block] = h
                stored.append(h)
        seq.num_hashed = end
        if stored:
            self._emit_event(BlocksStored(block_hashes=tuple(stored)))

    def _release(self, seq: _Seq) -> None:
        """Unpin the sequence's blocks; its full computed blocks stay cached until evicted."""
        num_full = seq.num_computed // self._block_size
        # Blocks filled by generated tokens: hashed once here rather than per decode step.
        self._hash_blocks(seq, num_full)
        self._commit(seq, num_full)
        ref = self._ref
        # Tail blocks first, as vLLM frees them: a prefix's end is evicted before its start.
        for block in reversed(seq.blocks):
            ref[block] -= 1
            if ref[block] == 0:
                self._free[block] = None
        seq.blocks = []

    def _hash_blocks(self, seq: _Seq, num_full: int) -> None:
        """Extend the sequence's chained block hashes to its first `num_full` blocks."""
        hashes = seq.hashes
        if num_full <= len(hashes):
            return
        bs = self._block_size
        tokens = seq.tokens[len(hashes) * bs : num_full * bs]
        # Continuing the chain gives the hashes of hashing all the tokens again, at a fraction of
        # the cost. A new list: the choices of a request share their prompt's.
        if hashes:
            seq.hashes = hashes + chain_hashes(hashes[-1], tokens, bs)
        else:
            seq.hashes = block_hashes(tokens, bs, seq.salt)

    def _emit_event(self, event: KVCacheEvent) -> None:
        if len(self._events) >= self._max_events:
            self._events.popleft()
            self._events_dropped += 1
        self._events.append(event)


class _Stream:
    """What `generate` waits on: the request's outputs and its choices not yet finished."""

    __slots__ = ("open", "queue")

    def __init__(self, n: int) -> None:
        self.queue: asyncio.Queue[EngineOutput | BaseException] = asyncio.Queue()
        self.open = set(range(n))


class SimulatedEngine:
    """The `Engine` protocol over a `SimulatedEngineCore`, stepping in (injected) real time."""

    def __init__(
        self,
        profile: PerformanceProfile,
        *,
        seed: int = 0,
        detokenize: Detokenize | None = None,
        vocab_size: int | None = None,
        clock: Clock | None = None,
        max_kv_events: int = DEFAULT_MAX_KV_EVENTS,
    ) -> None:
        self._core = SimulatedEngineCore(
            profile,
            seed=seed,
            detokenize=detokenize,
            vocab_size=vocab_size,
            max_kv_events=max_kv_events,
        )
        self._clock: Clock = clock if clock is not None else RealClock()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closed = False

    @property
    def core(self) -> SimulatedEngineCore:
        return self._core

    async def start(self) -> None:
        self._ensure_running()

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self._ensure_running()
        request_id = request.request_id
        if request_id in self._streams:
            raise ValueError(f"request {request_id!r} is already in the engine")
        self._core.add_request(request)
        stream = _Stream(request.sampling.n)
        self._streams[request_id] = stream
        self._wakeup.set()
        try:
            while stream.open or not stream.queue.empty():
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            del self._streams[request_id]
            # The consumer left early (client disconnect, cancellation): free the KV now.
            if stream.open:
                self._core.abort(request_id)

    async def abort(self, request_id: str) -> None:
        self._core.abort(request_id)
        stream = self._streams.get(request_id)
        if stream is not None:
            self._finish_aborted(request_id, stream)

    async def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the step loop died: {self._error!r}") from self._error
        if self._closed:
            raise EngineDeadError("the engine was shut down")

    def stats(self) -> EngineStats:
        return self._core.stats()

    async def reset_prefix_cache(self) -> bool:
        return self._core.reset_prefix_cache()

    def drain_kv_events(self) -> list[KVCacheEvent]:
        return self._core.drain_kv_events()

    async def shutdown(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for request_id, stream in list(self._streams.items()):
            self._core.abort(request_id)
            self._finish_aborted(request_id, stream)

    def _ensure_running(self) -> None:
        if self._error is not None or self._closed:
            raise EngineDeadError("the engine cannot serve (dead or shut down)")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._step_loop(), name="simulated-engine-steps"
            )

    async def _step_loop(self) -> None:
        core = self._core
        clock = self._clock
        # When the running step ends on the profile's schedule. Steps follow each other on it, as
        # a GPU's do: the time this loop and the event loop spend between steps is part of the
        # step's duration, not added to it (sleeping the whole duration after that work ran the
        # engine 14-20% slower than its profile, the more the shorter the steps).
        step_end = clock.now()
        try:
            while True:
                if not core.has_work():
                    # No await between the check and the clear: generate() cannot slip in.
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    step_end = clock.now()  # idle time is not owed to the next steps
                    continue
                result = core.step()
                step_end += result.duration_s
                late_by = clock.now() - step_end
                if late_by < 0:
                    await clock.sleep(-late_by)
                else:
                    await asyncio.sleep(0)  # a step already due still lets the consumers run
                for output in result.outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is None or output.index not in stream.open:
                        # Aborted while the step ran: its consumer has gone, or has its final
                        # "abort" output already and must get nothing after it.
                        continue
                    if output.finish_reason is not None:
                        stream.open.discard(output.index)
                    stream.queue.put_nowait(output)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._error = exc
            dead = EngineDeadError(f"the step loop died: {exc!r}")
            for stream in self._streams.values():
                stream.open.clear()
                stream.queue.put_nowait(dead)

    @staticmethod
    def _finish_aborted(request_id: str, stream: _Stream) -> None:
        for index in sorted(stream.open):
            stream.queue.put_nowait(
                EngineOutput(request_id=request_id, index=index, finish_reason="abort")
            )
        stream.open.clear()
