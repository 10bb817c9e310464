"""VLLMEngine on vLLM CPU with the embedded tiny Llama, without Ray.

One engine serves the whole module: starting it takes 25-70 s here (the first start also compiles
the model; vLLM caches that in ~/.cache/vllm). EngineCore is spawned, which needs the entry module
to be import-safe: pytest's is (`python -m pytest` and the `pytest` script both guard __main__).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from cluster.embedded_model import ensure_embedded_model
from deployments.config import ModelConfig
from deployments.engines.base import (
    AllBlocksCleared,
    BlocksStored,
    Engine,
    EngineOutput,
    EngineRequest,
    KVCacheEvent,
    SamplingParams,
)
from deployments.engines.vllm import (
    KVEventBuffer,
    KVEventsEndpoints,
    KVEventSubscriber,
    KVEventTranslator,
    VLLMEngine,
    validate_engine_options,
)
from deployments.routing.hashing import block_hashes

pytestmark = pytest.mark.e2e
# The async tests share the module-scoped engine, so they must share its event loop too.
in_engine_loop = pytest.mark.asyncio(loop_scope="module")

NUM_BLOCKS = 64
START_TIMEOUT_S = 300.0
_request_ids = iter(range(1_000_000))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[VLLMEngine]:
    model = ModelConfig(
        name="embedded",
        engine="vllm",
        source=str(ensure_embedded_model()),
        device="cpu",
        max_model_len=2048,
        engine_options={"num_gpu_blocks_override": NUM_BLOCKS, "max_num_seqs": 8},
        engine_env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    vllm_engine = VLLMEngine(model)
    await asyncio.wait_for(vllm_engine.start(), START_TIMEOUT_S)
    try:
        yield vllm_engine
        # No test may leave a request behind in the engine.
        await _wait_until(lambda: vllm_engine.stats().num_running == 0)
        assert vllm_engine.stats().num_waiting == 0
    finally:
        await vllm_engine.shutdown()


def _request(prompt: list[int] | tuple[int, ...], **sampling: object) -> EngineRequest:
    return EngineRequest(
        request_id=f"test-{next(_request_ids)}",
        prompt_token_ids=tuple(prompt),
        sampling=SamplingParams(**sampling),
    )


def _random_prompt(length: int, seed: int) -> list[int]:
    # Ids past the special tokens (0-2); a fresh seed gives a prefix no earlier test cached.
    rng = random.Random(seed)
    return [rng.randrange(3, 2900) for _ in range(length)]


async def _collect(engine: VLLMEngine, request: EngineRequest) -> list[EngineOutput]:
    return [output async for output in engine.generate(request)]


def _tokens(outputs: list[EngineOutput], index: int = 0) -> list[int]:
    return [token for output in outputs if output.index == index for token in output.token_ids]


async def _wait_until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    # Scheduler stats reach the engine asynchronously, one engine step after the fact.
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)


@in_engine_loop
async def test_implements_the_engine_protocol_and_reports_cpu_cache_shape(
    engine: VLLMEngine,
) -> None:
    assert isinstance(engine, Engine)
    stats = engine.stats()
    assert stats.block_size == 128  # vLLM CPU's default, never the GPU's 16
    assert stats.num_total_blocks == NUM_BLOCKS
    await engine.check_health()


@in_engine_loop
async def test_ignore_eos_generates_exactly_max_tokens(engine: VLLMEngine) -> None:
    prompt = _random_prompt(40, seed=1)
    outputs = await _collect(
        engine, _request(prompt, max_tokens=37, temperature=0.0, ignore_eos=True)
    )

    assert len(_tokens(outputs)) == 37
    assert [output.finish_reason for output in outputs[:-1]] == [None] * (len(outputs) - 1)
    assert outputs[-1].finish_reason == "length"
    assert {output.num_prompt_tokens for output in outputs} == {40}
    assert all(output.logprobs is None for output in outputs)


@in_engine_loop
async def test_stop_token_id_ends_the_choice_at_its_first_occurrence(engine: VLLMEngine) -> None:
    prompt = _random_prompt(30, seed=2)
    greedy = _tokens(
        await _collect(engine, _request(prompt, max_tokens=12, temperature=0.0, ignore_eos=True))
    )
    stop_id = greedy[5]
    first = greedy.index(stop_id)

    outputs = await _collect(
        engine, _request(prompt, max_tokens=12, temperature=0.0, stop_token_ids=(stop_id,))
    )

    # vLLM keeps the stop token in the ids (the router decides what to show) and stops there.
    assert _tokens(outputs) == greedy[: first + 1]
    assert outputs[-1].finish_reason == "stop"


@in_engine_loop
async def test_n_choices_each_stream_their_own_tokens(engine: VLLMEngine) -> None:
    outputs = await _collect(
        engine,
        _request(_random_prompt(20, seed=3), max_tokens=9, n=2, seed=7, ignore_eos=True),
    )

    assert {output.index for output in outputs} == {0, 1}
    for index in (0, 1):
        assert len(_tokens(outputs, index)) == 9
        finishes = [o.finish_reason for o in outputs if o.index == index and o.finish_reason]
        assert finishes == ["length"]


@in_engine_loop
async def test_logprobs_cover_every_token_with_the_requested_alternatives(
    engine: VLLMEngine,
) -> None:
    outputs = await _collect(
        engine,
        _request(_random_prompt(20, seed=4), max_tokens=6, logprobs=3, ignore_eos=True),
    )

    for output in outputs:
        assert output.logprobs is not None
        assert [entry.token_id for entry in output.logprobs] == list(output.token_ids)
        for entry in output.logprobs:
            assert entry.logprob <= 0.0
            assert len(entry.top) == 3
            top_logprobs = [logprob for _, _, logprob in entry.top]
            assert top_logprobs == sorted(top_logprobs, reverse=True)
            assert entry.logprob <= top_logprobs[0]
            # A lone byte of a multi-byte character decodes to "": only the type is certain.
            assert all(isinstance(token, str) for _, token, _ in entry.top)


@in_engine_loop
async def test_repeated_prompt_is_served_from_the_prefix_cache(engine: VLLMEngine) -> None:
    prompt = _random_prompt(600, seed=5)  # 4 full blocks of 128 tokens
    hits_before = engine.stats().prefix_cache_hits

    first = await _collect(engine, _request(prompt, max_tokens=2, ignore_eos=True))
    second = await _collect(engine, _request(prompt, max_tokens=2, ignore_eos=True))

    assert first[-1].num_cached_tokens == 0
    assert second[-1].num_cached_tokens == 512
    await _wait_until(lambda: engine.stats().prefix_cache_hits >= hits_before + 512)
    stats = engine.stats()
    assert stats.prefix_cache_queries >= stats.prefix_cache_hits


@in_engine_loop
async def test_engine_caches_exactly_the_prompt_tokens_it_was_given(engine: VLLMEngine) -> None:
    # Two full blocks. vLLM recomputes at least the last prompt token, so only the first block can
    # hit, unless something (a BOS) were prepended: then both would. The router hashes the very
    # token ids it sends, so the engine must not add any.
    prompt = _random_prompt(256, seed=10)
    await _collect(engine, _request(prompt, max_tokens=1))

    again = await _collect(engine, _request(prompt, max_tokens=1))

    assert again[-1].num_cached_tokens == 128


@in_engine_loop
async def test_prompt_longer_than_max_model_len_is_a_value_error(engine: VLLMEngine) -> None:
    with pytest.raises(ValueError, match="2049"):
        await _collect(engine, _request(_random_prompt(2049, seed=11), max_tokens=1))


@in_engine_loop
async def test_cache_salt_isolates_prefixes(engine: VLLMEngine) -> None:
    prompt = _random_prompt(300, seed=6)
    salted = EngineRequest(
        request_id="salted-a",
        prompt_token_ids=tuple(prompt),
        sampling=SamplingParams(max_tokens=1),
        cache_salt="tenant-a",
    )
    await _collect(engine, salted)

    same_tenant = await _collect(engine, salted.model_copy(update={"request_id": "salted-a2"}))
    other_tenant = await _collect(
        engine, salted.model_copy(update={"request_id": "salted-b", "cache_salt": "tenant-b"})
    )

    assert same_tenant[-1].num_cached_tokens == 256
    assert other_tenant[-1].num_cached_tokens == 0


@in_engine_loop
async def test_closing_the_stream_early_aborts_the_request(engine: VLLMEngine) -> None:
    stream = engine.generate(_request(_random_prompt(20, seed=8), max_tokens=1500, ignore_eos=True))
    received = [await anext(stream), await anext(stream)]
    assert all(output.finish_reason is None for output in received)
    await _wait_until(lambda: engine.stats().num_running == 1)

    await stream.aclose()

    await _wait_until(lambda: engine.stats().num_running == 0)


@in_engine_loop
async def test_abort_by_id_finishes_the_stream_with_abort(engine: VLLMEngine) -> None:
    request = _request(_random_prompt(20, seed=9), max_tokens=1500, ignore_eos=True)
    stream = engine.generate(request)
    await anext(stream)

    await engine.abort(request.request_id)
    rest = [output async for output in stream]

    assert rest[-1].finish_reason == "abort"
    assert len(_tokens(rest)) < 1500
    await _wait_until(lambda: engine.stats().num_running == 0)
    await engine.abort("no-such-request")  # unknown ids are ignored


def _stored(events: list[KVCacheEvent]) -> set[int]:
    return {h for event in events if isinstance(event, BlocksStored) for h in event.block_hashes}


@in_engine_loop
@pytest.mark.parametrize("cache_salt", [None, "tenant-kv"])
async def test_kv_events_report_the_prompts_blocks_by_the_routers_hashes(
    engine: VLLMEngine, cache_salt: str | None
) -> None:
    block_size = engine.stats().block_size
    prompt = _random_prompt(3 * block_size + 20, seed=12 if cache_salt is None else 13)
    expected = set(block_hashes(prompt, block_size, cache_salt))
    assert len(expected) == 3
    request = _request(prompt, max_tokens=2).model_copy(update={"cache_salt": cache_salt})

    await _collect(engine, request)

    # vLLM publishes a step's events after the step; they reach the buffer through a thread.
    stored: set[int] = set()

    def reported() -> bool:
        stored.update(_stored(engine.drain_kv_events()))
        return expected <= stored

    await _wait_until(reported, timeout_s=5.0)
    # Everything the engine published in this module so far was translatable, and none was lost.
    losses = engine.kv_event_losses()
    assert (losses.untranslated_blocks, losses.missed_batches, losses.dropped_events) == (0, 0, 0)


@in_engine_loop
async def test_reset_prefix_cache_forgets_the_prompt_and_tells_the_routers(
    engine: VLLMEngine,
) -> None:
    prompt = _random_prompt(600, seed=14)
    await _collect(engine, _request(prompt, max_tokens=2, ignore_eos=True))

    # vLLM refuses while any request still holds blocks; the finished one frees them at once.
    assert await engine.reset_prefix_cache()
    again = await _collect(engine, _request(prompt, max_tokens=2, ignore_eos=True))
    assert again[-1].num_cached_tokens == 0

    # vLLM publishes the event with its next engine step (here: the request above).
    cleared: list[KVCacheEvent] = []

    def reported() -> bool:
        cleared.extend(e for e in engine.drain_kv_events() if isinstance(e, AllBlocksCleared))
        return bool(cleared)

    await _wait_until(reported, timeout_s=5.0)


async def test_kv_event_subscriber_replays_batches_it_missed() -> None:
    # vLLM's real publisher and event classes: a batch published before the subscriber connected
    # is fetched from the replay socket once the next batch reveals the gap.
    from vllm.distributed.kv_events import BlockStored, KVEventBatch, ZmqEventPublisher

    block_size = 16
    prompt = _random_prompt(2 * block_size, seed=14)

    def stored(vllm_hash: int, parent: int | None, block: int) -> KVEventBatch:
        tokens = prompt[block * block_size : (block + 1) * block_size]
        event = BlockStored(
            block_hashes=[vllm_hash],
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=block_size,
            lora_id=None,
            medium="GPU",
            lora_name=None,
            group_idx=0,
        )
        return KVEventBatch(ts=time.time(), events=[event])

    with tempfile.TemporaryDirectory() as directory:
        endpoints = KVEventsEndpoints.in_directory(directory)
        publisher = ZmqEventPublisher(
            0, endpoint=endpoints.publish, replay_endpoint=endpoints.replay, topic=endpoints.topic
        )
        buffer = KVEventBuffer(max_events=10)
        subscriber: KVEventSubscriber | None = None
        try:
            publisher.publish(stored(111, None, 0))  # nobody is subscribed yet: lost
            subscriber = KVEventSubscriber(
                endpoints, KVEventTranslator(block_size=block_size, max_hashes=10), buffer
            )
            await asyncio.sleep(0.5)  # let the subscription reach the publisher
            publisher.publish(stored(222, 111, 1))

            events: list[KVCacheEvent] = []

            def received_both() -> bool:
                events.extend(buffer.drain())
                return len(events) >= 2

            await _wait_until(received_both, timeout_s=5.0)
        finally:
            if subscriber is not None:
                await asyncio.to_thread(subscriber.close)
            publisher.shutdown()

    assert events == [
        BlocksStored(block_hashes=(ours,)) for ours in block_hashes(prompt, block_size)
    ]
    assert subscriber.missed_batches == 0
    assert subscriber.translator.untranslated_blocks == 0


def test_validate_engine_options_names_the_close_match_of_a_typo() -> None:
    with pytest.raises(ValueError, match=r"'max_num_seq'.*did you mean 'max_num_seqs'"):
        validate_engine_options({"max_num_seq": 4})


def test_validate_engine_options_checks_value_types() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        validate_engine_options({"max_num_seqs": "many"})
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        validate_engine_options({"kv_cache_dtype": "int3"})
    with pytest.raises(ValueError, match=r"compilation_config\.modee"):
        validate_engine_options({"compilation_config": {"modee": 3}})


def test_validate_engine_options_accepts_real_options() -> None:
    validate_engine_options(
        {
            "max_num_seqs": 4,
            "block_size": 64,
            "num_gpu_blocks_override": 32,
            "enforce_eager": True,
            "kv_cache_dtype": "auto",
            "compilation_config": {"mode": 0},
            "kv_events_config": {"enable_kv_cache_events": True, "publisher": "zmq"},
        }
    )
