"""Request metrics with vLLM `bench serve`'s definitions (vllm/benchmarks/serve.py,
calculate_metrics, and the request functions in vllm/benchmarks/lib/endpoint_request_func.py).

A request completed when it got HTTP 200 and at least one chunk carrying tokens, with no error;
every other request failed (vLLM also fails a stream that never carried a token). For a completed
request, with t0 its send time and t1..tn the arrival times of its token chunks:
  TTFT = t1 - t0
  E2E  = tn - t0 (the last token, not the trailing usage chunk)
  ITL  = t2 - t1, ..., tn - tn-1 (per chunk: a chunk with several tokens is one gap)
  TPOT = (E2E - TTFT) / (output_tokens - 1), only for requests with more than one output token
Percentiles are numpy's (linear interpolation), as vLLM's; the benchmarks' own figures (an SLO
window's TTFT p95, a decision's p99) use `nearest_rank`, which stays a measured value and takes
a failed request's infinite TTFT. Throughputs divide by the run's duration. Goodput counts the
completed requests that meet every SLO given (TTFT <= SLO and TPOT <= SLO, where a one-token
request's TPOT is 0, as in vLLM) per second.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loadtest.spec import RequestRecord

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class Latencies:
    """One completed request's latencies in seconds."""

    ttft_s: float
    e2e_s: float
    tpot_s: float | None  # None with one output token
    itl_s: list[float]
    output_tokens: int


def completed(record: RequestRecord) -> bool:
    return record.ok and bool(record.token_times_s)


def latencies(record: RequestRecord) -> Latencies | None:
    """The request's latencies, or None when it did not complete."""
    if not completed(record):
        return None
    times = record.token_times_s
    ttft = times[0] - record.start_s
    e2e = times[-1] - record.start_s
    # Without usage, vLLM counts the output's tokens; the chunks are the closest count here.
    output_tokens = record.output_tokens or len(times)
    tpot = (e2e - ttft) / (output_tokens - 1) if output_tokens > 1 else None
    itl = [b - a for a, b in itertools.pairwise(times)]
    return Latencies(ttft, e2e, tpot, itl, output_tokens)


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The q-th percentile by the nearest-rank rule: the smallest value with at least q% of the
    values at or below it (p95 of 20 values: the 19th smallest)."""
    if not values:
        raise ValueError("no values to take a percentile of")
    return sorted(values)[_rank_index(len(values), q)]


def _rank_index(count: int, q: float) -> int:
    """Where the q-th percentile by nearest rank sits among `count` sorted values."""
    return max(0, math.ceil(q / 100 * count) - 1)


def error_key(record: RequestRecord) -> str:
    """How a failed request is counted in `errors_by_status`: its HTTP status; "0" when no
    response came (connection error, timeout before the headers); "200" when the stream started
    but broke or carried no token."""
    return str(record.status)


def distribution(values_s: Sequence[float]) -> dict[str, float | None]:
    """Mean and percentiles in milliseconds; None for each when there are no values."""
    keys = ["mean", *(f"p{p}" for p in PERCENTILES)]
    if not values_s:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=float) * 1000.0
    stats = [float(np.mean(ms)), *(float(np.percentile(ms, p)) for p in PERCENTILES)]
    return dict(zip(keys, stats, strict=True))


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    slo_ttft_ms: float | None,
    slo_tpot_ms: float | None,
) -> dict:
    """The run's summary (the `summary.json` contract); rates are None when duration_s <= 0."""
    done = [(r, lat) for r in records if (lat := latencies(r)) is not None]
    failed = [r for r in records if not completed(r)]
    prompt_tokens = sum(r.prompt_tokens for r, _ in done)
    output_tokens = sum(lat.output_tokens for _, lat in done)
    cached_tokens = sum(r.cached_tokens for r, _ in done)

    goodput_count: int | None = None
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        goodput_count = sum(
            1
            for _, lat in done
            # In seconds, as vLLM compares, so that a value on the bound counts the same.
            if (slo_ttft_ms is None or lat.ttft_s <= slo_ttft_ms / 1000.0)
            and (slo_tpot_ms is None or (lat.tpot_s or 0.0) <= slo_tpot_ms / 1000.0)
        )

    def per_second(count: float | None) -> float | None:
        return None if count is None or duration_s <= 0 else count / duration_s

    errors = Counter(error_key(r) for r in failed)
    return {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(failed),
        "errors_by_status": dict(sorted(errors.items())),
        "duration_s": duration_s,
        "request_throughput": per_second(len(done)),
        "output_throughput": per_second(output_tokens),
        "total_token_throughput": per_second(prompt_tokens + output_tokens),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "cached_prompt_tokens": cached_tokens,
        "cached_prompt_token_ratio": cached_tokens / prompt_tokens if prompt_tokens else None,
        "ttft_ms": distribution([lat.ttft_s for _, lat in done]),
        "tpot_ms": distribution([lat.tpot_s for _, lat in done if lat.tpot_s is not None]),
        "itl_ms": distribution([gap for _, lat in done for gap in lat.itl_s]),
        "e2e_ms": distribution([lat.e2e_s for _, lat in done]),
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
        "goodput": per_second(goodput_count),
    }


