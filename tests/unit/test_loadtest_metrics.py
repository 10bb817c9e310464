"""loadtest.metrics on hand-made timelines: vLLM bench serve's definitions, edge cases included."""

from __future__ import annotations

import math
import random

import pytest

from loadtest.metrics import (
    SloWindows,
    distribution,
    latencies,
    nearest_rank,
    summarize,
    window_ttft_p95,
)
from loadtest.spec import RequestRecord


def record(
    start: float,
    token_times: list[float],
    *,
    status: int = 200,
    output_tokens: int | None = None,
    prompt_tokens: int = 100,
    cached_tokens: int = 0,
    error: str | None = None,
    index: int = 0,
) -> RequestRecord:
    return RequestRecord(
        index=index,
        session_id=f"s{index}",
        turn=0,
        scheduled_s=start,
        start_s=start,
        end_s=(token_times[-1] if token_times else start) + 0.01,  # the usage chunk and [DONE]
        status=status,
        prompt_tokens=prompt_tokens,
        output_tokens=len(token_times) if output_tokens is None else output_tokens,
        cached_tokens=cached_tokens,
        token_times_s=token_times,
        error=error,
    )


# A: sent at 0, tokens at 0.1, 0.2, 0.4 -> TTFT 100, E2E 400, ITL 100 and 200, TPOT 300/2 = 150.
# B: sent at 1.0, tokens at 1.3, 1.35 -> TTFT 300, E2E 350, ITL 50, TPOT 50/1 = 50.
A = record(0.0, [0.1, 0.2, 0.4], prompt_tokens=100, cached_tokens=64, index=0)
B = record(1.0, [1.3, 1.35], prompt_tokens=300, cached_tokens=0, index=1)


def test_latencies_of_two_requests() -> None:
    summary = summarize([A, B], duration_s=2.0, slo_ttft_ms=None, slo_tpot_ms=None)
    assert summary["completed"] == 2 and summary["failed"] == 0
    assert summary["errors_by_status"] == {}
    ttft = summary["ttft_ms"]
    assert ttft["mean"] == pytest.approx(200.0)
    # numpy's linear interpolation between 100 and 300, as vLLM reports it
    assert ttft["p50"] == pytest.approx(200.0)
    assert ttft["p90"] == pytest.approx(280.0)
    assert ttft["p99"] == pytest.approx(298.0)
    assert summary["e2e_ms"]["mean"] == pytest.approx(375.0)  # last token, not end_s
    assert summary["tpot_ms"]["mean"] == pytest.approx(100.0)  # (150 + 50) / 2
    assert summary["itl_ms"]["mean"] == pytest.approx((100 + 200 + 50) / 3)
    assert summary["itl_ms"]["p50"] == pytest.approx(100.0)


def test_throughputs_and_cached_share() -> None:
    summary = summarize([A, B], duration_s=2.0, slo_ttft_ms=None, slo_tpot_ms=None)
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["output_tokens"] == 5
    assert summary["output_throughput"] == pytest.approx(2.5)
    assert summary["prompt_tokens"] == 400
    assert summary["total_token_throughput"] == pytest.approx(202.5)
    assert summary["cached_prompt_token_ratio"] == pytest.approx(64 / 400)
    assert summary["goodput"] is None  # no SLO given


def test_tpot_uses_usage_tokens_when_chunks_bundle_tokens() -> None:
    # 3 chunks carried 5 tokens: TPOT spreads the decode time over 4 tokens, ITL stays per chunk.
    bundled = record(0.0, [0.1, 0.2, 0.5], output_tokens=5)
    lat = latencies(bundled)
    assert lat is not None
    assert lat.tpot_s == pytest.approx(0.1)
    assert lat.itl_s == pytest.approx([0.1, 0.3])
    assert summarize([bundled], 1.0, None, None)["output_tokens"] == 5


