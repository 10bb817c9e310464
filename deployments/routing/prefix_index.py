"""Which replica holds which prefix blocks: the router's bounded view of the fleet's KV caches.

Entries are (replica, block hash) pairs. They come from two sources: the router's own decisions
(a request routed to a replica will leave its prompt blocks there, so they are added at once) and
engine truth (each replica's KV cache events: blocks stored, removed, all cleared). Memory is
bounded by `max_blocks` entries with one LRU over all of them, so a router serving a large fleet
forgets the coldest blocks first, whatever replica holds them.

Layout, chosen for the cost of `match` (one decision = one walk over the prompt's blocks):
- each replica owns a slot (a bit position); `_holders` maps a block hash to the bitmask of the
  slots holding it, so narrowing the candidates at each block is one integer AND, however many
  replicas there are;
- the LRU is an OrderedDict keyed by one int per entry, `hash << _SLOT_BITS | slot`, which is no
  larger than the hash itself (both fit in three 30-bit digits) and needs no tuple per entry;
- touching an entry that is already among the newest eighth of the cap does not move it: at a
  million entries every move is a few cache misses, and a routed request touches ~128 entries,
  most of them (its shared prefix) recently touched. Eviction order is LRU to within an eighth
  of the cap; below 8 entries it is exact.

A replica that leaves (or whose cache is cleared) gives up its slot at once: `match` stops
reporting it immediately, and its entries stay in the LRU, unreachable, until they age out. That
makes leaving O(1) instead of a scan of up to `max_blocks` entries on the router's event loop; the
slot is reused only once its last entry is gone, so a newcomer never inherits stale bits.
"""

from __future__ import annotations

import heapq
import sys
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from itertools import accumulate, repeat, takewhile
from operator import and_, lshift, neg, or_

from deployments.engines.base import AllBlocksCleared, BlocksRemoved, BlocksStored, KVCacheEvent

# Up to 2**20 slots (replicas known at once, counting departed ones whose entries linger).
_SLOT_BITS = 20
_SLOT_MASK = (1 << _SLOT_BITS) - 1
# Rough CPython sizes for memory_bytes(): an int of 31-90 bits (hashes and LRU keys) and a mask.
_INT_BYTES = 36
_MASK_BYTES = 32