def window_ttft_p95(
    records: Sequence[RequestRecord], duration_s: float, window_s: float
) -> list[float | None]:
    """TTFT p95 (nearest rank, seconds) per window of request start times over [0, duration_s);
    a failed request counts as an infinite TTFT; None: no request started in the window."""
    buckets: list[list[float]] = [[] for _ in range(math.ceil(duration_s / window_s))]
    for record in records:
        index = int(record.start_s // window_s)
        if index < len(buckets):
            lat = latencies(record)
            buckets[index].append(math.inf if lat is None else lat.ttft_s)
    return [nearest_rank(ttfts, 95) if ttfts else None for ttfts in buckets]


class SloWindows:
    """A run's windows of request starts (as `window_ttft_p95` has them), judged against a TTFT
    p95 objective while the run goes on: `first_missed` names the first window that has missed
    it for certain, whatever its requests still in flight do next.

    Judged: the windows that have closed and end by `until_s` (`loadtest capacity` passes its
    hold: the window after it holds the last request or two, which its verdict leaves out as
    noise). A record in flight has `end_s` 0 and the chunk times it has had so far; it is
    certainly over the SLO once its first token came later than the SLO, or none has come that
    long after its start. One with an early first token may still fail, so it counts as not
    over. A window of n requests misses when at least n minus the p95's index of them are over:
    the p95 is then one of them. A window whose requests have all ended within it is settled and
    not read again, so a long run costs a check of its recent windows only."""

    def __init__(self, slo_ttft_s: float, window_s: float, until_s: float = math.inf) -> None:
        self.slo_ttft_s = slo_ttft_s
        self.window_s = window_s
        self.until_s = until_s
        self._open: dict[int, list[RequestRecord]] = {}  # judged windows not settled yet
        self._taken = 0  # how many of the run's records are in those windows (or settled)

    def first_missed(self, records: Sequence[RequestRecord], now_s: float) -> int | None:
        """`records`: the run's records so far, in start order (each call sees the same list,
        grown)."""
        judged = int(min(now_s, self.until_s) // self.window_s)
        while self._taken < len(records):
            window = int(records[self._taken].start_s // self.window_s)
            if window >= judged:
                break
            self._open.setdefault(window, []).append(records[self._taken])
            self._taken += 1
        for window in sorted(self._open):
            requests = self._open[window]
            over = sum(_over_slo(r, now_s, self.slo_ttft_s) for r in requests)
            if over >= len(requests) - _rank_index(len(requests), 95):
                return window
            if all(r.end_s > 0.0 for r in requests):
                del self._open[window]
        return None


def _over_slo(record: RequestRecord, now_s: float, slo_ttft_s: float) -> bool:
    if record.end_s > 0.0 and not completed(record):  # failed: an infinite TTFT
        return True
    first = record.token_times_s[0] if record.token_times_s else now_s
    return first - record.start_s > slo_ttft_s
