"""Carrying engine KV cache events to every router replica over Serve's own routing stats.

No new infrastructure: each LLMServer replica keeps a bounded, sequence-numbered log of its
engine's KV events and returns the newest window of it from `record_routing_stats`. Serve's
controller polls that every `request_routing_stats_period_s` and broadcasts it to every handle, so
every router replica sees it with staleness bounded by the period (plus the broadcast delay);
each event carries the time it entered the log, so readers measure that staleness.
The log is read without being consumed, so any number of readers (router replicas, `status`) see
the same events. A reader that finds a gap (it missed more events than the window holds) learns
that its view of that replica is incomplete (`Delta.complete`); every few reports the window also
carries a snapshot of every block the replica holds, from which such a reader, or a router that
just (re)started, rebuilds its view. A restarted replica starts a new incarnation, whose cache
starts empty.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from deployments.engines.base import (
    AllBlocksCleared,
    BlocksRemoved,
    BlocksStored,
    KVCacheEvent,
)

_KINDS = {"stored": BlocksStored, "removed": BlocksRemoved}


def _encode(event: KVCacheEvent) -> tuple[str, tuple[int, ...]]:
    # Plain tuples: this crosses the controller's broadcast every period, so keep it small.
    if isinstance(event, AllBlocksCleared):
        return ("cleared", ())
    return (event.kind, event.block_hashes)


def _decode(kind: str, hashes: Sequence[int]) -> KVCacheEvent:
    if kind == "cleared":
        return AllBlocksCleared()
    return _KINDS[kind](block_hashes=tuple(hashes))


class KVEventLog:
    """The replica side: a bounded window of the newest events, numbered from 1 and stamped
    with the wall-clock time they entered the log; plus the set of blocks the events say the
    engine holds, sent now and then as a snapshot so a reader that joins late (a restarted
    router) or fell behind the window can rebuild its view."""

    def __init__(
        self,
        incarnation: str,
        max_events: int = 2048,
        max_blocks: int = 1_000_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._incarnation = incarnation  # changes when the replica restarts
        self._events: deque[tuple[int, float, str, tuple[int, ...]]] = deque(maxlen=max_events)
        self._last_seq = 0
        # Blocks held, oldest stored first; bounded although the engine's own cache already is
        # (a removal the log never saw must not let it grow forever).
        self._held: dict[int, None] = {}
        self._max_blocks = max_blocks
        self._clock = clock

    def extend(self, events: Sequence[KVCacheEvent]) -> None:
        now = self._clock()
        held = self._held
        for event in events:
            self._last_seq += 1
            self._events.append((self._last_seq, now, *_encode(event)))
            if isinstance(event, BlocksStored):
                for block_hash in event.block_hashes:
                    held.pop(block_hash, None)  # stored again: now the newest
                    held[block_hash] = None
                while len(held) > self._max_blocks:
                    del held[next(iter(held))]
            elif isinstance(event, BlocksRemoved):
                for block_hash in event.block_hashes:
                    held.pop(block_hash, None)
            else:
                held.clear()

    def window(self, *, with_snapshot: bool = False) -> dict[str, Any]:
        """The newest events; with the snapshot of every block held as of `last_seq` when
        asked (it is as large as the cache, so the replica sends it only every few reports)."""
        window: dict[str, Any] = {
            "incarnation": self._incarnation,
            "last_seq": self._last_seq,
            "events": list(self._events),
        }
        if with_snapshot:
            # Newest first: a reader adds them as one chain, which makes its head the most
            # recently used, so its LRU keeps the engine's recency.
            window["snapshot"] = {"seq": self._last_seq, "blocks": tuple(reversed(self._held))}
        return window


@dataclass(frozen=True)
class Delta:
    """What a reader must apply to its view of one replica's cache, oldest first."""

    events: list[KVCacheEvent]
    # False: events were missed and no snapshot came to repair it; the reader's view of the
    # replica is partial until a snapshot arrives.
    complete: bool
    # When the oldest of `events` entered the replica's log (wall clock), None without events:
    # now minus this is how stale the reader's view was, the event path's staleness.
    oldest_ts: float | None = None
    # True: `events` starts from a snapshot (a clear, then every block held), the view rebuilt.
    resynced: bool = False


class KVEventCursor:
    """The router side: which events of each replica it has applied."""

    def __init__(self) -> None:
        # replica -> (incarnation, last seq applied, whether the view is whole)
        self._seen: dict[str, tuple[str, int, bool]] = {}

    def delta(self, replica_id: str, window: dict[str, Any]) -> Delta:
        incarnation, last_seq = window["incarnation"], window["last_seq"]
        seen_incarnation, seen_seq, whole = self._seen.get(replica_id, (incarnation, 0, True))
        if seen_incarnation != incarnation:
            # A restarted replica starts a new log with an empty cache.
            seen_seq, whole = 0, True
        entries = [entry for entry in window["events"] if entry[0] > seen_seq]
        first = entries[0][0] if entries else last_seq + 1
        contiguous = seen_seq == last_seq or first == seen_seq + 1
        snapshot = window.get("snapshot")
        if (not contiguous or not whole) and snapshot is not None:
            # Rebuild from the snapshot, then whatever came after it.
            after = [entry for entry in entries if entry[0] > snapshot["seq"]]
            self._seen[replica_id] = (incarnation, last_seq, True)
            events: list[KVCacheEvent] = [AllBlocksCleared()]
            if snapshot["blocks"]:
                events.append(BlocksStored(block_hashes=tuple(snapshot["blocks"])))
            events += [_decode(k, h) for _, _, k, h in after]
            oldest = min((ts for _, ts, _, _ in entries), default=None)
            return Delta(events, complete=True, oldest_ts=oldest, resynced=True)
        whole = whole and contiguous
        self._seen[replica_id] = (incarnation, last_seq, whole)
        return Delta(
            [_decode(k, h) for _, _, k, h in entries],
            complete=contiguous,
            oldest_ts=entries[0][1] if entries else None,
        )

    def forget(self, replica_id: str) -> None:
        self._seen.pop(replica_id, None)
