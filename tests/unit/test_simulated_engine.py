"""The simulated engine: scheduling, prefix cache and timing invariants, and the async wrapper."""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Sequence

import pytest

from deployments.engines.base import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    Engine,
    EngineDeadError,
    EngineOutput,
    EngineRequest,
    KVCacheEvent,
    SamplingParams,
)
from deployments.engines.profiles import LLAMA_8B_H100, ZERO_LATENCY, PerformanceProfile
from deployments.engines.simulated import SimulatedEngine, SimulatedEngineCore, StepResult
from deployments.routing.hashing import block_hashes

BS = 4


def make_profile(**overrides: object) -> PerformanceProfile:
    fields: dict[str, object] = {
        "name": "unit",
        "block_size": BS,
        "num_kv_blocks": 64,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 64,
        "vocab_size": 1000,
        "decode_step_ms": ((1, 5.0), (8, 12.0)),
        "kv_read_ms_per_token": 0.01,
        "prefill_ms_per_token": 0.1,
        "cached_prefix_ms_per_token": 0.02,
    }
    fields.update(overrides)
    return PerformanceProfile.model_validate(fields)


def make_request(
    request_id: str,
    prompt: Sequence[int],
    *,
    cache_salt: str | None = None,
    **sampling: object,
) -> EngineRequest:
    sampling.setdefault("max_tokens", 4)
    return EngineRequest(
        request_id=request_id,
        prompt_token_ids=tuple(prompt),
        sampling=SamplingParams.model_validate(sampling),
        cache_salt=cache_salt,
    )


def prompt_of(length: int, start: int = 0) -> list[int]:
    return [(start + i) % 997 + 1 for i in range(length)]


def run_all(core: SimulatedEngineCore, max_steps: int = 100_000) -> list[StepResult]:
    steps = []
    while core.has_work():
        steps.append(core.step())
        assert len(steps) < max_steps, "the engine stopped making progress"
    return steps


def outputs_by_choice(steps: Sequence[StepResult]) -> dict[tuple[str, int], list[EngineOutput]]:
    by_choice: dict[tuple[str, int], list[EngineOutput]] = defaultdict(list)
    for step in steps:
        for out in step.outputs:
            by_choice[(out.request_id, out.index)].append(out)
    return by_choice


