"""Performance profiles of the simulated engine: what one vLLM replica costs per step.

A step of vLLM's continuous batching runs every running sequence's next token plus chunks of
prefill. Its cost here is additive (weights and KV reads, then prefill compute):

    step_ms = decode_step_ms(sequences in the step)           # weight read, interpolated
            + kv_read_ms_per_token   * context tokens of the decoding sequences
            + prefill_ms_per_token   * new (uncached) prompt tokens in the step
            + cached_prefix_ms_per_token * cached prompt tokens under the prefilled chunks

Every number a profile uses has its source written beside it.
"""

from __future__ import annotations

from bisect import bisect_left

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, field_validator


class PerformanceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Profile id.")
    description: str = Field("", description="What hardware and model this stands for.")
    block_size: PositiveInt = Field(16, description="Tokens per KV block.")
    num_kv_blocks: PositiveInt = Field(description="KV cache capacity of one replica, in blocks.")
    max_num_seqs: PositiveInt = Field(256, description="Sequences batched per step at most.")
    max_num_batched_tokens: PositiveInt = Field(
        8192, description="Tokens (decode + prefill chunks) per step at most."
    )
    vocab_size: PositiveInt = Field(
        32000, description="Token ids drawn from [0, vocab_size) when no tokenizer is given."
    )
    decode_step_ms: tuple[tuple[PositiveInt, NonNegativeFloat], ...] = Field(
        description="(batch size, ms) points of one decode step, linearly interpolated."
    )
    kv_read_ms_per_token: NonNegativeFloat = Field(
        description="Extra ms per decode step per token of context being attended."
    )
    prefill_ms_per_token: NonNegativeFloat = Field(description="ms per uncached prompt token.")
    cached_prefix_ms_per_token: NonNegativeFloat = Field(
        description="ms per cached prompt token under a prefilled chunk (attention over it)."
    )

    @field_validator("decode_step_ms")
    @classmethod
    def _sorted_points(cls, points: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
        if not points:
            raise ValueError("needs at least one (batch, ms) point")
        batches = [b for b, _ in points]
        if batches != sorted(set(batches)):
            raise ValueError("batch sizes must be strictly increasing")
        return points

    def decode_ms(self, batch: int) -> float:
        """Interpolated decode-step time; flat outside the measured range."""
        if batch <= 0:
            return 0.0
        batches = [b for b, _ in self.decode_step_ms]
        i = bisect_left(batches, batch)
        if i == 0:
            return self.decode_step_ms[0][1]
        if i == len(batches):
            return self.decode_step_ms[-1][1]
        (b0, t0), (b1, t1) = self.decode_step_ms[i - 1], self.decode_step_ms[i]
        return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)


LLAMA_8B_H100 = PerformanceProfile(
    name="llama-8b-h100",
    description="Llama-3.1-8B, bf16, one H100 80GB, vLLM v1 with CUDA graphs.",
    block_size=16,  # vLLM's GPU default block size.
    # KV capacity: 80 GB x gpu_memory_utilization 0.9 = 72 GB, minus 15.0 GB of weights and ~3 GB
    # of activations/CUDA graphs = ~54 GB; at 128 KiB per token (32 layers x 8 KV heads x 128 dim
    # x 2 (K,V) x 2 bytes) that is ~442k tokens = ~27.6k blocks of 16.
    num_kv_blocks=27_000,
    max_num_seqs=256,  # vLLM's default max_num_seqs for the OpenAI server.
    max_num_batched_tokens=8192,  # vLLM v1's default chunked-prefill token budget on an H100.
    vocab_size=128_256,  # Llama 3 tokenizer.
    # Measured on an H100 (DESIGN.md "Reference numbers"): CUDA-graph replay of the 8B GEMMs,
    # copy bandwidth 3.02 TB/s: 5.33 ms at batch 1, 5.26 at 8, 5.51 at 64, 6.01 at 128, 7.14 at 256.
    decode_step_ms=((1, 5.33), (8, 5.26), (64, 5.51), (128, 6.01), (256, 7.14)),
    # 128 KiB of KV per context token read at 3.02 TB/s = 4.34e-5 ms (DESIGN.md); check: batch
    # 64 at 2048 context = 5.51 + 5.69 = 11.2 ms vs the 11.4 ms DESIGN.md gives.
    kv_read_ms_per_token=131072 / 3.02e12 * 1e3,
    # Prefill is compute-bound: an 8B-shaped Llama prefilled ~34k tokens/s on an H200 past the
    # eager launch floor (DESIGN.md: 2048 -> 60.0 ms, 4096 -> 121.7 ms); H100 and H200 share the
    # same tensor-core peak (989 TFLOP/s), so 1/34k s per token.
    prefill_ms_per_token=1000 / 34_000,
    # A suffix over a cached prefix (DESIGN.md, H200): 2048 cached + 128 new = 23.2 ms and
    # 2048 + 512 = 24.1 ms vs 16.7 / 18.3 ms without the prefix: ~(23.2-16.7)/2048 to
    # (24.1-18.3)/2048, i.e. 0.0028-0.0032 ms per cached token; 8192 + 128 gives 0.0014. 0.002.
    cached_prefix_ms_per_token=0.002,
)

ZERO_LATENCY = PerformanceProfile(
    name="zero-latency",
    description="Every step is free: measures the serving path's own overhead.",
    block_size=16,
    num_kv_blocks=1_000_000,
    max_num_seqs=1024,
    max_num_batched_tokens=1_000_000,
    decode_step_ms=((1, 0.0),),
    kv_read_ms_per_token=0.0,
    prefill_ms_per_token=0.0,
    cached_prefix_ms_per_token=0.0,
)

BUILTIN_PROFILES: dict[str, PerformanceProfile] = {p.name: p for p in (LLAMA_8B_H100, ZERO_LATENCY)}
