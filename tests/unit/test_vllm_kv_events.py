"""vLLM's KV cache events re-keyed to the router's block hashes, without starting vLLM.

The events are stand-ins with the names and fields of vllm.distributed.kv_events' classes
(importing those pulls in torch: seconds per test run); tests/e2e/test_vllm_engine.py feeds the
real classes, over vLLM's real publisher.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from deployments.config import ModelConfig
from deployments.engines.base import AllBlocksCleared as OurAllBlocksCleared
from deployments.engines.base import BlocksRemoved, BlocksStored
from deployments.engines.vllm import (
    KVEventBuffer,
    KVEventsEndpoints,
    KVEventTranslator,
    engine_kwargs,
)
from deployments.routing.hashing import block_hashes, chain_hashes

BS = 4


@dataclass
class BlockStored:
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int = BS
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = 0


@dataclass
class BlockRemoved:
    block_hashes: list[int | bytes]
    medium: str | None = "GPU"
    group_idx: int | None = 0


class AllBlocksCleared:
    pass


def tokens(num_blocks: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 30_000) for _ in range(num_blocks * BS)]


def vllm_hashes(first: int, count: int) -> list[int]:
    # vLLM's own hashes are opaque to the translator: any distinct values do.
    return list(range(first, first + count))


def stored_hashes(events: list[Any]) -> list[int]:
    return [h for event in events if isinstance(event, BlocksStored) for h in event.block_hashes]


# -- chain_hashes ---------------------------------------------------------------------------------


def test_chain_from_the_root_is_block_hashes() -> None:
    prompt = [*tokens(5), 1, 2]  # a trailing partial block is skipped by both
    assert chain_hashes(None, prompt, BS) == block_hashes(prompt, BS)
    assert chain_hashes(None, prompt, BS, "t") == block_hashes(prompt, BS, "t")


@pytest.mark.parametrize("salt", [None, "tenant"])
@pytest.mark.parametrize("split", [1, 2, 4])
def test_continuing_from_a_parent_equals_hashing_the_whole_prefix(
    salt: str | None, split: int
) -> None:
    prompt = tokens(5)
    whole = block_hashes(prompt, BS, salt)
    assert chain_hashes(whole[split - 1], prompt[split * BS :], BS) == whole[split:]


def test_a_salt_with_a_parent_is_refused() -> None:
    with pytest.raises(ValueError, match="root"):
        chain_hashes(123, tokens(1), BS, "tenant")


# -- translation ----------------------------------------------------------------------------------


def translator(max_hashes: int = 100) -> KVEventTranslator:
    return KVEventTranslator(block_size=BS, max_hashes=max_hashes)


def test_a_stored_chain_of_three_blocks_gets_the_routers_hashes() -> None:
    prompt = tokens(3)
    events = translator().translate([BlockStored(vllm_hashes(10, 3), None, prompt)])
    assert events == [BlocksStored(block_hashes=tuple(block_hashes(prompt, BS)))]


@pytest.mark.parametrize("int_hashes", [True, False])
def test_blocks_stored_step_by_step_continue_their_parents_chain(int_hashes: bool) -> None:
    # vLLM stores a prompt's blocks as they are computed (chunked prefill, then decode), each
    # event naming the previous block as parent; VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0: bytes.
    prompt = tokens(3)
    theirs: list[int | bytes] = [
        h if int_hashes else h.to_bytes(32, "big") for h in vllm_hashes(10, 3)
    ]
    t = translator()
    events = t.translate([BlockStored(theirs[:1], None, prompt[:BS])])
    events += t.translate([BlockStored(theirs[1:], theirs[0], prompt[BS:])])
    assert stored_hashes(events) == block_hashes(prompt, BS)
    assert t.untranslated_blocks == 0


def test_the_cache_salt_of_the_first_block_salts_the_whole_chain() -> None:
    prompt = tokens(3)
    t = translator()
    first = BlockStored([10, 11], None, prompt[: 2 * BS], extra_keys=[("tenant-a",), None])
    rest = BlockStored([12], 11, prompt[2 * BS :], extra_keys=[None])
    events = t.translate([first, rest])
    assert stored_hashes(events) == block_hashes(prompt, BS, salt="tenant-a")


def test_removed_blocks_are_reported_by_our_hashes_and_unknown_ones_dropped() -> None:
    prompt = tokens(3)
    ours = block_hashes(prompt, BS)
    t = translator()
    t.translate([BlockStored(vllm_hashes(10, 3), None, prompt)])
    # vLLM evicts one block per event: one run of them becomes one event.
    events = t.translate([BlockRemoved([12]), BlockRemoved([999]), BlockRemoved([11])])
    assert events == [BlocksRemoved(block_hashes=(ours[2], ours[1]))]
    assert t.untranslated_blocks == 1
    assert t.translate([BlockRemoved([998])]) == []


def test_a_removed_block_still_translates_its_children() -> None:
    # A block evicted and computed again has the same hash: its children still chain from it.
    prompt = tokens(2)
    t = translator()
    t.translate([BlockStored([10], None, prompt[:BS]), BlockRemoved([10])])
    t.translate([BlockStored([10], None, prompt[:BS])])
    events = t.translate([BlockStored([11], 10, prompt[BS:])])
    assert stored_hashes(events) == block_hashes(prompt, BS)[1:]


def test_a_block_cached_twice_is_held_until_its_last_copy_goes() -> None:
    """vLLM caches a copy of a block per request that computed it at once, and evicts the
    copies one at a time: the first removal, passed on, made the router forget a prefix the
    engine still held (and every block after it, as a match stops at a gap)."""
    prompt = tokens(2)
    ours = block_hashes(prompt, BS)
    t = translator()
    t.translate([BlockStored([10, 11], None, prompt), BlockStored([10, 11], None, prompt)])
    assert t.translate([BlockRemoved([10])]) == []  # a copy of it is still cached
    assert t.translate([BlockRemoved([11]), BlockRemoved([10])]) == [
        BlocksRemoved(block_hashes=(ours[0],))
    ]
    assert t.translate([BlockRemoved([11])]) == [BlocksRemoved(block_hashes=(ours[1],))]
    # A reset forgets the counts: one copy stored after it goes with one removal.
    t.translate([BlockStored([10], None, prompt[:BS])] * 2 + [AllBlocksCleared()])
    t.translate([BlockStored([10], None, prompt[:BS])])
    assert t.translate([BlockRemoved([10])]) == [BlocksRemoved(block_hashes=(ours[0],))]


def test_cleared_is_passed_on_and_forgets_every_translation() -> None:
    prompt = tokens(2)
    t = translator()
    t.translate([BlockStored([10], None, prompt[:BS])])
    assert t.translate([AllBlocksCleared()]) == [OurAllBlocksCleared()]
    assert len(t) == 0
    assert t.translate([BlockStored([11], 10, prompt[BS:])]) == []
    assert t.untranslated_blocks == 1


def test_blocks_under_an_unknown_parent_are_skipped_and_counted() -> None:
    prompt = tokens(3)
    t = translator()
    # The subscriber joined late, or the parent's event was lost: no hash of ours to continue.
    assert t.translate([BlockStored([11, 12], 10, prompt[BS:])]) == []
    assert t.untranslated_blocks == 2
    # Later blocks of other chains still translate.
    other = tokens(1, seed=1)
    assert stored_hashes(t.translate([BlockStored([20], None, other)])) == block_hashes(other, BS)


@pytest.mark.parametrize(
    "event",
    [
        BlockStored([10], None, tokens(1), lora_name="adapter", lora_id=1),
        BlockStored([10], None, tokens(1, seed=1)[:2], block_size=2),  # a partial-block entry
        BlockStored([10, 11], None, tokens(1)),  # fewer tokens than blocks
        BlockStored([10], None, tokens(1), extra_keys=[(("mm-hash", 0),)]),
        BlockStored([10], None, tokens(1), extra_keys=[(b"embeds-digest",)]),
    ],
)
def test_blocks_our_hashes_cannot_express_are_skipped(event: BlockStored) -> None:
    t = translator()
    assert t.translate([event]) == []
    assert t.untranslated_blocks == len(event.block_hashes)


def test_a_block_with_extra_keys_cuts_the_chain_there() -> None:
    prompt = tokens(3)
    t = translator()
    event = BlockStored(vllm_hashes(10, 3), None, prompt, extra_keys=[None, (("mm", 0),), None])
    assert stored_hashes(t.translate([event])) == block_hashes(prompt, BS)[:1]
    assert t.untranslated_blocks == 2


@pytest.mark.parametrize(("medium", "group_idx"), [("CPU", 0), ("GPU", 1)])
def test_other_tiers_and_groups_are_ignored(medium: str, group_idx: int) -> None:
    t = translator()
    prompt = tokens(1)
    assert t.translate([BlockStored([10], None, prompt, medium=medium, group_idx=group_idx)]) == []
    assert t.translate([BlockRemoved([10], medium=medium, group_idx=group_idx)]) == []
    assert len(t) == 0


def test_unknown_event_kinds_are_ignored() -> None:
    class SomethingNew:
        pass

    assert translator().translate([SomethingNew()]) == []


def test_the_translation_map_forgets_the_least_recently_used() -> None:
    a, b = tokens(2, seed=1), tokens(2, seed=2)
    t = translator(max_hashes=3)
    t.translate([BlockStored([10], None, a[:BS]), BlockStored([20], None, b[:BS])])
    # Continuing chain a uses block 10 as a parent: chain b's root becomes the oldest.
    t.translate([BlockStored([11], 10, a[BS:])])
    t.translate([BlockStored([30], None, tokens(1, seed=3))])
    assert len(t) == 3
    assert t.translate([BlockStored([21], 20, b[BS:])]) == []
    assert stored_hashes(t.translate([BlockStored([12], 11, tokens(1))])) != []


# -- buffering ------------------------------------------------------------------------------------


def test_the_buffer_drops_the_oldest_and_counts_them() -> None:
    buffer = KVEventBuffer(max_events=3)
    events = [BlocksStored(block_hashes=(i,)) for i in range(5)]
    buffer.extend(events[:2])
    buffer.extend(events[2:])
    assert buffer.drain() == events[2:]
    assert buffer.dropped == 2
    assert buffer.drain() == []


# -- configuration --------------------------------------------------------------------------------


def vllm_model(**engine_options: Any) -> ModelConfig:
    return ModelConfig(
        name="m",
        engine="vllm",
        source="/models/m",
        max_model_len=4096,
        engine_options=engine_options,
    )


def test_engine_publishes_kv_events_on_its_own_local_endpoints() -> None:
    endpoints = KVEventsEndpoints.in_directory("/tmp/kv-x")
    config = engine_kwargs(vllm_model(), endpoints)["kv_events_config"]
    assert config.enable_kv_cache_events and config.publisher == "zmq"
    assert config.endpoint == "ipc:///tmp/kv-x/events"
    assert config.replay_endpoint == "ipc:///tmp/kv-x/replay"
    assert config.topic == endpoints.topic
    assert "kv_events_config" not in engine_kwargs(vllm_model())


def test_a_users_kv_events_config_wins() -> None:
    model = vllm_model(kv_events_config={"enable_kv_cache_events": False})
    config = engine_kwargs(model, KVEventsEndpoints.in_directory("/tmp/kv-x"))["kv_events_config"]
    assert not config.enable_kv_cache_events