def tokens_of(outputs: Sequence[EngineOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def generate_all(core: SimulatedEngineCore, *requests: EngineRequest) -> dict[str, list[int]]:
    for request in requests:
        core.add_request(request)
    by_choice = outputs_by_choice(run_all(core))
    return {rid: tokens_of(outs) for (rid, index), outs in by_choice.items() if index == 0}


def assert_idle(core: SimulatedEngineCore) -> None:
    stats = core.stats()
    assert (stats.num_waiting, stats.num_running, stats.kv_cache_usage) == (0, 0, 0.0)
    assert not core.has_work()


def letters(ids: Sequence[int]) -> str:
    return "".join(chr(ord("a") + i) for i in ids)


# -- lengths and stopping ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "n"),
    [(1, 1, 1), (7, 5, 1), (40, 37, 1), (9, 6, 3), (100, 20, 2)],
)
def test_each_choice_gets_max_tokens_and_one_length_finish(
    prompt_len: int, max_tokens: int, n: int
) -> None:
    core = SimulatedEngineCore(make_profile())
    core.add_request(make_request("r", prompt_of(prompt_len), max_tokens=max_tokens, n=n))
    by_choice = outputs_by_choice(run_all(core))

    assert sorted(by_choice) == [("r", i) for i in range(n)]
    for outs in by_choice.values():
        assert len(tokens_of(outs)) == max_tokens
        assert [o.finish_reason for o in outs] == [None] * (max_tokens - 1) + ["length"]
        assert {o.num_prompt_tokens for o in outs} == {prompt_len}
        assert all(0 <= t < 1000 for t in tokens_of(outs))
    if n > 1:
        streams = {tuple(tokens_of(outs)) for outs in by_choice.values()}
        assert len(streams) == n, "choices must sample independent streams"
    assert_idle(core)


def test_stop_token_id_ends_the_choice_and_keeps_the_token() -> None:
    free_run = generate_all(
        SimulatedEngineCore(make_profile()), make_request("r", [1, 2, 3], max_tokens=30)
    )["r"]
    # The first token that does not occur earlier in the stream, so the expected cut is exact.
    cut = next(i for i in range(3, 30) if free_run[i] not in free_run[:i])

    core = SimulatedEngineCore(make_profile())
    core.add_request(make_request("r", [1, 2, 3], max_tokens=30, stop_token_ids=(free_run[cut],)))
    outs = outputs_by_choice(run_all(core))[("r", 0)]

    assert tokens_of(outs) == free_run[: cut + 1]
    assert outs[-1].finish_reason == "stop"
    assert_idle(core)


def test_stop_string_truncates_text_and_is_never_streamed() -> None:
    def new_core() -> SimulatedEngineCore:
        return SimulatedEngineCore(make_profile(), detokenize=letters, vocab_size=26)

    free_text = letters(generate_all(new_core(), make_request("r", [1], max_tokens=40))["r"])
    stop = free_text[10:13]
    first = free_text.find(stop)

    core = new_core()
    core.add_request(make_request("r", [1], max_tokens=40, stop=(stop, "not-a-letter-run")))
    outs = outputs_by_choice(run_all(core))[("r", 0)]

    text = "".join(o.text for o in outs)
    assert text == free_text[:first]
    assert outs[-1].finish_reason == "stop"
    # Generation stops at the token that completed the stop string.
    assert len(tokens_of(outs)) == first + len(stop)
    assert not any(stop in o.text for o in outs)
    assert_idle(core)


def test_incomplete_characters_are_held_back_until_complete() -> None:
    def pairs(ids: Sequence[int]) -> str:
        # Two tokens per character, like a multi-byte UTF-8 character split across tokens.
        text = "".join(
            chr(ord("A") + (a + b) % 26) for a, b in zip(ids[::2], ids[1::2], strict=False)
        )
        return text + ("\ufffd" if len(ids) % 2 else "")

    core = SimulatedEngineCore(make_profile(), detokenize=pairs, vocab_size=26)
    core.add_request(make_request("r", [1], max_tokens=9))
    outs = outputs_by_choice(run_all(core))[("r", 0)]

    assert all("\ufffd" not in o.text for o in outs[:-1])
    assert [len(o.text) for o in outs[:-1]] == [0, 1] * 4
    assert "".join(o.text for o in outs) == pairs(tokens_of(outs))  # ends with the lone token
    assert outs[-1].text == "\ufffd"


def test_logprobs_follow_the_uniform_model() -> None:
    core = SimulatedEngineCore(make_profile(), detokenize=letters, vocab_size=26)
    core.add_request(make_request("r", [1], max_tokens=3, logprobs=2))
    core.add_request(make_request("plain", [1], max_tokens=3))
    by_choice = outputs_by_choice(run_all(core))

    for out in by_choice[("r", 0)]:
        assert out.logprobs is not None
        (lp,) = out.logprobs
        assert lp.token_id == out.token_ids[0]
        assert lp.token == letters([lp.token_id])
        assert lp.logprob == pytest.approx(-math.log(26))
        assert len(lp.top) == 2
        assert lp.top[0][0] == lp.token_id
        assert {alt_lp for _, _, alt_lp in lp.top} == {lp.logprob}
    assert all(o.logprobs is None for o in by_choice[("plain", 0)])


# -- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed_a", "seed_b", "same"),
    [(0, 0, True), (7, 7, True), (0, 1, False), (3, 4, False)],
)
def test_tokens_are_deterministic_per_engine_seed(seed_a: int, seed_b: int, same: bool) -> None:
    request = make_request("r", prompt_of(20), max_tokens=16)
    a = generate_all(SimulatedEngineCore(make_profile(), seed=seed_a), request)["r"]
    b = generate_all(SimulatedEngineCore(make_profile(), seed=seed_b), request)["r"]
    assert (a == b) is same


