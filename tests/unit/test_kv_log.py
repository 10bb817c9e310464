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


def test_events_carry_the_time_they_entered_the_log() -> None:
    now = [100.0]
    log = KVEventLog("a", clock=lambda: now[0])
    cursor = KVEventCursor()
    log.extend([stored(1)])
    now[0] = 101.5
    log.extend([stored(2)])
    assert cursor.delta("r", log.window()).oldest_ts == 100.0
    log.extend([stored(3)])
    assert cursor.delta("r", log.window()).oldest_ts == 101.5  # only the new event counts
    assert cursor.delta("r", log.window()).oldest_ts is None


def test_the_snapshot_holds_what_the_events_left_newest_first() -> None:
    log = KVEventLog("a")
    log.extend([stored(1, 2, 3), BlocksRemoved(block_hashes=(2,)), stored(4)])
    snapshot = log.window(with_snapshot=True)["snapshot"]
    assert snapshot == {"seq": 3, "blocks": (4, 3, 1)}
    log.extend([AllBlocksCleared(), stored(5)])
    assert log.window(with_snapshot=True)["snapshot"]["blocks"] == (5,)
    assert "snapshot" not in log.window()


def test_the_snapshot_is_bounded() -> None:
    log = KVEventLog("a", max_blocks=3)
    log.extend([stored(1, 2, 3), stored(4, 5)])
    assert log.window(with_snapshot=True)["snapshot"]["blocks"] == (5, 4, 3)


def test_a_router_that_joins_late_rebuilds_from_a_snapshot() -> None:
    log = KVEventLog("a", max_events=2)
    log.extend([stored(1), stored(2), BlocksRemoved(block_hashes=(1,)), stored(3)])
    cursor = KVEventCursor()
    # Without a snapshot the truncated window is only known to be partial...
    assert not cursor.delta("r", log.window()).complete
    log.extend([stored(4)])
    # ...and stays so, however contiguous what follows, until a snapshot comes.
    assert cursor.delta("r", log.window()).events == [stored(4)]
    log.extend([stored(6)])
    delta = cursor.delta("r", log.window(with_snapshot=True))
    assert delta.complete and delta.resynced
    assert delta.events == [AllBlocksCleared(), stored(6, 4, 3, 2)]
    # Caught up: the next events are plain deltas again.
    log.extend([stored(7)])
    delta = cursor.delta("r", log.window(with_snapshot=True))
    assert not delta.resynced and delta.events == [stored(7)]


def test_a_snapshot_repairs_a_gap() -> None:
    log = KVEventLog("a", max_events=2)
    cursor = KVEventCursor()
    log.extend([stored(1)])
    cursor.delta("r", log.window())
    log.extend([stored(i) for i in range(2, 6)])
    delta = cursor.delta("r", log.window(with_snapshot=True))
    assert delta.complete and delta.resynced
    assert delta.events == [AllBlocksCleared(), stored(5, 4, 3, 2, 1)]


def test_an_up_to_date_reader_ignores_snapshots() -> None:
    log = KVEventLog("a")
    cursor = KVEventCursor()
    log.extend([stored(1)])
    cursor.delta("r", log.window())
    log.extend([stored(2)])
    delta = cursor.delta("r", log.window(with_snapshot=True))
    assert not delta.resynced and delta.events == [stored(2)]
