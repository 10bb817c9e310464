"""The engine contract: what an LLMServer replica needs from an inference engine.

Replicas are token-in, token-out: the router tokenizes, the engine generates. Every type here
crosses Ray (router -> replica -> router), so they are small frozen pydantic models with no
engine-specific objects inside.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

FinishReason = Literal["stop", "length", "abort"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SamplingParams(_Frozen):
    """The sampling knobs of the OpenAI API, already validated by the router."""

    max_tokens: PositiveInt = Field(description="Tokens to generate per choice at most.")
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1 disables top-k.")
    seed: int | None = Field(None, description="Per-request seed for reproducible sampling.")
    stop: tuple[str, ...] = Field((), description="Stop strings (see include_stop_str_in_output).")
    stop_token_ids: tuple[int, ...] = Field((), description="Token ids that end a choice.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, description="Drop tokens below min_p times the top probability."
    )
    repetition_penalty: float = Field(
        1.0, gt=0.0, description="Above 1 discourages tokens already in prompt or output."
    )
    min_tokens: NonNegativeInt = Field(
        0, description="Tokens to generate before a stop token or stop string may end a choice."
    )
    include_stop_str_in_output: bool = Field(
        False, description="Keep the stop string (or stop token's text) that ended a choice."
    )
    allowed_token_ids: tuple[int, ...] | None = Field(
        None, description="The only tokens that may be sampled; None: any."
    )
    logprobs: NonNegativeInt | None = Field(
        None, description="Alternatives per token to return log-probabilities for; None: none."
    )
    n: PositiveInt = Field(1, description="Independent choices for the same prompt.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence.")


class EngineRequest(_Frozen):
    request_id: str
    prompt_token_ids: tuple[int, ...] = Field(min_length=1)
    sampling: SamplingParams
    cache_salt: str | None = Field(
        None, description="Salts the prefix-cache block hashes (tenant isolation)."
    )
    trace_context: dict[str, str] | None = Field(
        None, description="W3C trace context (traceparent) of the router's span, for the replica."
    )


class TokenLogprob(_Frozen):
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = Field(
        (), description="(token_id, token, logprob) of the most likely alternatives."
    )


class EngineOutput(_Frozen):
    """One step's new tokens for one choice of a request."""

    request_id: str
    index: NonNegativeInt = Field(0, description="Choice index when n > 1.")
    token_ids: tuple[int, ...] = ()
    text: str = Field("", description="Detokenized text of token_ids (stop strings removed).")
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: NonNegativeInt = 0
    num_cached_tokens: NonNegativeInt = Field(
        0, description="Prompt tokens served from the prefix cache."
    )
    replica: str | None = Field(
        None, description="The replica that produced it (set on a request's first output)."
    )


class EngineStats(_Frozen):
    """A snapshot of one engine, as routers and the autoscaler consume it."""

    num_waiting: NonNegativeInt
    num_running: NonNegativeInt
    kv_cache_usage: float = Field(ge=0.0, le=1.0, description="Share of KV blocks in use.")
    block_size: PositiveInt = Field(description="Tokens per KV block (the router hashes by it).")
    num_total_blocks: NonNegativeInt
    prefix_cache_queries: NonNegativeInt = Field(0, description="Prompt tokens looked up, total.")
    prefix_cache_hits: NonNegativeInt = Field(0, description="Prompt tokens found, total.")


class BlocksStored(_Frozen):
    """Full blocks that entered the prefix cache, in chain order (vLLM's BlockStored)."""

    kind: Literal["stored"] = "stored"
    block_hashes: tuple[int, ...]


class BlocksRemoved(_Frozen):
    """Blocks evicted from the prefix cache (vLLM's BlockRemoved)."""

    kind: Literal["removed"] = "removed"
    block_hashes: tuple[int, ...]


class AllBlocksCleared(_Frozen):
    """The whole prefix cache was reset (vLLM's AllBlocksCleared)."""

    kind: Literal["cleared"] = "cleared"


KVCacheEvent = BlocksStored | BlocksRemoved | AllBlocksCleared


class EngineDeadError(RuntimeError):
    """The engine can no longer serve; the replica must be replaced."""


@runtime_checkable
class Engine(Protocol):
    """What LLMServer drives. Implementations: vllm.VLLMEngine, simulated.SimulatedEngine."""

    async def start(self) -> None:
        """Load the model; returns when the engine can serve."""

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream outputs until every choice has a finish_reason."""

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; unknown ids are ignored."""

    async def check_health(self) -> None:
        """Raise EngineDeadError unless the engine can still serve."""

    def stats(self) -> EngineStats: ...

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (vLLM's reset_prefix_cache, e.g. after new weights);
        False, changing nothing, while requests hold blocks."""

    def drain_kv_events(self) -> list[KVCacheEvent]:
        """Prefix-cache events since the last drain, oldest first, keyed by the router's block
        hashes (deployments/routing/hashing.py). Cheap and non-blocking: it only takes a buffer."""

    async def shutdown(self) -> None: ...