def test_request_seed_makes_tokens_independent_of_request_id() -> None:
    core = SimulatedEngineCore(make_profile())
    out = generate_all(
        core,
        make_request("a", [1, 2], max_tokens=12, seed=42),
        make_request("b", [1, 2], max_tokens=12, seed=42),
        make_request("c", [1, 2], max_tokens=12),
        make_request("d", [1, 2], max_tokens=12),
    )
    assert out["a"] == out["b"]
    assert out["c"] != out["d"]


@pytest.mark.parametrize(
    ("vocab_size", "expected"),
    [
        (26, [2, 11, 13, 2, 20, 18, 15, 1, 12, 12, 2, 8]),
        (1000, [88, 378, 443, 76, 657, 598, 504, 45, 399, 397, 83, 278]),
        (
            128256,
            [11327, 48468, 56762, 9778, 84207, 76660, 64561, 5823, 51117, 50925, 10733, 35620],
        ),
    ],
)
def test_tokens_replay_earlier_runs(vocab_size: int, expected: list[int]) -> None:
    # Drawn by `random.Random.randrange(vocab_size)` before the engine inlined its algorithm:
    # the ids of a seed must not change, or recorded simulations stop replaying.
    core = SimulatedEngineCore(make_profile(vocab_size=vocab_size), seed=5)
    out = generate_all(core, make_request("r", [1, 2, 3], max_tokens=12, seed=42))
    assert out["r"] == expected


# -- prefix cache --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "cached"),
    [
        (prompt_of(42), [*prompt_of(40), 900, 901], 40),  # shared 10 full blocks
        (prompt_of(42), prompt_of(42), 40),  # the partial last block is never cached
        (prompt_of(40), prompt_of(40), 36),  # a full hit still recomputes the last block
        (prompt_of(41), prompt_of(40), 36),
        (prompt_of(42), prompt_of(42, start=500), 0),
        (prompt_of(3), prompt_of(3), 0),  # shorter than a block
    ],
)
def test_repeated_prefix_hits_the_cache(first: list[int], second: list[int], cached: int) -> None:
    core = SimulatedEngineCore(make_profile())
    core.add_request(make_request("a", first))
    run_all(core)
    before = core.stats()
    assert before.prefix_cache_queries == len(first)
    assert before.prefix_cache_hits == 0

    core.add_request(make_request("b", second))
    outs = outputs_by_choice(run_all(core))[("b", 0)]

    assert {o.num_cached_tokens for o in outs} == {cached}
    after = core.stats()
    assert after.prefix_cache_queries == len(first) + len(second)
    assert after.prefix_cache_hits == cached
    assert_idle(core)


def test_cache_salt_separates_tenants() -> None:
    core = SimulatedEngineCore(make_profile())
    generate_all(core, make_request("a", prompt_of(42), cache_salt="tenant-a"))
    generate_all(core, make_request("b", prompt_of(42), cache_salt="tenant-b"))
    generate_all(core, make_request("c", prompt_of(42)))
    assert core.stats().prefix_cache_hits == 0

    core.add_request(make_request("a2", prompt_of(42), cache_salt="tenant-a"))
    outs = outputs_by_choice(run_all(core))[("a2", 0)]
    assert outs[0].num_cached_tokens == 40


def test_cache_is_keyed_by_the_router_block_hashes() -> None:
    core = SimulatedEngineCore(make_profile())
    generate_all(core, make_request("a", prompt_of(42), cache_salt="t", max_tokens=1))
    stored = [
        h for e in core.drain_kv_events() if isinstance(e, BlocksStored) for h in e.block_hashes
    ]
    assert stored == block_hashes(prompt_of(42), BS, "t")


def test_generated_full_blocks_are_cached_over_prompt_and_output() -> None:
    core = SimulatedEngineCore(make_profile())
    prompt = prompt_of(10)
    # 10 prompt + 9 generated: the 9th token's KV is never computed, so 18 tokens = 4 blocks.
    output = generate_all(core, make_request("a", prompt, max_tokens=9))["a"]
    stored = [
        h for e in core.drain_kv_events() if isinstance(e, BlocksStored) for h in e.block_hashes
    ]
    assert stored == block_hashes(prompt + output[:-1], BS)

    # A follow-up turn that extends prompt + output (a chat) reuses the generated blocks.
    core.add_request(make_request("b", prompt + output + [5, 6, 7]))
    outs = outputs_by_choice(run_all(core))[("b", 0)]
    assert outs[0].num_cached_tokens == 16


