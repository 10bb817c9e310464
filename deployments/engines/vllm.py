"""The vLLM engine: vLLM v1's AsyncLLM behind the Engine protocol.

Token ids in, token ids (and their text) out: the router already applied the chat template and
tokenized, so vLLM gets `prompt_token_ids` and never sees a string prompt.

vLLM is imported inside functions only: this module is also imported where vLLM is absent or where
importing it (several seconds, torch included) would be wasted, e.g. to validate a config file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import functools
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from deployments.config import ModelConfig
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
from deployments.routing.hashing import chain_hashes

if TYPE_CHECKING:
    import zmq
    from pydantic import TypeAdapter
    from vllm import CompletionOutput, RequestOutput
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase
    from vllm.v1.metrics.stats import SchedulerStats

# vLLM's finish reasons -> ours. "repetition" is vLLM's hallucination guard: a stop condition.
# "error" is absent on purpose: vLLM documents it as a retryable internal failure, so it raises.
_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "abort",
    "repetition": "stop",
}

logger = logging.getLogger(__name__)

DEFAULT_MAX_KV_EVENTS = 10_000
# Translations kept per KV block of the engine. Entries outlive their blocks (an evicted block's
# translation stays valid, see KVEventTranslator), so the map holds more than the cache does; a
# block whose entry was pushed out by this many newer ones has almost surely left vLLM's LRU
# cache too, and the price of being wrong is only an untranslated block.
_HASH_MAP_BLOCKS_FACTOR = 4
# The storage tier of vLLM's own prefix cache in its events (kv_events.MEDIUM_GPU, also on CPU
# builds); KV connectors report other tiers (offloaded copies), which the router does not index.
_PREFIX_CACHE_MEDIUM = "GPU"
_SUBSCRIBER_POLL_MS = 100  # how long close() may wait for the subscriber thread to notice
_REPLAY_TIMEOUT_MS = 1000
_REPLAY_END = (-1).to_bytes(8, "big", signed=True)  # ZmqEventPublisher.END_SEQ


class VLLMEngine:
    """One vLLM AsyncLLM (its EngineCore and workers run in processes it spawns)."""

    def __init__(self, model: ModelConfig) -> None:
        if model.engine != "vllm":
            raise ValueError(f"model {model.name!r} has engine {model.engine!r}, not vllm")
        self._model = model
        self._llm: AsyncLLM | None = None
        self._scheduler = _SchedulerSnapshot()
        self._kv_events = KVEventBuffer(DEFAULT_MAX_KV_EVENTS)
        self._kv_subscriber: KVEventSubscriber | None = None
        self._kv_events_dir: str | None = None

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if self._llm is not None:
            return
        # The EngineCore and its workers are spawned from this process and read their settings
        # (VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND, ...) from its environment. Under
        # Serve the replica's runtime_env holds the same; this covers an engine built without it.
        os.environ.update(engine_environment(self._model))
        endpoints: KVEventsEndpoints | None = None
        # A kv_events_config of the user's own is theirs to consume (or to switch events off).
        if "kv_events_config" not in self._model.engine_options:
            # ipc sockets in a private directory: unique per engine, local to this machine.
            self._kv_events_dir = tempfile.mkdtemp(prefix="vllm-kv-events-")
            endpoints = KVEventsEndpoints.in_directory(self._kv_events_dir)
        try:
            args = AsyncEngineArgs(**engine_kwargs(self._model, endpoints))
            # Building the engine blocks for the whole model load (25-60 s on CPU here); a thread
            # keeps the event loop (and the replica's health and metrics calls) responsive.
            self._llm = await asyncio.to_thread(
                AsyncLLM.from_engine_args,
                args,
                stat_loggers=[_stat_logger_factory(self._scheduler)],
            )
        except BaseException:
            self._remove_kv_events_dir()
            raise
        if endpoints is not None:
            cache = self._llm.vllm_config.cache_config
            translator = KVEventTranslator(
                block_size=cache.block_size,
                max_hashes=max(cache.num_gpu_blocks or 0, 1) * _HASH_MAP_BLOCKS_FACTOR,
            )
            # Subscribing only now is safe: no request (so no event) can precede start()'s end,
            # and a batch published before the subscription took effect is replayed (see
            # KVEventSubscriber).
            self._kv_subscriber = KVEventSubscriber(endpoints, translator, self._kv_events)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        from vllm import TokensPrompt
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

        llm = self._require_llm()
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        if request.cache_salt is not None:
            prompt["cache_salt"] = request.cache_salt
        stream: AsyncGenerator[RequestOutput, None] | None = None
        try:
            # vLLM 0.32 deprecates handing prompts to generate() unrendered; for token ids the
            # renderer only checks the length against max_model_len and carries the salt along.
            (engine_input,) = await llm.renderer.render_cmpl_async([prompt])
            stream = llm.generate(
                engine_input, _vllm_sampling_params(request.sampling), request.request_id
            )
            async for output in stream:
                for completion in output.outputs:
                    yield _engine_output(request, output, completion)
        except VLLMEngineDeadError as error:
            raise EngineDeadError(str(error) or "vLLM engine died") from error
        except VLLMClientError as error:
            raise ValueError(str(error)) from error
        finally:
            # When our consumer stops early (GeneratorExit) or is cancelled, vLLM's generator is
            # still open; closing it is what makes vLLM abort the request and free its blocks.
            if stream is not None:
                await stream.aclose()

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            # The external id aborts every choice of the request (vLLM fans n > 1 out).
            await self._llm.abort(request_id)

    async def check_health(self) -> None:
        llm = self._llm
        if llm is None:
            raise EngineDeadError("the vLLM engine is not running")
        try:
            await llm.check_health()
        except Exception as error:
            raise EngineDeadError(str(error) or "vLLM engine died") from error

    def stats(self) -> EngineStats:
        cache = self._require_llm().vllm_config.cache_config
        scheduler = self._scheduler
        return EngineStats(
            num_waiting=scheduler.num_waiting,
            num_running=scheduler.num_running,
            kv_cache_usage=min(max(scheduler.kv_cache_usage, 0.0), 1.0),
            block_size=cache.block_size,
            num_total_blocks=cache.num_gpu_blocks or 0,
            prefix_cache_queries=scheduler.prefix_cache_queries,
            prefix_cache_hits=scheduler.prefix_cache_hits,
        )

    async def reset_prefix_cache(self) -> bool:
        # vLLM refuses (False) while running requests hold blocks; on success its events say
        # AllBlocksCleared, which reaches the routers like any other event.
        return await self._require_llm().reset_prefix_cache()

    def drain_kv_events(self) -> list[KVCacheEvent]:
        """Prefix-cache events since the last drain, oldest first, keyed by our block hashes.

        Empty unless this engine enabled vLLM's KV events itself (no kv_events_config option).
        """
        return self._kv_events.drain()

    def kv_event_losses(self) -> KVEventLosses:
        """What engine truth missed so far: the router's index falls back on its own guesses."""
        subscriber = self._kv_subscriber
        return KVEventLosses(
            dropped_events=self._kv_events.dropped,
            untranslated_blocks=subscriber.translator.untranslated_blocks if subscriber else 0,
            missed_batches=subscriber.missed_batches if subscriber else 0,
        )

    async def shutdown(self) -> None:
        subscriber, self._kv_subscriber = self._kv_subscriber, None
        if subscriber is not None:
            await asyncio.to_thread(subscriber.close)
        llm, self._llm = self._llm, None
        if llm is not None:
            # vLLM's shutdown stops the EngineCore before it cancels its output handler, which
            # sees the process go first and logs an EngineDeadError on every clean stop (each
            # scale-down). With nothing in flight, cancel the handler first; requests still
            # running (past Serve's drain timeout) keep vLLM's order and end with its error.
            handler = getattr(llm, "output_handler", None)
            if handler is not None and llm.get_num_unfinished_requests() == 0:
                handler.cancel()
            # Joins the EngineCore and worker processes: blocking, so off the event loop.
            await asyncio.to_thread(llm.shutdown)
        self._remove_kv_events_dir()

    def _remove_kv_events_dir(self) -> None:
        directory, self._kv_events_dir = self._kv_events_dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def _require_llm(self) -> AsyncLLM:
        if self._llm is None:
            raise RuntimeError("VLLMEngine.start() has not completed")
        return self._llm


