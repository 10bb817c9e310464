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
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deployments.config import ModelConfig
from deployments.engines.base import (
    EngineDeadError,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    SamplingParams,
    TokenLogprob,
)

if TYPE_CHECKING:
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


class VLLMEngine:
    """One vLLM AsyncLLM (its EngineCore and workers run in processes it spawns)."""

    def __init__(self, model: ModelConfig) -> None:
        if model.engine != "vllm":
            raise ValueError(f"model {model.name!r} has engine {model.engine!r}, not vllm")
        self._model = model
        self._llm: AsyncLLM | None = None
        self._scheduler = _SchedulerSnapshot()

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if self._llm is not None:
            return
        # The EngineCore and its workers are spawned from this process and read their settings
        # (VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND, ...) from its environment.
        os.environ.update(self._model.engine_env)
        args = AsyncEngineArgs(**engine_kwargs(self._model))
        # Building the engine blocks for the whole model load (25-60 s on CPU here); a thread
        # keeps the event loop (and the replica's health and metrics calls) responsive.
        self._llm = await asyncio.to_thread(
            AsyncLLM.from_engine_args,
            args,
            stat_loggers=[_stat_logger_factory(self._scheduler)],
        )

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

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            # Joins the EngineCore and worker processes: blocking, so off the event loop.
            await asyncio.to_thread(llm.shutdown)

    def _require_llm(self) -> AsyncLLM:
        if self._llm is None:
            raise RuntimeError("VLLMEngine.start() has not completed")
        return self._llm


def engine_kwargs(model: ModelConfig) -> dict[str, Any]:
    """The AsyncEngineArgs of a model: its first-class fields plus its engine_options."""
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