def test_prompt_hashes_from_the_caller_key_the_cache() -> None:
    # The simulator's router passes the hashes it made for routing; the engine does not redo them.
    core = SimulatedEngineCore(make_profile())
    given = [11, 22]  # the 2 full blocks of a 10-token prompt
    core.add_request(make_request("a", prompt_of(10), max_tokens=1), prompt_hashes=given)
    run_all(core)
    stored = [
        h for e in core.drain_kv_events() if isinstance(e, BlocksStored) for h in e.block_hashes
    ]
    assert stored == given


def test_eviction_under_capacity_pressure() -> None:
    core = SimulatedEngineCore(make_profile(num_kv_blocks=8))
    old = prompt_of(12)
    generate_all(core, make_request("old", old, max_tokens=1))
    old_hashes = block_hashes(old, BS)
    core.drain_kv_events()

    # 29 prompt tokens take all 8 blocks: every cached block of `old` must go.
    generate_all(core, make_request("big", prompt_of(29, start=300), max_tokens=1))
    removed = [
        h for e in core.drain_kv_events() if isinstance(e, BlocksRemoved) for h in e.block_hashes
    ]
    assert sorted(removed) == sorted(old_hashes)

    core.add_request(make_request("old-again", old, max_tokens=1))
    outs = outputs_by_choice(run_all(core))[("old-again", 0)]
    assert outs[0].num_cached_tokens == 0
    assert_idle(core)


def test_eviction_is_least_recently_used() -> None:
    core = SimulatedEngineCore(make_profile(num_kv_blocks=12))
    # 13 tokens: 3 cacheable full blocks and a partial one each.
    a, b = prompt_of(13), prompt_of(13, start=200)
    generate_all(core, make_request("a", a, max_tokens=1))
    generate_all(core, make_request("b", b, max_tokens=1))
    generate_all(core, make_request("a-touch", a, max_tokens=1))  # a is now the most recent
    events_before = core.drain_kv_events()

    # 7 blocks: the 3 never used, the 2 partial (uncached) ones, then the 2 least recently used
    # cached blocks, b's last two (a sequence's tail is freed, hence evicted, first).
    generate_all(core, make_request("c", prompt_of(28, start=400), max_tokens=1))
    events_after = core.drain_kv_events()
    removed = [h for e in events_after if isinstance(e, BlocksRemoved) for h in e.block_hashes]
    b_hashes = block_hashes(b, BS)
    assert removed == b_hashes[:0:-1]
    cached = replay(events_before + events_after)
    assert set(block_hashes(a, BS)) <= cached
    assert b_hashes[0] in cached

    # What is left of b's chain is its first block.
    core.add_request(make_request("b2", b, max_tokens=1))
    assert outputs_by_choice(run_all(core))[("b2", 0)][0].num_cached_tokens == 4


def replay(events: Sequence[KVCacheEvent]) -> set[int]:
    """The cached hashes a router rebuilds from the events, checking that they pair up."""
    cached: set[int] = set()
    for event in events:
        if isinstance(event, BlocksStored):
            assert cached.isdisjoint(event.block_hashes), "stored twice"
            cached.update(event.block_hashes)
        elif isinstance(event, BlocksRemoved):
            assert set(event.block_hashes) <= cached, "removed but never stored"
            cached.difference_update(event.block_hashes)
    return cached


def test_kv_events_replay_to_a_consistent_cache() -> None:
    # The router rebuilds each replica's cache from these events: stored and removed must pair.
    core = SimulatedEngineCore(make_profile(num_kv_blocks=16, max_num_seqs=4))
    for i in range(30):
        core.add_request(
            make_request(f"r{i}", prompt_of(10 + 3 * (i % 7), start=50 * (i % 5)), max_tokens=6)
        )
    run_all(core)
    cached = replay(core.drain_kv_events())
    assert 0 < len(cached) <= 16
    assert core.kv_events_dropped == 0