@dataclass(frozen=True)
class KVEventsEndpoints:
    """Where an engine's vLLM publishes its KV cache events, and where it replays missed ones."""

    publish: str
    replay: str
    topic: str = "kv-events"

    @classmethod
    def in_directory(cls, directory: str) -> KVEventsEndpoints:
        # ipc:// endpoints: vLLM binds them (it connects to tcp hosts instead), and nothing
        # outside this machine can reach them.
        return cls(publish=f"ipc://{directory}/events", replay=f"ipc://{directory}/replay")


def engine_environment(model: ModelConfig) -> dict[str, str]:
    """The environment of a replica's vLLM processes: our defaults, the model's engine_env over
    them. The EngineCore (and any worker process) is spawned from the replica and inherits it.

    - VLLM_NO_USAGE_STATS: vLLM reports usage statistics unless told not to, and a serving
      cluster should not phone home by default.
    - VLLM_ENABLE_V1_MULTIPROCESSING=0 for a one-worker CPU engine. Without it, vLLM's CPU
      platform runs the worker in a process of its own (the mp executor), and the EngineCore and
      the worker each busy-wait on their shared-memory queue for 1 s after every message
      (vLLM's SpinCondition). With it, the worker runs inside the EngineCore process (AsyncLLM
      keeps that process either way). Measured on `make serve` (2 replicas, 2 cores): decode-heavy
      1451-1781 vs 954-1120 output tok/s, and the engines' CPU per run halved (README).
    """
    environment = {"VLLM_NO_USAGE_STATS": "1"}
    if model.engine == "vllm" and model.device == "cpu" and model.num_workers == 1:
        environment["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return environment | model.engine_env


def engine_kwargs(model: ModelConfig, kv_events: KVEventsEndpoints | None = None) -> dict[str, Any]:
    """The AsyncEngineArgs of a model: its first-class fields plus its engine_options.

    With `kv_events`, vLLM publishes KV cache events there, unless the model's engine_options
    configure them (kv_events_config) already.
    """
    kwargs: dict[str, Any] = {}
    if model.device == "cpu" and model.tensor_parallel_size > 1:
        # vLLM refuses its Ray executor on CPU; TP workers there are local processes.
        kwargs["distributed_executor_backend"] = "mp"
    elif model.device == "gpu":
        # As in Ray Serve LLM: GPU workers are Ray actors in the replica's placement group (the
        # replica actor itself holds no GPU), which also lets pipeline stages span nodes.
        kwargs["distributed_executor_backend"] = "ray"
    kwargs.update(_coerce_engine_options(model.engine_options))
    kwargs.update(
        model=model.source,
        tokenizer=model.tokenizer_source,
        served_model_name=model.name,
        max_model_len=model.max_model_len,
        tensor_parallel_size=model.tensor_parallel_size,
        pipeline_parallel_size=model.pipeline_parallel_size,
        # The router routes by cached prefix: an engine without prefix caching defeats it.
        enable_prefix_caching=True,
    )
    if kv_events is not None and "kv_events_config" not in kwargs:
        from vllm.config.kv_events import KVEventsConfig

        kwargs["kv_events_config"] = KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=kv_events.publish,
            replay_endpoint=kv_events.replay,
            topic=kv_events.topic,
        )
    return kwargs