class PrefixIndex:
    """Block hash -> replicas holding it, bounded by `max_blocks` (replica, block) entries."""

    def __init__(self, max_blocks: int) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be at least 1, got {max_blocks}")
        self.max_blocks = max_blocks
        self._holders: dict[int, int] = {}
        # Entry key -> the tick it was last moved to the recent end; oldest first.
        self._lru: OrderedDict[int, int] = OrderedDict()
        # Entries moved or inserted so far, and how recent (in such moves) an entry may be and
        # not be moved again: see add().
        self._tick = 0
        self._fresh = max_blocks // 8
        self._slot_of: dict[str, int] = {}
        self._owner: list[str | None] = []  # slot -> live replica; None once it left
        self._entries: list[int] = []  # slot -> entries in the LRU, live or not
        self._held: dict[str, int] = {}  # live replica -> its entries
        self._reusable: list[int] = []  # heap of slots with no owner and no entries
        self._orphaned = 0  # entries of departed slots still in the LRU
        self.evictions = 0  # entries dropped to stay within max_blocks

    def __len__(self) -> int:
        """Entries of live replicas (those a match can report)."""
        return len(self._lru) - self._orphaned

    @property
    def stored(self) -> int:
        """Entries in memory, including departed replicas' not yet aged out; <= max_blocks."""
        return len(self._lru)

    def blocks_held(self, replica_id: str) -> int:
        """How many blocks the index believes `replica_id` holds."""
        return self._held.get(replica_id, 0)

    @property
    def held(self) -> Mapping[str, int]:
        """blocks_held of every replica holding any, as a mapping (for C-level lookups)."""
        return self._held

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Per replica holding the first block, how many LEADING blocks of the chain it holds.

        A replica stops counting at its first missing block (a gap ends its match: the engine can
        reuse only an unbroken prefix). Replicas holding no leading block are absent.
        """
        # The walk, in C: the running AND of the holder masks along the chain, cut where it
        # becomes empty. Entry i is the set of replicas holding blocks 0..i. It only loses bits,
        # so as integers it never grows: each replica's count is where a bisection finds its bit
        # gone, and there are at most as many distinct values as replicas.
        surviving = list(
            takewhile(bool, accumulate(map(self._holders.get, block_hashes, repeat(0)), and_))
        )
        matched: dict[str, int] = {}
        end = len(surviving)
        i = 0
        while i < end:
            current = surviving[i]
            i = bisect_right(surviving, -current, lo=i, key=neg)
            self._report(current if i == end else current & ~surviving[i], i, matched)
        return matched

    def add(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        """`replica_id` holds these blocks (it was routed a request with them, or stored them);
        each becomes one of the most recently used (the first block last so that a prefix's tail
        ages out before its head, as in the engine; one already among the newest eighth stays
        where it is), and none of them is evicted by this call."""
        slot = self._slot_of.get(replica_id)
        if slot is None:
            slot = self._claim_slot(replica_id)
        if len(block_hashes) > self.max_blocks:
            block_hashes = block_hashes[: self.max_blocks]  # the head is what matches need
        lru = self._lru
        # Entry keys, tail first (C-level maps: this runs for every block of every routed request).
        keys = dict.fromkeys(
            map(or_, map(lshift, reversed(block_hashes), repeat(_SLOT_BITS)), repeat(slot))
        )
        # One stamp (and one int object) for every entry this call moves or inserts: the tick
        # before the first of them, so fewer than `now - stamp` entries were moved or inserted
        # after any of them. An entry stamped less than `_fresh` ticks ago is therefore among the
        # newest `_fresh` and stays where it is, unless this chain is so long that, moved in
        # after it, it would push it past the cap: then every entry of the chain moves.
        stale = (
            self._tick - self._fresh if len(keys) <= self.max_blocks - self._fresh else self._tick
        )
        stamp = self._tick
        self._tick += len(keys)
        holders = self._holders
        bit = 1 << slot
        move = lru.move_to_end
        added = 0
        for key, old in zip(keys, map(lru.get, keys), strict=True):
            if old is None:
                lru[key] = stamp
                h = key >> _SLOT_BITS
                holders[h] = holders.get(h, 0) | bit
                added += 1
            elif old <= stale:
                move(key)
                lru[key] = stamp
        self._entries[slot] += added
        self._held[replica_id] = self._held.get(replica_id, 0) + added
        # Each entry of the chain is now among the newest `max_blocks`: moved in, or left with
        # fewer than `_fresh` entries after it, and this call moved in at most
        # `max_blocks - _fresh` more. So evicting from the old end never takes any of it.
        if len(lru) > self.max_blocks:
            self._evict(len(lru) - self.max_blocks)

    def remove(self, replica_id: str, block_hashes: Iterable[int]) -> None:
        """`replica_id` no longer holds these blocks (its engine evicted them)."""
        slot = self._slot_of.get(replica_id)
        if slot is None:
            return
        lru = self._lru
        for h in block_hashes:
            key = h << _SLOT_BITS | slot
            if key in lru:
                del lru[key]
                self._drop(h, slot)

    def clear(self, replica_id: str) -> None:
        """`replica_id`'s cache was reset: it holds nothing (it gets a fresh slot on next add)."""
        slot = self._slot_of.pop(replica_id, None)
        if slot is None:
            return
        self._owner[slot] = None
        self._held.pop(replica_id, None)
        self._orphaned += self._entries[slot]
        self._release_if_empty(slot)

    def remove_replica(self, replica_id: str) -> None:
        """`replica_id` left the fleet: no match reports it from now on."""
        self.clear(replica_id)

    def apply(self, replica_id: str, events: Sequence[KVCacheEvent]) -> None:
        """Engine truth: the replica's KV cache events, oldest first."""
        for event in events:
            if isinstance(event, BlocksStored):
                self.add(replica_id, event.block_hashes)
            elif isinstance(event, BlocksRemoved):
                self.remove(replica_id, event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self.clear(replica_id)

    def memory_bytes(self) -> int:
        """A rough estimate of the index's size: its containers plus the ints they own."""
        return (
            sys.getsizeof(self._lru)  # includes the OrderedDict's linked-list nodes
            + sys.getsizeof(self._holders)
            + len(self._lru) * _INT_BYTES
            + len(self._holders) * (_INT_BYTES + _MASK_BYTES)
        )

    # -- internals -----------------------------------------------------------------------------

    def _report(self, bits: int, count: int, matched: dict[str, int]) -> None:
        owner = self._owner
        while bits:
            low = bits & -bits
            replica_id = owner[low.bit_length() - 1]
            if replica_id is not None:  # a departed slot's lingering entries never match
                matched[replica_id] = count
            bits ^= low

    def _claim_slot(self, replica_id: str) -> int:
        if self._reusable:
            slot = heapq.heappop(self._reusable)
            self._owner[slot] = replica_id
        else:
            slot = len(self._owner)
            if slot > _SLOT_MASK:
                raise RuntimeError(f"more than {_SLOT_MASK + 1} replicas in the prefix index")
            self._owner.append(replica_id)
            self._entries.append(0)
        self._slot_of[replica_id] = slot
        return slot

    def _evict(self, count: int) -> None:
        """Drop the `count` least recently used entries."""
        pop = self._lru.popitem
        for _ in range(count):
            key, _ = pop(last=False)
            self._drop(key >> _SLOT_BITS, key & _SLOT_MASK)
        self.evictions += count

    def _drop(self, block_hash: int, slot: int) -> None:
        """Bookkeeping of one entry that just left the LRU."""
        holders = self._holders
        mask = holders[block_hash] & ~(1 << slot)
        if mask:
            holders[block_hash] = mask
        else:
            del holders[block_hash]
        self._entries[slot] -= 1
        owner = self._owner[slot]
        if owner is not None:
            self._held[owner] -= 1
        else:  # a departed replica's entry: its slot may be free now
            self._orphaned -= 1
            self._release_if_empty(slot)

    def _release_if_empty(self, slot: int) -> None:
        if self._entries[slot] == 0:
            heapq.heappush(self._reusable, slot)