def test_one_token_requests_have_ttft_but_no_tpot_or_itl() -> None:
    single = record(0.0, [0.25])
    summary = summarize([single], duration_s=1.0, slo_ttft_ms=None, slo_tpot_ms=None)
    assert summary["completed"] == 1
    assert summary["ttft_ms"]["p50"] == pytest.approx(250.0)
    assert summary["e2e_ms"]["p50"] == pytest.approx(250.0)
    assert summary["tpot_ms"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert summary["itl_ms"]["mean"] is None


def test_one_token_request_is_excluded_from_tpot_of_others() -> None:
    summary = summarize([A, record(0.0, [0.25], index=2)], 1.0, None, None)
    assert summary["tpot_ms"]["mean"] == pytest.approx(150.0)


def test_stream_without_tokens_fails() -> None:
    empty = record(0.0, [], error="the stream carried no token")
    summary = summarize([A, empty], duration_s=1.0, slo_ttft_ms=None, slo_tpot_ms=None)
    assert summary["completed"] == 1 and summary["failed"] == 1
    assert summary["errors_by_status"] == {"200": 1}
    # vLLM also fails a 200 that never carried a token, even without an error message
    assert summarize([record(0.0, [])], 1.0, None, None)["failed"] == 1


def test_errors_are_counted_by_status_and_left_out_of_latencies() -> None:
    records = [
        A,
        record(0.0, [], status=503, error="overloaded", index=1),
        record(0.0, [], status=503, error="overloaded", index=2),
        record(0.0, [], status=0, error="ConnectError", index=3),
        # broke mid-stream: tokens came, then an error event
        record(0.0, [5.0, 6.0], error="engine died", cached_tokens=99, index=4),
    ]
    summary = summarize(records, duration_s=1.0, slo_ttft_ms=None, slo_tpot_ms=None)
    assert summary["num_requests"] == 5
    assert summary["completed"] == 1 and summary["failed"] == 4
    assert summary["errors_by_status"] == {"0": 1, "200": 1, "503": 2}
    assert summary["ttft_ms"]["p99"] == pytest.approx(100.0)
    assert summary["output_tokens"] == 3
    assert summary["cached_prompt_token_ratio"] == pytest.approx(64 / 100)


def test_all_failed() -> None:
    records = [record(0.0, [], status=500, error="boom", index=i) for i in range(3)]
    summary = summarize(records, duration_s=2.0, slo_ttft_ms=100.0, slo_tpot_ms=None)
    assert summary["completed"] == 0 and summary["failed"] == 3
    assert summary["errors_by_status"] == {"500": 3}
    assert summary["request_throughput"] == 0.0
    assert summary["goodput"] == 0.0
    assert summary["cached_prompt_token_ratio"] is None
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(summary[key]) == {"mean", "p50", "p90", "p99"}
        assert all(v is None for v in summary[key].values())


def test_no_records_and_no_duration() -> None:
    summary = summarize([], duration_s=0.0, slo_ttft_ms=None, slo_tpot_ms=None)
    assert summary["completed"] == 0 and summary["failed"] == 0
    assert summary["request_throughput"] is None and summary["output_throughput"] is None


@pytest.mark.parametrize(
    ("slo_ttft_ms", "slo_tpot_ms", "good"),
    [
        (250.0, None, 2),  # A (100) and the one-token C (200) meet it; B (300) does not
        (100.0, None, 1),  # the bound is inclusive, as vLLM's: A (exactly 100) meets it
        (None, 100.0, 2),  # B (50) and C (TPOT counts as 0) meet it; A (150) does not
        (250.0, 100.0, 1),  # only C meets both
        (50.0, 1000.0, 0),
    ],
)
def test_goodput_counts_requests_meeting_every_slo(
    slo_ttft_ms: float | None, slo_tpot_ms: float | None, good: int
) -> None:
    single = record(0.0, [0.2], index=2)
    summary = summarize(
        [A, B, single], duration_s=4.0, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms
    )
    assert summary["goodput"] == pytest.approx(good / 4.0)


def test_distribution_percentiles_on_many_values() -> None:
    values = [i / 1000 for i in range(1, 101)]  # 1 .. 100 ms
    stats = distribution(values)
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)


def test_nearest_rank_is_a_measured_value_and_takes_infinity() -> None:
    values = [float(v) for v in range(20, 0, -1)]  # 20 values, unsorted
    assert nearest_rank(values, 95) == 19.0  # at least 95% (19 of 20) at or below it
    assert nearest_rank(values, 50) == 10.0
    assert nearest_rank(values, 99) == 20.0
    assert nearest_rank(values, 0) == 1.0
    assert nearest_rank([0.1, math.inf], 50) == 0.1
    assert nearest_rank([0.1, math.inf], 95) == math.inf  # a failed request fails the window
    with pytest.raises(ValueError, match="no values"):
        nearest_rank([], 50)


def in_flight(start: float, token_times: list[float] | None = None) -> RequestRecord:
    """A request still streaming (end_s 0), with the chunks it has had so far."""
    return RequestRecord(
        index=0,
        session_id="s",
        turn=0,
        scheduled_s=start,
        start_s=start,
        end_s=0.0,
        status=200,
        token_times_s=token_times or [],
    )