def test_kv_event_buffer_is_bounded() -> None:
    core = SimulatedEngineCore(make_profile(), max_kv_events=3)
    for i in range(5):
        generate_all(core, make_request(f"r{i}", prompt_of(8, start=100 * i), max_tokens=1))
    events = core.drain_kv_events()
    assert len(events) == 3
    assert core.kv_events_dropped == 2
    assert events[-1] == BlocksStored(block_hashes=tuple(block_hashes(prompt_of(8, start=400), BS)))


# -- capacity, preemption and leaks --------------------------------------------------------------


def test_kv_usage_counts_blocks_held_by_requests() -> None:
    core = SimulatedEngineCore(make_profile())
    core.add_request(make_request("a", prompt_of(10), max_tokens=10))
    core.add_request(make_request("b", prompt_of(10), max_tokens=10))
    core.step()
    # a: 3 blocks; b arrives in the same step and shares a's 2 full blocks, plus 1 of its own.
    assert core.stats().kv_cache_usage == pytest.approx(4 / 64)
    assert core.stats().num_running == 2
    run_all(core)
    assert_idle(core)


def test_max_num_seqs_caps_the_batch() -> None:
    core = SimulatedEngineCore(make_profile(max_num_seqs=2))
    for i in range(5):
        core.add_request(make_request(f"r{i}", prompt_of(5, start=10 * i), max_tokens=3))
    while core.has_work():
        step = core.step()
        stats = core.stats()
        assert stats.num_running <= 2
        assert len(step.outputs) <= 2
        assert stats.num_running + stats.num_waiting <= 5
    assert_idle(core)


def test_admission_waits_for_blocks_and_preemption_recomputes() -> None:
    requests = [make_request(f"r{i}", prompt_of(8, start=100 * i), max_tokens=20) for i in range(6)]
    roomy = generate_all(SimulatedEngineCore(make_profile(num_kv_blocks=200)), *requests)

    # 7 blocks each at the end, 16 in all: they cannot all run together.
    tight = SimulatedEngineCore(make_profile(num_kv_blocks=16))
    for request in requests:
        tight.add_request(request)
    saw_waiting = False
    steps = []
    while tight.has_work():
        steps.append(tight.step())
        stats = tight.stats()
        saw_waiting |= stats.num_waiting > 0 and stats.num_running > 0
        assert stats.kv_cache_usage <= 1.0
    by_choice = outputs_by_choice(steps)

    assert saw_waiting
    assert tight.num_preemptions > 0
    # Preemption changes when tokens come, never which tokens.
    assert {rid: tokens_of(by_choice[(rid, 0)]) for rid in roomy} == roomy
    # A resumed sequence finds its own blocks again: that recompute is not a prompt cache hit.
    stats = tight.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (6 * 8, 0)
    assert {o.num_cached_tokens for outs in by_choice.values() for o in outs} == {0}
    assert_idle(tight)


@pytest.mark.parametrize("steps_before_abort", [0, 1, 2, 5])
def test_abort_releases_everything(steps_before_abort: int) -> None:
    # A 40-token prompt over a 16-token budget: prefill takes 3 steps, so the aborts land while
    # waiting, mid-prefill and mid-decode.
    core = SimulatedEngineCore(make_profile(max_num_batched_tokens=16, max_num_seqs=2))
    for i in range(3):
        core.add_request(make_request(f"r{i}", prompt_of(40, start=i), max_tokens=50, n=2))
    for _ in range(steps_before_abort):
        core.step()
    assert core.abort("r0")
    assert core.abort("r2")
    assert not core.abort("r0")
    assert not core.abort("unknown")
    by_choice = outputs_by_choice(run_all(core))

    assert {rid for rid, _ in by_choice} == {"r1"}
    assert all(len(tokens_of(outs)) == 50 for outs in by_choice.values())
    assert_idle(core)


def test_add_request_rejects_duplicates_and_requests_larger_than_the_cache() -> None:
    core = SimulatedEngineCore(make_profile(num_kv_blocks=8))
    core.add_request(make_request("a", [1, 2, 3]))
    with pytest.raises(ValueError, match="already"):
        core.add_request(make_request("a", [1, 2, 3]))
    with pytest.raises(ValueError, match="KV blocks"):
        core.add_request(make_request("huge", prompt_of(30), max_tokens=3))  # 9 blocks > 8


