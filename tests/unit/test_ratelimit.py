"""Token buckets and per-key rate limits on fake time (deployments/api/ratelimit.py)."""

from __future__ import annotations

import math

import pytest

from deployments.api.errors import APIError
from deployments.api.ratelimit import KeyRateLimiter, Limits, TokenBucket, _duration


@pytest.mark.parametrize(
    ("capacity", "taken", "elapsed", "amount", "wait"),
    [
        (60, 0, 0, 60, 0.0),  # starts full
        (60, 60, 0, 1, 1.0),  # empty: one unit per second at 60/min
        (60, 60, 0.5, 1, 0.5),
        (60, 60, 30, 30, 0.0),  # half refilled after half a minute
        (60, 60, 120, 60, 0.0),  # never above capacity
        (60, 0, 0, 61, math.inf),  # more than the bucket can ever hold
        (600, 600, 0, 100, 10.0),
    ],
)
def test_bucket_wait(
    capacity: float, taken: float, elapsed: float, amount: float, wait: float
) -> None:
    bucket = TokenBucket(capacity, 60.0, now=100.0)
    bucket.take(taken, 100.0)
    assert bucket.wait_s(amount, 100.0 + elapsed) == pytest.approx(wait)


def test_bucket_ignores_a_clock_that_steps_back() -> None:
    bucket = TokenBucket(60, 60.0, now=100.0)
    bucket.take(60, 100.0)
    assert bucket.level(50.0) == 0.0
    assert bucket.level(101.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0ms"),
        (0.0201, "21ms"),
        (0.9996, "1s"),
        (1.0, "1s"),
        (1.1, "1.1s"),
        (1.5, "1.5s"),
        (59.9996, "1m0s"),
        (60.0, "1m0s"),
        (61.25, "1m1.25s"),
        (119.9996, "2m0s"),
        (360.0, "6m0s"),
    ],
)
def test_duration_is_openais_form(seconds: float, text: str) -> None:
    assert _duration(seconds) == text


def test_requests_per_minute_with_headers_and_retry_after() -> None:
    limiter = KeyRateLimiter(Limits(requests_per_minute=2, tokens_per_minute=None), now=0.0)
    first = limiter.admit(tokens=10, now=0.0)
    assert first == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "30s",
    }
    limiter.admit(tokens=10, now=0.0)
    with pytest.raises(APIError) as refused:
        limiter.admit(tokens=10, now=1.0)
    error = refused.value
    assert error.status == 429 and error.detail.code == "rate_limit_exceeded"
    assert error.detail.type == "requests"
    assert error.headers["Retry-After"] == "29"  # one request refills in 30 s, 1 s has passed
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert limiter.admit(tokens=10, now=30.0)["x-ratelimit-remaining-requests"] == "0"


def test_tokens_and_requests_are_taken_together_or_not_at_all() -> None:
    limiter = KeyRateLimiter(Limits(requests_per_minute=10, tokens_per_minute=100), now=0.0)
    limiter.admit(tokens=90, now=0.0)
    with pytest.raises(APIError) as refused:
        limiter.admit(tokens=20, now=0.0)
    assert refused.value.detail.type == "tokens"
    assert refused.value.headers["Retry-After"] == "6"  # 10 tokens missing at 100/min
    # The refused request took no request unit: 9 remain after the first one.
    headers = limiter.admit(tokens=10, now=0.0)
    assert headers["x-ratelimit-remaining-requests"] == "8"
    assert headers["x-ratelimit-remaining-tokens"] == "0"


def test_request_larger_than_the_minute_allowance_has_no_retry_after() -> None:
    limiter = KeyRateLimiter(Limits(requests_per_minute=None, tokens_per_minute=100), now=0.0)
    with pytest.raises(APIError) as refused:
        limiter.admit(tokens=101, now=0.0)
    assert refused.value.status == 429
    assert "Retry-After" not in refused.value.headers
    assert "101" in refused.value.detail.message and "100" in refused.value.detail.message