def test_a_window_misses_once_its_p95_is_over_whatever_the_rest_do() -> None:
    """20 requests in a 10 s window (p95 by nearest rank: the 19th smallest): 2 over the 2 s SLO
    settle it, 1 does not. Over: a late first token, a failure, or no token yet past the SLO."""
    base = [record(0.1 * i, [0.1 * i + 0.5]) for i in range(17)]
    base.append(in_flight(1.75, [2.0]))  # TTFT 0.25 s, still streaming: may yet fail, not over
    late = record(1.8, [4.5])  # TTFT 2.7 s
    failed = record(1.9, [], status=503, error="overloaded")
    fast = record(2.0, [2.2])
    waiting = in_flight(9.0)  # no token yet
    assert SloWindows(2.0, 10.0).first_missed([*base, late, fast], 12.0) is None
    assert SloWindows(2.0, 10.0).first_missed([*base, late, failed], 12.0) == 0
    assert SloWindows(2.0, 10.0).first_missed([*base, late, waiting], 10.5) is None  # waited 1.5 s
    assert SloWindows(2.0, 10.0).first_missed([*base, late, waiting], 11.5) == 0  # waited 2.5 s
    # A window still open is not judged: more requests may start in it.
    assert SloWindows(2.0, 10.0).first_missed([*base, late, failed], 9.9) is None
    # The first window that missed, not a later one.
    later = [record(10.0 + 0.1 * i, [10.0 + 0.1 * i + 3.0]) for i in range(5)]
    assert SloWindows(2.0, 10.0).first_missed([*base, late, failed, *later], 25.0) == 0
    assert SloWindows(2.0, 10.0).first_missed([*base, late, fast, *later], 25.0) == 1


@pytest.mark.parametrize("seed", range(20))
def test_a_miss_found_early_holds_for_the_finished_run(seed: int) -> None:
    """Random runs looked at in a random moment: a window said to miss still misses however well
    its requests in flight end (a first token now, then success), and no earlier window
    does."""
    rng = random.Random(seed)
    now = rng.uniform(5.0, 30.0)
    records, finished = [], []
    for i in range(rng.randint(20, 200)):
        start = now * i / 200
        ttft = rng.choices([0.2, 0.5, 1.0, 2.5, 5.0], weights=[40, 30, 26, 3, 1])[0]
        if start + ttft <= now and rng.random() < 0.95:
            ok = record(start, [start + ttft]) if rng.random() < 0.99 else record(start, [])
            records.append(ok)
            finished.append(ok)
        else:
            token = [start + ttft] if start + ttft <= now else []
            records.append(in_flight(start, token))
            finished.append(record(start, token or [now]))  # the best it can still do
    # The best end of a request in flight is judged as it is now: so a window misses for
    # certain exactly when it misses in the best finished run.
    p95s = window_ttft_p95(finished, 2.0 * int(now // 2.0), 2.0)
    over = [w for w, p in enumerate(p95s) if p is not None and p > 2.0]
    first_over = over[0] if over else None
    assert SloWindows(2.0, 2.0).first_missed(records, now) == first_over
    assert SloWindows(2.0, 2.0).first_missed(finished, now) == first_over


def test_a_trailing_window_past_the_last_arrival_is_not_judged() -> None:
    """A capacity probe's last request starts at the end of its hold, alone in a window the
    probe's verdict leaves out; one late answer there stopped the run as a miss."""
    records = [record(0.25 * i, [0.25 * i + 0.1]) for i in range(12)]  # 3 s at 4/s, fast
    records.append(in_flight(3.0))  # the last arrival, waiting
    assert SloWindows(0.5, 1.0).first_missed(records, 5.0) == 3
    assert SloWindows(0.5, 1.0, 3.0).first_missed(records, 5.0) is None


def test_settled_windows_are_not_read_again() -> None:
    """A window whose requests all ended within the SLO cannot miss later: it is dropped, and
    later calls read only the windows still open (the watch runs on the run's event loop)."""
    records = [record(0.5, [0.6]), record(1.5, [1.6]), in_flight(2.5)]
    windows = SloWindows(window_s=1.0, slo_ttft_s=2.0)
    assert windows.first_missed(records, 3.0) is None
    records[0].error = "changed"  # would miss window 0, were its settled record read again
    records.append(record(3.5, [9.0]))  # window 3: TTFT 5.5 s
    assert windows.first_missed(records, 4.0) == 3
    assert SloWindows(2.0, 1.0).first_missed(records, 4.0) == 0  # a fresh look reads it