# -- timing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len", [1, 17, 64])
def test_prefill_only_step_costs_decode_plus_prefill(prompt_len: int) -> None:
    profile = make_profile()
    core = SimulatedEngineCore(profile)
    core.add_request(make_request("r", prompt_of(prompt_len), max_tokens=2))
    step = core.step()
    expected_ms = profile.decode_ms(1) + prompt_len * profile.prefill_ms_per_token
    assert step.duration_s == pytest.approx(expected_ms / 1000)
    assert [o.token_ids for o in step.outputs] == [(step.outputs[0].token_ids[0],)]


def test_chunked_prefill_splits_over_the_token_budget() -> None:
    profile = make_profile()  # budget 64
    core = SimulatedEngineCore(profile)
    core.add_request(make_request("r", prompt_of(150), max_tokens=1))
    steps = run_all(core)
    p, c = profile.prefill_ms_per_token, profile.cached_prefix_ms_per_token
    # Later chunks also attend over the earlier chunks' KV.
    expected_ms = [
        profile.decode_ms(1) + 64 * p,
        profile.decode_ms(1) + 64 * p + 64 * c,
        profile.decode_ms(1) + 22 * p + 128 * c,
    ]
    assert [s.duration_s for s in steps] == pytest.approx([ms / 1000 for ms in expected_ms])
    assert [len(s.outputs) for s in steps] == [0, 0, 1]


def test_cached_prefix_step_cost() -> None:
    profile = make_profile()
    core = SimulatedEngineCore(profile)
    generate_all(core, make_request("warm", prompt_of(42), max_tokens=1))
    core.add_request(make_request("r", prompt_of(42), max_tokens=1))
    step = core.step()
    expected_ms = (
        profile.decode_ms(1)
        + 2 * profile.prefill_ms_per_token
        + 40 * (profile.cached_prefix_ms_per_token)
    )
    assert step.duration_s == pytest.approx(expected_ms / 1000)


def test_decode_step_costs_batch_and_context() -> None:
    profile = make_profile()
    core = SimulatedEngineCore(profile)
    core.add_request(make_request("a", prompt_of(10), max_tokens=5))
    core.add_request(make_request("b", prompt_of(20, start=100), max_tokens=5))
    core.step()  # both prefills
    step = core.step()  # both decode: contexts of 11 and 21 tokens
    expected_ms = profile.decode_ms(2) + (11 + 21) * profile.kv_read_ms_per_token
    assert step.duration_s == pytest.approx(expected_ms / 1000)
    assert len(step.outputs) == 2


def test_idle_step_is_free() -> None:
    core = SimulatedEngineCore(make_profile())
    assert core.step() == StepResult(0.0, [])


# -- the async engine ----------------------------------------------------------------------------


class FakeClock:
    """Virtual time: sleeping advances it instantly."""

    def __init__(self) -> None:
        self.time = 0.0

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        # Let the tasks that are ready now (consumers of the last outputs) run before time moves.
        await asyncio.sleep(0)
        self.time += seconds


async def collect(engine: SimulatedEngine, request: EngineRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(request)]


@pytest.mark.asyncio
async def test_ttft_grows_with_uncached_prompt_length() -> None:
    p = LLAMA_8B_H100
    expected_ms = {
        16: p.decode_ms(1) + 16 * p.prefill_ms_per_token,
        2048: p.decode_ms(1) + 2048 * p.prefill_ms_per_token,
        # Two chunks under the 8192-token budget.
        12000: 2 * p.decode_ms(1)
        + 12000 * p.prefill_ms_per_token
        + 8192 * p.cached_prefix_ms_per_token,
    }
    ttft = {}
    for length in expected_ms:
        clock = FakeClock()
        engine = SimulatedEngine(p, clock=clock)
        async for out in engine.generate(make_request("r", prompt_of(length), max_tokens=3)):
            ttft.setdefault(length, clock.now())
            assert out.num_cached_tokens == 0
        await engine.shutdown()

    assert ttft == pytest.approx({k: v / 1000 for k, v in expected_ms.items()})
    assert ttft[16] < ttft[2048] < ttft[12000]


