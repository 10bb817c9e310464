"""KV events from a replica's bounded log to each router's cursor: nothing lost silently."""

from __future__ import annotations

from deployments.engines.base import AllBlocksCleared, BlocksRemoved, BlocksStored
from deployments.routing.kv_log import KVEventCursor, KVEventLog


def stored(*hashes: int) -> BlocksStored:
    return BlocksStored(block_hashes=hashes)


def test_each_reader_gets_each_event_once() -> None:
    log = KVEventLog("a", max_events=10)
    first, second = KVEventCursor(), KVEventCursor()
    log.extend([stored(1, 2), BlocksRemoved(block_hashes=(1,))])
    delta = first.delta("r", log.window())
    assert delta.complete and delta.events == [stored(1, 2), BlocksRemoved(block_hashes=(1,))]
    log.extend([AllBlocksCleared()])
    assert first.delta("r", log.window()).events == [AllBlocksCleared()]
    assert first.delta("r", log.window()).events == []
    # Reading does not consume: another router still sees everything.
    assert len(second.delta("r", log.window()).events) == 3


def test_a_gap_beyond_the_window_is_reported() -> None:
    log = KVEventLog("a", max_events=3)
    cursor = KVEventCursor()
    log.extend([stored(1)])
    assert cursor.delta("r", log.window()).complete
    log.extend([stored(i) for i in range(2, 8)])  # 6 more events, only 3 kept
    delta = cursor.delta("r", log.window())
    assert not delta.complete
    assert delta.events == [stored(5), stored(6), stored(7)]
    log.extend([stored(8)])
    assert cursor.delta("r", log.window()).complete  # caught up again


def test_a_new_router_with_a_truncated_log_knows_its_view_is_partial() -> None:
    log = KVEventLog("a", max_events=2)
    log.extend([stored(1), stored(2), stored(3)])
    assert not KVEventCursor().delta("r", log.window()).complete


def test_a_restarted_replica_starts_over() -> None:
    cursor = KVEventCursor()
    old = KVEventLog("old")
    old.extend([stored(1), stored(2)])
    cursor.delta("r", old.window())
    new = KVEventLog("new")
    new.extend([stored(9)])
    delta = cursor.delta("r", new.window())
    assert delta.complete and delta.events == [stored(9)]


def test_forgotten_replicas_are_read_from_the_start() -> None:
    log = KVEventLog("a")
    log.extend([stored(1)])
    cursor = KVEventCursor()
    cursor.delta("r", log.window())
    cursor.forget("r")
    assert cursor.delta("r", log.window()).events == [stored(1)]
