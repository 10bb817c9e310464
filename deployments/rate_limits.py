"""RateLimits: the one Serve replica every router replica asks about each limited request, so a
key's limits hold exactly across router replicas however the proxy spreads the traffic.

Deployed only when some key has a limit and the router has several (or autoscaled) replicas
(auth.shared_limits). A router that gets no answer within auth.shared_limits_timeout_s enforces
its own 1/num_replicas share of the key's limits for that request (deployments/api/openai_app.py).
Serve restarts a dead replica; its buckets start full again (a restart forgives, never blocks).
"""

from __future__ import annotations

import time

from ray.serve.handle import DeploymentHandle

from deployments.api.auth import SharedRateLimits
from deployments.api.ratelimit import Admission
from deployments.config import AuthConfig


class RateLimits:
    def __init__(self, auth: AuthConfig) -> None:
        self._limits = SharedRateLimits(auth, now=time.monotonic())

    async def admit(self, key_id: str, tokens: int) -> Admission:
        return self._limits.admit(key_id, tokens, time.monotonic())


class ServeSharedLimiter:
    """The router's side: OpenAIApp's SharedLimiter over the RateLimits deployment handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def admit(self, key_id: str, tokens: int) -> Admission:
        return await self._handle.admit.remote(key_id, tokens)