@pytest.mark.asyncio
async def test_steps_keep_the_profiles_schedule() -> None:
    """The time the loop itself takes between steps (here 1 ms to compute each, under a decode
    step's ~5 ms) is inside the steps' durations, not added to them."""
    clock = FakeClock()
    engine = SimulatedEngine(LLAMA_8B_H100, clock=clock)
    durations: list[float] = []
    step = engine.core.step

    def slow_step() -> StepResult:
        clock.time += 0.001
        result = step()
        durations.append(result.duration_s)
        return result

    engine.core.step = slow_step  # type: ignore[method-assign]
    for name in ("first", "after-idle"):
        durations.clear()
        start = clock.now()
        outputs = await collect(engine, make_request(name, prompt_of(512), max_tokens=64))
        assert sum(len(out.token_ids) for out in outputs) == 64 and len(durations) >= 64
        assert clock.now() - start == pytest.approx(sum(durations))
        clock.time += 1.0  # idle: the next request's steps owe nothing to this second
    await engine.shutdown()


@pytest.mark.asyncio
async def test_cached_prefix_cuts_ttft() -> None:
    clock = FakeClock()
    engine = SimulatedEngine(LLAMA_8B_H100, clock=clock)
    prompt = prompt_of(4096)
    ttft = []
    for rid in ("cold", "warm"):
        start = clock.now()
        outs = await collect(engine, make_request(rid, prompt, max_tokens=1))
        ttft.append(clock.now() - start)
        assert len(outs) == 1
    assert ttft[1] < ttft[0] / 3
    assert engine.stats().prefix_cache_hits == 4080
    await engine.shutdown()


@pytest.mark.asyncio
async def test_concurrent_generate_streams_complete() -> None:
    engine = SimulatedEngine(make_profile(), clock=FakeClock())
    assert isinstance(engine, Engine)
    results = await asyncio.gather(
        *(
            collect(engine, make_request(f"r{i}", prompt_of(9, start=i), max_tokens=7, n=2))
            for i in range(12)
        )
    )
    for outs in results:
        per_choice = defaultdict(list)
        for out in outs:
            per_choice[out.index].append(out)
        assert sorted(per_choice) == [0, 1]
        assert all(
            len(tokens_of(v)) == 7 and v[-1].finish_reason == "length" for v in per_choice.values()
        )
    assert_idle(engine.core)
    await engine.shutdown()


@pytest.mark.asyncio
async def test_closing_the_generator_early_aborts_the_request() -> None:
    engine = SimulatedEngine(make_profile(), clock=FakeClock())
    stream = engine.generate(make_request("r", prompt_of(10), max_tokens=50))
    first = await anext(stream)
    assert first.finish_reason is None
    assert engine.stats().num_running == 1
    await stream.aclose()  # what a client disconnect does to the handler's iteration

    assert_idle(engine.core)
    assert not engine.core.abort("r")  # already gone
    await engine.check_health()
    await engine.shutdown()


@pytest.mark.asyncio
async def test_cancelling_the_consumer_aborts_the_request() -> None:
    engine = SimulatedEngine(make_profile())  # real clock: the request runs for 50 steps
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(make_request("r", prompt_of(10), max_tokens=50)):
            got_one.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_idle(engine.core)
    await engine.shutdown()


@pytest.mark.asyncio
async def test_abort_finishes_every_open_choice() -> None:
    engine = SimulatedEngine(make_profile(), clock=FakeClock())
    stream = engine.generate(make_request("r", prompt_of(10), max_tokens=50, n=2))
    await anext(stream)
    await engine.abort("r")
    rest = [out async for out in stream]
    aborts = [out for out in rest if out.finish_reason == "abort"]
    assert sorted(out.index for out in aborts) == [0, 1]
    assert_idle(engine.core)
    await engine.abort("unknown")  # ignored
    await engine.shutdown()