def validate_engine_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError unless every option is a field of vLLM's engine args with a valid value.

    Values are checked against the fields' type hints (nested configs such as
    `compilation_config` are validated as those configs); nothing touches files or the network.
    """
    _coerce_engine_options(options)


def _coerce_engine_options(options: Mapping[str, Any]) -> dict[str, Any]:
    from pydantic import ValidationError

    fields = _engine_arg_fields()
    coerced: dict[str, Any] = {}
    for key, value in options.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown vLLM engine option {key!r}{hint}")
        adapter = _type_adapter(key)
        if adapter is None:
            coerced[key] = value
            continue
        try:
            # Dicts become vLLM's config objects here (e.g. kv_events_config), as vLLM's CLI
            # would build them; EngineArgs itself only converts some of them.
            coerced[key] = adapter.validate_python(value)
        except ValidationError as error:
            problem = error.errors()[0]
            # The location names the culprit inside nested configs (compilation_config.mode).
            where = ".".join(map(str, (key, *problem["loc"])))
            raise ValueError(f"invalid vLLM engine option {where}: {problem['msg']}") from None
    return coerced


@functools.cache
def _engine_arg_fields() -> dict[str, dataclasses.Field[Any]]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return {field.name: field for field in dataclasses.fields(AsyncEngineArgs)}


@functools.cache
def _type_adapter(name: str) -> TypeAdapter[Any] | None:
    from pydantic import PydanticSchemaGenerationError, TypeAdapter

    try:
        return TypeAdapter(_engine_arg_fields()[name].type)
    except PydanticSchemaGenerationError:
        # A few hints name classes pydantic cannot validate (e.g. torch.dtype): vLLM checks them.
        return None


def _vllm_sampling_params(sampling: SamplingParams) -> VLLMSamplingParams:
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VLLMSamplingParams

    return VLLMSamplingParams(
        n=sampling.n,
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed,
        stop=list(sampling.stop),
        stop_token_ids=list(sampling.stop_token_ids),
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
        min_tokens=sampling.min_tokens,
        include_stop_str_in_output=sampling.include_stop_str_in_output,
        allowed_token_ids=(
            None if sampling.allowed_token_ids is None else list(sampling.allowed_token_ids)
        ),
        logprobs=sampling.logprobs,
        ignore_eos=sampling.ignore_eos,
        # Each output then carries only the new tokens, which is what EngineOutput promises.
        output_kind=RequestOutputKind.DELTA,
    )


def _engine_output(
    request: EngineRequest, output: RequestOutput, completion: CompletionOutput
) -> EngineOutput:
    finish_reason: FinishReason | None = None
    if completion.finish_reason is not None:
        if completion.finish_reason not in _FINISH_REASONS:
            raise RuntimeError(
                f"vLLM failed request {request.request_id} ({completion.finish_reason}); "
                "it may be retried"
            )
        finish_reason = _FINISH_REASONS[completion.finish_reason]
    logprobs = None
    if request.sampling.logprobs is not None and completion.logprobs is not None:
        logprobs = tuple(
            _token_logprob(token_id, position, request.sampling.logprobs)
            for token_id, position in zip(completion.token_ids, completion.logprobs, strict=True)
        )
    return EngineOutput(
        request_id=request.request_id,
        index=completion.index,
        token_ids=tuple(completion.token_ids),
        text=completion.text,
        logprobs=logprobs,
        finish_reason=finish_reason,
        num_prompt_tokens=len(request.prompt_token_ids),
        num_cached_tokens=output.num_cached_tokens or 0,
    )


def _token_logprob(token_id: int, position: Mapping[int, Any], num_top: int) -> TokenLogprob:
    # vLLM gives the sampled token plus the num_top most likely ones (the sampled token may be
    # among them, so there are num_top or num_top + 1 entries), each with its vocab rank.
    chosen = position[token_id]
    top = sorted(
        (entry.rank, alt_id, entry)
        for alt_id, entry in position.items()
        if entry.rank is not None and entry.rank <= num_top
    )
    return TokenLogprob(
        token_id=token_id,
        token=chosen.decoded_token or "",
        logprob=chosen.logprob,
        top=tuple((alt_id, entry.decoded_token or "", entry.logprob) for _, alt_id, entry in top),
    )


@dataclass
class _SchedulerSnapshot:
    """The latest scheduler state vLLM reported, and its prefix-cache counters summed."""

    num_waiting: int = 0
    num_running: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    def record(self, stats: SchedulerStats) -> None:
        self.num_running = stats.num_running_reqs
        # Deferred requests (waiting on a transient constraint) are waiting too; vLLM's own
        # num_requests_waiting metric counts both.
        self.num_waiting = stats.num_waiting_reqs + stats.num_skipped_waiting_reqs
        self.kv_cache_usage = stats.kv_cache_usage
        # Per-step deltas; preempted requests' re-lookups are left out, as in vLLM's
        # prefix_cache_queries/hits counters.
        self.prefix_cache_queries += stats.prefix_cache_stats.queries
        self.prefix_cache_hits += stats.prefix_cache_stats.hits


def _stat_logger_factory(
    snapshot: _SchedulerSnapshot,
) -> Callable[[VllmConfig, int], StatLoggerBase]:
    """A per-engine stat logger factory (vLLM's PerEngineStatLoggerFactory) feeding `snapshot`.

    A closure rather than a class with module state, so every VLLMEngine keeps its own numbers.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SnapshotStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: VllmConfig, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: SchedulerStats | None,
            iteration_stats: object | None,
            mm_cache_stats: object | None = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                snapshot.record(scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return SnapshotStatLogger


# -- KV cache events ------------------------------------------------------------------------------
#
# vLLM keys its prefix cache by its own chained block hashes (sha256 over the parent's hash, the
# block's tokens and extra keys such as the cache salt); the router keys its prefix index by ours
# (deployments/routing/hashing.py). Events therefore cross over in our hashes: a stored block's
# hash is our chain continued from its parent's hash over the block's tokens, which is what the
# router computes from the same prompt. Blocks that cannot be translated are skipped, which is
# safe: the router indexes a request's blocks itself when it routes it, and engine truth only
# adds what the engine really stored and removes what it really evicted.


@dataclass(frozen=True)
class KVEventLosses:
    """Engine truth the router did not get, counted since the engine started."""

    dropped_events: int  # translated, then pushed out of the buffer before anyone drained them
    untranslated_blocks: int  # stored or removed blocks with no hash of ours (see translator)
    missed_batches: int  # event batches lost between vLLM and us (beyond its replay buffer)


class _VLLMBlockStored(Protocol):
    """The fields of vllm.distributed.kv_events.BlockStored that translation reads."""

    block_hashes: Sequence[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: Sequence[int]
    block_size: int
    lora_id: int | None
    lora_name: str | None
    medium: str | None
    extra_keys: Sequence[tuple[Any, ...] | None] | None
    group_idx: int | None


class _VLLMBlockRemoved(Protocol):
    """The fields of vllm.distributed.kv_events.BlockRemoved that translation reads."""

    block_hashes: Sequence[int | bytes]
    medium: str | None
    group_idx: int | None


class KVEventTranslator:
    """vLLM's KV cache events -> ours, re-keyed from vLLM's block hashes to the router's.

    Keeps a bounded LRU map from vLLM's hash of each stored block to ours. A stored block's hash
    is our chain continued from its parent's hash (our root, salted with the request's cache salt
    when the block is the first of its prompt) over the block's tokens. A block whose parent is not
    in the map (the map forgot it, or its BlockStored was lost) cannot be translated: it is skipped
    and counted. Used from one thread at a time.
    """

    def __init__(self, block_size: int, max_hashes: int) -> None:
        if block_size <= 0 or max_hashes <= 0:
            raise ValueError(f"need positive sizes, got {block_size=} and {max_hashes=}")
        self._block_size = block_size
        self._max_hashes = max_hashes
        # vLLM's hash -> ours; ints unless VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0 makes them bytes.
        self._ours: OrderedDict[int | bytes, int] = OrderedDict()
        # vLLM's hash -> copies of the block in its prefix cache. vLLM does not de-duplicate
        # (v1/core/block_pool.py, BlockHashToBlockMap, NOTE #1): requests computing one block
        # at once cache a copy each, with a BlockStored each, and it evicts them one at a time,
        # with a BlockRemoved each. The replica holds the block until its last copy goes: an
        # earlier removal, passed on, made the router forget a prefix the engine still serves.
        # At most max_hashes entries (the oldest count dropped first: its next removal is then
        # passed on, as without counting).
        self._copies: dict[int | bytes, int] = {}
        self.untranslated_blocks = 0

    def __len__(self) -> int:
        return len(self._ours)

    def translate(self, events: Iterable[object]) -> list[KVCacheEvent]:
        """One batch of vLLM events (vLLM's classes, or anything with their names and fields)."""
        translated: list[KVCacheEvent] = []
        for event in events:
            # The class name is vLLM's msgpack tag of the event (msgspec tag=True), so it is part
            # of the published format; matching on it keeps this class free of vLLM's imports.
            kind = type(event).__name__
            ours: KVCacheEvent | None
            if kind == "BlockStored":
                ours = self._stored(cast(_VLLMBlockStored, event))
            elif kind == "BlockRemoved":
                ours = self._removed(cast(_VLLMBlockRemoved, event))
            elif kind == "AllBlocksCleared":
                # vLLM resets its prefix cache only when no block is in use: no chain continues.
                self._ours.clear()
                self._copies.clear()
                ours = AllBlocksCleared()
            else:
                ours = None  # a kind added after vLLM 0.32: the router has no use for it
            if ours is None:
                continue
            previous = translated[-1] if translated else None
            if isinstance(ours, BlocksRemoved) and isinstance(previous, BlocksRemoved):
                # vLLM reports evictions one block per event: one event per run of them keeps
                # the replica's bounded event log (deployments/routing/kv_log.py) from filling.
                translated[-1] = BlocksRemoved(
                    block_hashes=previous.block_hashes + ours.block_hashes
                )
            else:
                translated.append(ours)
        return translated

    def _stored(self, event: _VLLMBlockStored) -> BlocksStored | None:
        if not self._is_prefix_cache(event.medium, event.group_idx):
            return None
        copies = self._copies
        for theirs in event.block_hashes:  # cached whether or not ours can express them
            copies[theirs] = copies.get(theirs, 0) + 1
        while len(copies) > self._max_hashes:
            del copies[next(iter(copies))]
        num_blocks = len(event.block_hashes)
        bs = self._block_size
        keys = event.extra_keys if event.extra_keys is not None else [None] * num_blocks
        if (
            # Our hashes have no LoRA adapter in them, and the router does not route by one.
            event.lora_name is not None
            or event.lora_id is not None
            # Other sizes are partial-block entries of hybrid models; ours covers full blocks.
            or event.block_size != bs
            or len(event.token_ids) != num_blocks * bs
            or len(keys) != num_blocks
        ):
            self.untranslated_blocks += num_blocks
            return None
        parent: int | None = None
        salt: str | None = None
        if event.parent_block_hash is not None:
            parent = self._lookup(event.parent_block_hash)
            if parent is None:
                # Unknown parent: the subscriber joined late, an event was lost, or the map
                # forgot it. Without the parent's hash of ours, no block of the chain has one.
                self.untranslated_blocks += num_blocks
                return None
        # Only the cache salt can be translated (it salts our root, as vLLM's first block); other
        # extra keys (multimodal inputs, prompt embeddings) make blocks no token prefix the router
        # hashes can match, so the chain is cut at the first such block.
        num_usable = num_blocks
        for index, block_keys in enumerate(keys):
            if block_keys is None:
                continue
            if parent is None and index == 0 and _is_salt(block_keys):
                salt = block_keys[0]
                continue
            num_usable = index
            break
        self.untranslated_blocks += num_blocks - num_usable
        if num_usable == 0:
            return None
        hashes = chain_hashes(parent, event.token_ids[: num_usable * bs], bs, salt)
        for theirs, ours in zip(event.block_hashes, hashes, strict=False):
            self._remember(theirs, ours)
        return BlocksStored(block_hashes=tuple(hashes))

    def _removed(self, event: _VLLMBlockRemoved) -> BlocksRemoved | None:
        if not self._is_prefix_cache(event.medium, event.group_idx):
            return None
        gone = []  # blocks whose last copy this event removed
        for theirs in event.block_hashes:
            copies = self._copies.pop(theirs, 0)
            if copies > 1:
                self._copies[theirs] = copies - 1
            else:
                gone.append(theirs)
        # Translations are kept after removal: vLLM's hash is a function of the block's content,
        # so the pair stays true when the block is computed again.
        hashes = [self._ours[h] for h in gone if h in self._ours]
        self.untranslated_blocks += len(gone) - len(hashes)
        return BlocksRemoved(block_hashes=tuple(hashes)) if hashes else None

    @staticmethod
    def _is_prefix_cache(medium: str | None, group_idx: int | None) -> bool:
        # Group 0 is the only KV cache group of attention-only models. Hybrid models report
        # their groups' blocks under the same hashes, and a sliding-window group evicts blocks
        # the full-attention group still holds: only one group's view is consistent.
        return medium in (None, _PREFIX_CACHE_MEDIUM) and group_idx in (None, 0)

    def _lookup(self, theirs: int | bytes) -> int | None:
        ours = self._ours.get(theirs)
        if ours is not None:
            self._ours.move_to_end(theirs)
        return ours

    def _remember(self, theirs: int | bytes, ours: int) -> None:
        self._ours[theirs] = ours
        self._ours.move_to_end(theirs)
        if len(self._ours) > self._max_hashes:
            self._ours.popitem(last=False)


def _is_salt(block_keys: tuple[Any, ...]) -> bool:
    # vLLM publishes a first block's extra keys untagged, in the order LoRA name, multimodal
    # (identifier, offset) pairs, cache salt, prompt-embedding digests; with no LoRA (checked
    # before) a lone string is the salt.
    return len(block_keys) == 1 and isinstance(block_keys[0], str)


class KVEventBuffer:
    """A bounded FIFO of translated events from the subscriber thread to drain_kv_events().

    When nobody drains it, the oldest events go first (and are counted): the newest describe the
    cache as it is now.
    """

    def __init__(self, max_events: int) -> None:
        if max_events <= 0:
            raise ValueError(f"max_events must be positive, got {max_events}")
        self._max_events = max_events
        self._events: deque[KVCacheEvent] = deque(maxlen=max_events)
        self._lock = threading.Lock()
        self.dropped = 0

    def extend(self, events: Sequence[KVCacheEvent]) -> None:
        with self._lock:
            overflow = len(self._events) + len(events) - self._max_events
            self.dropped += max(overflow, 0)
            self._events.extend(events)

    def drain(self) -> list[KVCacheEvent]:
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events


class KVEventSubscriber:
    """A daemon thread that receives vLLM's event batches, translates them, and buffers them.

    A thread rather than a task on the replica's event loop: receiving, msgpack decoding and
    hashing then never delay a request, and a busy loop never delays the events.

    vLLM numbers its batches from 0. A batch lost on the way (the PUB socket drops for a slow
    subscriber, or it was published before our subscription took effect) shows up as a gap in
    the numbers when the next one arrives; the gap is then fetched from the publisher's replay
    socket, which keeps the last `buffer_steps` batches. What replay cannot supply is counted.
    """

    def __init__(
        self, endpoints: KVEventsEndpoints, translator: KVEventTranslator, buffer: KVEventBuffer
    ) -> None:
        import msgspec
        from vllm.distributed.kv_events import KVEventBatch

        self._endpoints = endpoints
        self.translator = translator
        self._buffer = buffer
        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self._next_seq = 0
        self.missed_batches = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vllm-kv-events", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop and join the thread (within one poll interval); blocking."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import zmq

        context = zmq.Context()
        subscriber = context.socket(zmq.SUB)
        subscriber.setsockopt(zmq.SUBSCRIBE, self._endpoints.topic.encode())
        subscriber.connect(self._endpoints.publish)
        try:
            while not self._stop.is_set():
                if subscriber.poll(_SUBSCRIBER_POLL_MS):
                    _, seq, payload = subscriber.recv_multipart()
                    self._receive(context, int.from_bytes(seq, "big"), payload)
        except Exception:
            logger.exception("KV event subscriber failed; routing continues without engine truth")
        finally:
            subscriber.close(linger=0)
            context.term()

    def _receive(self, context: zmq.Context[Any], seq: int, payload: bytes) -> None:
        if seq > self._next_seq:
            self._replay(context)
        if seq < self._next_seq:
            return  # replayed already
        self.missed_batches += seq - self._next_seq
        self._apply(seq, payload)

    def _replay(self, context: zmq.Context[Any]) -> None:
        import zmq

        # A fresh socket per replay: a reply that arrives after we gave up cannot be mistaken
        # for part of the next replay.
        replay = context.socket(zmq.DEALER)
        replay.connect(self._endpoints.replay)
        try:
            # The publisher's ROUTER expects [identity, empty, start seq]; DEALER adds no empty
            # frame itself, and unlike REQ it accepts the many replies.
            replay.send_multipart([b"", self._next_seq.to_bytes(8, "big")])
            while replay.poll(_REPLAY_TIMEOUT_MS):
                _, _, seq, payload = replay.recv_multipart()
                if seq == _REPLAY_END:
                    return
                seq_number = int.from_bytes(seq, "big")
                if seq_number >= self._next_seq:
                    self.missed_batches += seq_number - self._next_seq
                    self._apply(seq_number, payload)
            logger.warning("vLLM's KV event replay did not answer within %d ms", _REPLAY_TIMEOUT_MS)
        finally:
            replay.close(linger=0)

    def _apply(self, seq: int, payload: bytes) -> None:
        self._next_seq = seq + 1
        batch = self._decoder.decode(payload)
        self._buffer.extend(self.translator.translate(batch.events))
