"""Per-key rate limits: token buckets for requests and tokens per minute, as OpenAI enforces them.

Pure logic with the clock passed in (no Ray, no time.time()), so it is tested with fake time.
Each bucket holds up to a minute's allowance and refills continuously; a request takes one unit
of the requests bucket and its token estimate (prompt tokens + max_tokens, as OpenAI counts
against TPM) from the tokens bucket, from both or from neither.

The headers are OpenAI's: x-ratelimit-limit-*, -remaining-* and -reset-* ("time until the limit
resets to its initial state", in Go duration form such as "1s", "6m0s") for requests and tokens,
on every answer, plus Retry-After (whole seconds) on a 429.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deployments.api.errors import APIError, ErrorDetail


class TokenBucket:
    """`capacity` units, refilled at `capacity / period_s` per second, starting full."""

    def __init__(self, capacity: float, period_s: float, now: float) -> None:
        self.capacity = capacity
        self._rate = capacity / period_s
        self._level = capacity
        self._updated = now

    def level(self, now: float) -> float:
        # A clock that steps back (it should not) never drains the bucket.
        elapsed = max(now - self._updated, 0.0)
        self._level = min(self.capacity, self._level + elapsed * self._rate)
        self._updated = max(now, self._updated)
        return self._level

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` units are there (0: now; inf: more than the capacity)."""
        if amount > self.capacity:
            return math.inf
        return max(amount - self.level(now), 0.0) / self._rate

    def take(self, amount: float, now: float) -> None:
        self._level = self.level(now) - amount

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.level(now)) / self._rate


@dataclass(frozen=True)
class Limits:
    requests_per_minute: float | None
    tokens_per_minute: float | None


class KeyRateLimiter:
    """One key's requests and tokens buckets."""

    PERIOD_S = 60.0

    def __init__(self, limits: Limits, now: float) -> None:
        self._buckets = {
            kind: TokenBucket(per_minute, self.PERIOD_S, now)
            for kind, per_minute in (
                ("requests", limits.requests_per_minute),
                ("tokens", limits.tokens_per_minute),
            )
            if per_minute is not None
        }

    def admit(self, tokens: int, now: float) -> dict[str, str]:
        """Take one request and `tokens` tokens, and return the x-ratelimit-* headers; or raise
        a 429 (with the same headers and Retry-After) and take nothing."""
        wanted = {"requests": 1.0, "tokens": float(tokens)}
        waits = {kind: b.wait_s(wanted[kind], now) for kind, b in self._buckets.items()}
        blocked = {kind: w for kind, w in waits.items() if w > 0}
        if not blocked:
            for kind, bucket in self._buckets.items():
                bucket.take(wanted[kind], now)
            return self._headers(now)
        kind, wait = max(blocked.items(), key=lambda item: item[1])
        headers = self._headers(now)
        limit = int(self._buckets[kind].capacity)
        if math.isinf(wait):
            # Larger than a whole minute's allowance: waiting cannot help, so no Retry-After.
            message = (
                f"Request too large: it needs {tokens} tokens (prompt + max_tokens) and this "
                f"key's limit is {limit} tokens per minute. Lower max_tokens or the prompt."
            )
        else:
            headers["Retry-After"] = str(max(math.ceil(wait), 1))
            message = (
                f"Rate limit reached for {kind} per minute (limit {limit}): try again in "
                f"{_duration(wait)}."
            )
        raise APIError(
            429, message, type=kind, param=None, code="rate_limit_exceeded", headers=headers
        )

    def _headers(self, now: float) -> dict[str, str]:
        headers = {}
        for kind, bucket in self._buckets.items():
            headers[f"x-ratelimit-limit-{kind}"] = str(int(bucket.capacity))
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(math.floor(bucket.level(now)), 0))
            headers[f"x-ratelimit-reset-{kind}"] = _duration(bucket.reset_s(now))
        return headers


@dataclass(frozen=True)
class Admission:
    """A shared limiter's answer as it crosses processes: the x-ratelimit-* headers, and the
    429's detail when the request is refused (an APIError does not pickle)."""

    headers: dict[str, str]
    refusal: ErrorDetail | None = None

    @staticmethod
    def of(limiter: KeyRateLimiter, tokens: int, now: float) -> Admission:
        try:
            return Admission(limiter.admit(tokens, now))
        except APIError as exc:
            return Admission(exc.headers, exc.detail)

    def headers_or_429(self) -> dict[str, str]:
        """What KeyRateLimiter.admit would have returned or raised."""
        if self.refusal is None:
            return self.headers
        detail = self.refusal
        raise APIError(
            429, detail.message, type=detail.type, code=detail.code, headers=self.headers
        )


def _duration(seconds: float) -> str:
    """OpenAI's (Go's) duration form: "20ms", "1.5s", "6m0s". Whole milliseconds, rounded up (a
    reset is never announced early) before the split into units, so that 59.9996 s is "1m0s"."""
    # Rounding at the microsecond first drops float noise: 1.1 * 1000 is 1100.0000000000002.
    ms = math.ceil(round(seconds * 1000, 3))
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:g}s"
    return f"{minutes}m{secs}" if minutes else secs
