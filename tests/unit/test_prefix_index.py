"""The prefix index: leading-block matches, LRU bounds, removal, departures, engine events."""

from __future__ import annotations

import random

import pytest

from deployments.engines.base import AllBlocksCleared, BlocksRemoved, BlocksStored
from deployments.routing.prefix_index import PrefixIndex

CHAIN = [101, 102, 103, 104, 105, 106]


def test_match_counts_the_leading_blocks_each_replica_holds() -> None:
    index = PrefixIndex(100)
    index.add("a", CHAIN)
    index.add("b", CHAIN[:2])
    index.add("c", CHAIN[:4])
    assert index.match(CHAIN) == {"a": 6, "b": 2, "c": 4}
    assert index.match(CHAIN[:3]) == {"a": 3, "b": 2, "c": 3}
    assert index.match([*CHAIN[:2], 999, *CHAIN[3:]]) == {"a": 2, "b": 2, "c": 2}


def test_a_gap_ends_the_match_even_if_later_blocks_are_held() -> None:
    index = PrefixIndex(100)
    index.add("a", [CHAIN[0], CHAIN[1], CHAIN[3], CHAIN[4]])  # block 2 missing
    index.add("b", CHAIN[1:])  # the first block missing: nothing leading
    assert index.match(CHAIN) == {"a": 2}


def test_no_match_without_the_first_block() -> None:
    index = PrefixIndex(100)
    index.add("a", CHAIN)
    assert index.match([7, *CHAIN]) == {}
    assert index.match([]) == {}


def test_never_more_than_max_blocks_entries_and_evictions_are_counted() -> None:
    index = PrefixIndex(10)
    rng = random.Random(0)
    for i in range(200):
        index.add(f"r{i % 4}", [rng.randrange(50) for _ in range(rng.randrange(1, 8))])
        assert index.stored <= 10
        assert len(index) <= 10
    assert index.evictions > 0
    # Every entry of a live replica is still matchable, and nothing else is.
    assert sum(index.blocks_held(f"r{i}") for i in range(4)) == len(index) == 10


def test_least_recently_touched_entries_go_first() -> None:
    index = PrefixIndex(4)
    index.add("a", [1, 2])
    index.add("b", [3, 4])
    index.add("a", [1, 2])  # touched again: b's entries are now the oldest
    index.add("c", [5])
    assert index.evictions == 1
    assert index.match([4]) == {}  # b's tail block was the least recent entry
    assert index.match([3, 4]) == {"b": 1}
    assert index.match([1, 2]) == {"a": 2}
    assert index.match([5]) == {"c": 1}


def test_a_chains_tail_ages_out_before_its_head() -> None:
    index = PrefixIndex(4)
    index.add("a", [1, 2, 3, 4])
    index.add("b", [9])
    # Evicting block 1 would make blocks 2..4 useless; the tail goes first, as in the engine.
    assert index.match([1, 2, 3, 4]) == {"a": 3}


def test_the_same_block_on_two_replicas_is_two_entries() -> None:
    index = PrefixIndex(100)
    index.add("a", CHAIN[:3])
    index.add("b", CHAIN[:3])
    index.add("a", CHAIN[:3])  # already there: touched, not added
    assert len(index) == 6
    assert (index.blocks_held("a"), index.blocks_held("b"), index.blocks_held("z")) == (3, 3, 0)


def test_remove_drops_only_that_replicas_blocks() -> None:
    index = PrefixIndex(100)
    index.add("a", CHAIN)
    index.add("b", CHAIN)
    index.remove("a", CHAIN[3:])
    index.remove("a", [999])  # not held: ignored
    index.remove("z", CHAIN)  # unknown replica: ignored
    assert index.match(CHAIN) == {"a": 3, "b": 6}
    assert len(index) == 9


def test_clear_forgets_everything_the_replica_held() -> None:
    index = PrefixIndex(100)
    index.add("a", CHAIN)
    index.add("b", CHAIN[:2])
    index.clear("a")
    assert index.match(CHAIN) == {"b": 2}
    assert len(index) == 2 and index.blocks_held("a") == 0
    index.add("a", CHAIN[:1])  # it caches again from scratch
    assert index.match(CHAIN) == {"a": 1, "b": 2}


def test_a_removed_replica_never_matches_and_a_newcomer_inherits_nothing() -> None:
    index = PrefixIndex(8)
    index.add("a", CHAIN[:4])
    index.remove_replica("a")
    assert index.match(CHAIN) == {}
    assert len(index) == 0 and index.stored == 4  # lingering until they age out
    index.add("b", [50])
    assert index.match(CHAIN) == {}
    # Filling the LRU ages a's entries out; then its slot is free again, and still clean.
    index.add("c", [60, 61, 62, 63, 64, 65, 66])
    assert index.stored == 8 and len(index) == 8
    index.add("d", [70])
    assert index.match(CHAIN) == {}
    assert index.match([70]) == {"d": 1}


def test_unbounded_slot_churn_stays_bounded() -> None:
    index = PrefixIndex(16)
    for i in range(500):
        index.add(f"r{i}", [i, i + 1])
        index.remove_replica(f"r{i}")
    assert index.stored <= 16
    assert len(index) == 0
    # Slots are reused once their entries aged out: the 16 entries hold at most 8 departed
    # replicas' pairs, and the newcomer takes a ninth slot.
    assert len(index._owner) <= 9


def test_an_add_never_evicts_its_own_blocks() -> None:
    # A shared prefix touched by the last add is left in place (it is among the newest); a long
    # chain moved in after it must not push it out of the cap.
    index = PrefixIndex(16)
    prefix = [1, 2]
    index.add("r0", prefix + list(range(100, 114)))  # the cap is full
    index.add("r1", [7])
    chain = prefix + list(range(200, 214))
    index.add("r0", chain)
    assert index.match(chain) == {"r0": 16}


@pytest.mark.parametrize("max_blocks", [8, 16, 40, 100])
def test_every_block_added_is_held_right_after(max_blocks: int) -> None:
    # Any sequence of blocks (a snapshot is added as one, in the engine's order, not a chain
    # sharing only its head with the earlier ones), overlapping what is already there.
    rng = random.Random(max_blocks)
    index = PrefixIndex(max_blocks)
    for _ in range(300):
        replica = f"r{rng.randrange(3)}"
        blocks = rng.sample(range(2 * max_blocks), rng.randrange(1, max_blocks + 1))
        index.add(replica, blocks)
        assert index.match(blocks)[replica] == len(blocks)


def test_events_are_engine_truth() -> None:
    index = PrefixIndex(100)
    index.apply("a", [BlocksStored(block_hashes=tuple(CHAIN))])
    assert index.match(CHAIN) == {"a": 6}
    index.apply("a", [BlocksRemoved(block_hashes=(CHAIN[2],))])
    assert index.match(CHAIN) == {"a": 2}
    # Order matters: a block evicted, then stored again in the same batch, is held.
    index.apply(
        "a",
        [BlocksRemoved(block_hashes=(CHAIN[0],)), BlocksStored(block_hashes=(CHAIN[0],))],
    )
    assert index.match(CHAIN) == {"a": 2}
    index.apply("a", [AllBlocksCleared(), BlocksStored(block_hashes=(CHAIN[0],))])
    assert index.match(CHAIN) == {"a": 1}


def test_memory_estimate_grows_with_entries() -> None:
    index = PrefixIndex(10_000)
    empty = index.memory_bytes()
    index.add("a", list(range(5_000)))
    assert index.memory_bytes() > empty + 5_000 * 36


def test_max_blocks_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_blocks"):
        PrefixIndex(0)
