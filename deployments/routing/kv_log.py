"""Carrying engine KV cache events to every router replica over Serve's own routing stats.

No new infrastructure: each LLMServer replica keeps a bounded, sequence-numbered log of its
engine's KV events and returns the newest window of it from `record_routing_stats`. Serve's
controller polls that every `request_routing_stats_period_s` and broadcasts it to every handle, so
every router replica sees it with staleness bounded by the period (plus the broadcast delay).
The log is read without being consumed, so any number of readers (router replicas, `status`) see
the same events. A reader that finds a gap (it missed more events than the window holds) learns
that its view of that replica is incomplete (`Delta.complete`); a restarted replica starts a new
incarnation, whose cache starts empty.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
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
    """The replica side: a bounded window of the newest events, numbered from 1."""

    def __init__(self, incarnation: str, max_events: int = 2048) -> None:
        self._incarnation = incarnation  # changes when the replica restarts
        self._events: deque[tuple[int, str, tuple[int, ...]]] = deque(maxlen=max_events)
        self._last_seq = 0

    def extend(self, events: Sequence[KVCacheEvent]) -> None:
        for event in events:
            self._last_seq += 1
            self._events.append((self._last_seq, *_encode(event)))

    def window(self) -> dict[str, Any]:
        return {
            "incarnation": self._incarnation,
            "last_seq": self._last_seq,
            "events": list(self._events),
        }


@dataclass(frozen=True)
class Delta:
    events: list[KVCacheEvent]
    complete: bool  # False: events were missed, the reader's view of the replica is partial


class KVEventCursor:
    """The router side: which events of each replica it has applied."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, int]] = {}  # replica -> (incarnation, last seq applied)

    def delta(self, replica_id: str, window: dict[str, Any]) -> Delta:
        incarnation, last_seq = window["incarnation"], window["last_seq"]
        seen_incarnation, seen_seq = self._seen.get(replica_id, (incarnation, 0))
        if seen_incarnation != incarnation:
            seen_seq = 0  # a restarted replica starts a new log with an empty cache
        events = [(s, k, h) for s, k, h in window["events"] if s > seen_seq]
        first = events[0][0] if events else last_seq + 1
        complete = seen_seq == last_seq or first == seen_seq + 1
        self._seen[replica_id] = (incarnation, last_seq)
        return Delta([_decode(k, h) for _, k, h in events], complete)

    def forget(self, replica_id: str) -> None:
        self._seen.pop(replica_id, None)
