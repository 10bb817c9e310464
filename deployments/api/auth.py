"""API keys → tenants, and each key's rate limiter (pure: the clock is passed in).

Keys are configured as SHA-256 hashes, so neither the config nor a memory dump of the router holds
one. A presented key is hashed and compared with every configured hash by hmac.compare_digest,
without stopping at the first match, so the time taken tells nothing about how close a guess was.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from deployments.api.errors import APIError
from deployments.api.ratelimit import Admission, KeyRateLimiter, Limits
from deployments.config import AuthConfig


@dataclass(frozen=True)
class Caller:
    """Who sent a request: its tenant, and the limiter of its key (None: unlimited)."""

    tenant: str | None
    limiter: KeyRateLimiter | None
    key_id: str | None = None  # the key's SHA-256 (hex): how a shared limiter knows it


ANONYMOUS = Caller(tenant=None, limiter=None)


class Authenticator:
    def __init__(self, config: AuthConfig, *, share: float, now: float) -> None:
        """`share`: the part of each key's limits this process enforces (1 / router replicas,
        as every replica keeps its own buckets)."""
        self._isolation = config.tenant_isolation
        self._keys = [
            (
                bytes.fromhex(key.sha256),
                Caller(
                    tenant=key.tenant,
                    limiter=_limiter(key.requests_per_minute, key.tokens_per_minute, share, now),
                    key_id=key.sha256,
                ),
            )
            for key in config.api_keys
        ]

    def authenticate(self, headers: Mapping[str, str]) -> Caller:
        """The caller of a request with these headers, or a 401 in OpenAI's shape."""
        if not self._keys:
            return ANONYMOUS
        scheme, _, key = headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise _unauthorized(
                "You didn't provide an API key. Send it in the Authorization header as "
                "`Authorization: Bearer YOUR_KEY`.",
                code=None,
            )
        # Starlette decodes headers as latin-1: encoding back gives the bytes the client sent.
        digest = hashlib.sha256(key.encode("latin-1")).digest()
        found: Caller | None = None
        for stored, caller in self._keys:  # no early exit: constant work per request
            if hmac.compare_digest(digest, stored):
                found = caller
        if found is None:
            # Never echo the key (OpenAI echoes a masked one; logs and proxies see this body).
            raise _unauthorized("Incorrect API key provided.", code="invalid_api_key")
        return found

    def cache_salt(self, caller: Caller) -> str | None:
        """The prefix-cache salt of the caller's requests: its tenant when isolation is on."""
        return caller.tenant if self._isolation else None


class SharedRateLimits:
    """Every key's limits in full, for the one process that all router replicas ask (the
    RateLimits deployment), so that a key's limits hold exactly however traffic spreads."""

    def __init__(self, config: AuthConfig, now: float) -> None:
        self._limiters = {
            key.sha256: limiter
            for key in config.api_keys
            if (limiter := _limiter(key.requests_per_minute, key.tokens_per_minute, 1.0, now))
        }

    def admit(self, key_id: str, tokens: int, now: float) -> Admission:
        limiter = self._limiters.get(key_id)
        if limiter is None:  # an unlimited key (routers do not ask for those)
            return Admission({})
        return Admission.of(limiter, tokens, now)


def _limiter(
    requests_per_minute: int | None, tokens_per_minute: int | None, share: float, now: float
) -> KeyRateLimiter | None:
    if requests_per_minute is None and tokens_per_minute is None:
        return None
    return KeyRateLimiter(
        Limits(
            requests_per_minute=None
            if requests_per_minute is None
            else max(requests_per_minute * share, 1.0),
            tokens_per_minute=None
            if tokens_per_minute is None
            else max(tokens_per_minute * share, 1.0),
        ),
        now,
    )


def _unauthorized(message: str, code: str | None) -> APIError:
    return APIError(
        401,
        message,
        type="invalid_request_error",
        code=code,
        headers={"WWW-Authenticate": "Bearer"},
    )