@pytest.mark.asyncio
async def test_abort_during_a_step_is_the_streams_last_output() -> None:
    # The step loop sleeps for a step's duration with that step's outputs in hand; an abort
    # arriving meanwhile has already sent the final output, so they must never follow it.
    class AbortingClock(FakeClock):
        async def sleep(self, seconds: float) -> None:
            await super().sleep(seconds)
            await engine.abort("r")  # at the end of the sleep: the consumer has not run since

    engine = SimulatedEngine(make_profile(), clock=AbortingClock())
    outputs = await collect(engine, make_request("r", prompt_of(10), max_tokens=50))
    assert [(out.token_ids, out.finish_reason) for out in outputs] == [((), "abort")]
    assert_idle(engine.core)
    await engine.shutdown()


@pytest.mark.asyncio
async def test_shutdown_ends_open_streams_with_abort() -> None:
    engine = SimulatedEngine(make_profile(), clock=FakeClock())
    stream = engine.generate(make_request("r", prompt_of(10), max_tokens=50))
    await anext(stream)
    await engine.shutdown()
    rest = [out async for out in stream]
    assert rest[-1].finish_reason == "abort"
    assert_idle(engine.core)
    with pytest.raises(EngineDeadError):
        await engine.check_health()
    with pytest.raises(EngineDeadError):
        await anext(engine.generate(make_request("late", [1])))


@pytest.mark.asyncio
async def test_a_dead_step_loop_fails_health_and_streams() -> None:
    engine = SimulatedEngine(make_profile(), clock=FakeClock())
    await engine.start()
    await engine.check_health()

    def broken_step() -> StepResult:
        raise RuntimeError("simulated GPU fault")

    engine.core.step = broken_step  # type: ignore[method-assign]
    with pytest.raises(EngineDeadError, match="GPU fault"):
        await collect(engine, make_request("r", [1, 2, 3]))
    with pytest.raises(EngineDeadError, match="GPU fault"):
        await engine.check_health()
    await engine.shutdown()


@pytest.mark.asyncio
async def test_step_loop_sleeps_while_idle() -> None:
    engine = SimulatedEngine(ZERO_LATENCY)
    core = engine.core
    real_step, real_has_work = core.step, core.has_work
    calls = {"step": 0, "has_work": 0}

    def counting_step() -> StepResult:
        calls["step"] += 1
        return real_step()

    def counting_has_work() -> bool:
        calls["has_work"] += 1
        return real_has_work()

    core.step = counting_step  # type: ignore[method-assign]
    core.has_work = counting_has_work  # type: ignore[method-assign]
    outs = await collect(engine, make_request("r", [1, 2, 3], max_tokens=5))
    assert len(outs) == 5
    assert calls["step"] == 5  # one prefill step (with the first token) and four decode steps
    await asyncio.sleep(0)  # the loop sees there is no work left
    # Parked on the wake-up event, not polling on a timer (a 0.1 s poll passed a timed check).
    wakeup = engine._wakeup  # type: ignore[attr-defined]
    assert not wakeup.is_set() and wakeup._waiters, "the idle loop must wait for work, not poll"
    await engine.shutdown()


@pytest.mark.asyncio
async def test_duplicate_request_id_is_refused() -> None:
    engine = SimulatedEngine(make_profile(), clock=FakeClock())
    stream = engine.generate(make_request("r", [1, 2], max_tokens=20))
    await anext(stream)
    with pytest.raises(ValueError, match="already"):
        await anext(engine.generate(make_request("r", [1, 2])))
    await stream.aclose()
    assert_idle(engine.core)
    await engine.shutdown()


def test_reset_prefix_cache_forgets_every_block_and_says_so() -> None:
    core = SimulatedEngineCore(make_profile())
    prompt = prompt_of(4 * BS)
    generate_all(core, make_request("a", prompt))
    core.drain_kv_events()
    # Like vLLM's, refused while a request holds blocks: nothing changes.
    core.add_request(make_request("busy", prompt_of(BS, start=500), max_tokens=4))
    core.step()
    core.drain_kv_events()
    assert not core.reset_prefix_cache()
    assert core.drain_kv_events() == []
    run_all(core)
    core.drain_kv_events()
    # A request still waiting holds no block: it does not stop the reset.
    core.add_request(make_request("b", prompt))
    assert core.reset_prefix_cache()
    assert core.drain_kv_events() == [AllBlocksCleared()]
    first = outputs_by_choice(run_all(core))[("b", 0)][0]
    assert first.num_cached_tokens == 0
