"""API keys, tenants and rate limits through the OpenAI app (in process, fake clock)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.api.auth import SharedRateLimits
from deployments.api.ratelimit import Admission
from deployments.config import APIKeyConfig, AuthConfig, RouterConfig
from deployments.engines.base import EngineOutput, EngineRequest
from deployments.engines.simulated import SimulatedEngine
from tests.support import API_MODEL, EngineBackend, simulated_api, simulated_app

ALICE_KEY, BOB_KEY, CAROL_KEY = "sk-alice-1", "sk-bob-1", "sk-carol-1"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


AUTH = AuthConfig(
    api_keys=[
        APIKeyConfig(sha256=sha(ALICE_KEY), tenant="alice"),
        APIKeyConfig(sha256=sha(BOB_KEY), tenant="bob", requests_per_minute=2),
        APIKeyConfig(sha256=sha(CAROL_KEY), tenant="carol", tokens_per_minute=120),
    ]
)


class RecordingBackend(EngineBackend):
    """Remembers every engine request, to see the salt the router gave it."""

    def __init__(self, engine: SimulatedEngine) -> None:
        super().__init__(engine)
        self.requests: list[EngineRequest] = []

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineOutput]]:
        self.requests.append(request)
        async for batch in super().generate(request):
            yield batch


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": API_MODEL,
        "messages": [{"role": "user", "content": "same prompt for everyone " * 20}],
        "max_tokens": 2,
        **extra,
    }


async def test_every_inference_path_needs_a_key(embedded_model: Path) -> None:
    async with simulated_api(embedded_model, RouterConfig(auth=AUTH)) as (http, _):
        calls = [
            ("GET", "/v1/models", None),
            ("GET", f"/v1/models/{API_MODEL}", None),
            ("POST", "/v1/completions", {"model": API_MODEL, "prompt": "hi"}),
            ("POST", "/v1/chat/completions", chat()),
            ("POST", "/v1/chat/completions", chat(stream=True)),
        ]
        for method, path, body in calls:
            for headers, code in [
                ({}, None),
                ({"Authorization": "Basic abc"}, None),
                (bearer("sk-wrong"), "invalid_api_key"),
                (bearer(sha(ALICE_KEY)), "invalid_api_key"),  # the hash is not the key
            ]:
                response = await http.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (path, headers, response.text)
                error = response.json()["error"]
                assert error["code"] == code and error["type"] == "invalid_request_error"
                assert "sk-wrong" not in response.text
                assert response.headers["www-authenticate"] == "Bearer"
            ok = await http.request(method, path, json=body, headers=bearer(ALICE_KEY))
            assert ok.status_code == 200, ok.text
        # Probes need no key.
        assert (await http.get("/health")).status_code == 200


@pytest.mark.parametrize("isolation", [True, False])
async def test_tenant_salts_the_cache_when_isolated(embedded_model: Path, isolation: bool) -> None:
    auth = AUTH.model_copy(update={"tenant_isolation": isolation})
    recorders: list[RecordingBackend] = []

    def record(engine: SimulatedEngine) -> RecordingBackend:
        recorders.append(RecordingBackend(engine))
        return recorders[-1]

    async with simulated_api(embedded_model, RouterConfig(auth=auth), record) as (http, _):
        usages = []
        for key in (ALICE_KEY, ALICE_KEY, BOB_KEY):
            response = await http.post("/v1/chat/completions", json=chat(), headers=bearer(key))
            assert response.status_code == 200, response.text
            usages.append(response.json()["usage"]["prompt_tokens_details"])
    salts = [r.cache_salt for r in recorders[0].requests]
    if isolation:
        assert salts == ["alice", "alice", "bob"]
        # Alice hits her own cache; Bob, with the same prompt, does not hit hers.
        assert usages[1]["cached_tokens"] > 0 and usages[2]["cached_tokens"] == 0
    else:
        assert salts == [None, None, None]
        assert usages[2]["cached_tokens"] > 0


async def test_requests_per_minute_429_and_headers(embedded_model: Path) -> None:
    clock = FakeClock()
    async with simulated_api(embedded_model, RouterConfig(auth=AUTH), clock=clock) as (http, _):
        answers = [
            await http.post("/v1/chat/completions", json=chat(), headers=bearer(BOB_KEY))
            for _ in range(3)
        ]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
        assert answers[0].headers["x-ratelimit-remaining-requests"] == "1"
        refused = answers[2]
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.headers["retry-after"] == "30"
        assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"
        # Streams carry the headers too; Alice has no limits and is never throttled.
        clock.now += 30
        stream = await http.post(
            "/v1/chat/completions", json=chat(stream=True), headers=bearer(BOB_KEY)
        )
        assert stream.status_code == 200 and "x-ratelimit-remaining-requests" in stream.headers
        for _ in range(5):
            alice = await http.post("/v1/chat/completions", json=chat(), headers=bearer(ALICE_KEY))
            assert alice.status_code == 200 and "x-ratelimit-limit-requests" not in alice.headers


async def test_tokens_per_minute_count_prompt_and_max_tokens(embedded_model: Path) -> None:
    clock = FakeClock()
    async with simulated_api(embedded_model, RouterConfig(auth=AUTH), clock=clock) as (http, _):
        small = {"model": API_MODEL, "prompt": [1, 2, 3, 4], "max_tokens": 50}  # 54 tokens
        first = await http.post("/v1/completions", json=small, headers=bearer(CAROL_KEY))
        assert first.headers["x-ratelimit-remaining-tokens"] == "66"
        second = await http.post("/v1/completions", json=small, headers=bearer(CAROL_KEY))
        assert second.headers["x-ratelimit-remaining-tokens"] == "12"
        third = await http.post("/v1/completions", json=small, headers=bearer(CAROL_KEY))
        assert third.status_code == 429 and third.json()["error"]["type"] == "tokens"
        too_big = {**small, "max_tokens": 200}
        never = await http.post("/v1/completions", json=too_big, headers=bearer(CAROL_KEY))
        assert never.status_code == 429 and "retry-after" not in never.headers


def test_config_holds_only_hashes() -> None:
    with pytest.raises(ValidationError):
        APIKeyConfig(sha256="sk-plaintext-key", tenant="x")
    with pytest.raises(ValidationError):
        AuthConfig(
            api_keys=[
                APIKeyConfig(sha256=sha("k"), tenant="a"),
                APIKeyConfig(sha256=sha("k"), tenant="b"),
            ]
        )


class InProcessLimiter:
    """The RateLimits deployment's logic (deployments/rate_limits.py) without Serve; `down`
    makes it fail (raise) or hang, as an unreachable replica would."""

    def __init__(self, auth: AuthConfig, clock: FakeClock, down: str | None = None) -> None:
        self._limits = SharedRateLimits(auth, clock())
        self._clock = clock
        self.down = down
        self.calls = 0

    async def admit(self, key_id: str, tokens: int) -> Admission:
        self.calls += 1
        if self.down == "fails":
            raise ConnectionError("RateLimits replica unreachable")
        if self.down == "hangs":
            await asyncio.Event().wait()
        return self._limits.admit(key_id, tokens, self._clock())


async def statuses_across_two_routers(
    embedded_model: Path, limiter: InProcessLimiter, clock: FakeClock, count: int
) -> list[int]:
    """`count` of Bob's requests (2 per minute), all through the first of 2 router replicas,
    then one through the second."""
    router = RouterConfig(auth=AUTH, num_replicas=2)
    async with (
        simulated_app(embedded_model, router, clock=clock, shared_limiter=limiter) as (a, _, _),
        simulated_app(embedded_model, router, clock=clock, shared_limiter=limiter) as (b, _, _),
    ):
        answers = [
            await a.post("/v1/chat/completions", json=chat(), headers=bearer(BOB_KEY))
            for _ in range(count)
        ]
        answers.append(await b.post("/v1/chat/completions", json=chat(), headers=bearer(BOB_KEY)))
    return [answer.status_code for answer in answers]


async def test_a_shared_limiter_holds_a_key_to_its_limits_across_router_replicas(
    embedded_model: Path,
) -> None:
    # With each router's own buckets, 2 replicas give Bob 1 request each per minute: the first
    # router would refuse his second request although he is within his limit.
    clock = FakeClock()
    limiter = InProcessLimiter(AUTH, clock)
    statuses = await statuses_across_two_routers(embedded_model, limiter, clock, count=2)
    assert statuses == [200, 200, 429]
    assert limiter.calls == 3


@pytest.mark.parametrize("down", ["fails", "hangs"])
async def test_without_the_shared_limiter_each_router_enforces_its_share(
    embedded_model: Path, down: str
) -> None:
    clock = FakeClock()
    limiter = InProcessLimiter(AUTH, clock, down=down)
    statuses = await statuses_across_two_routers(embedded_model, limiter, clock, count=2)
    assert statuses == [200, 429, 200]  # 1 per minute on each of the 2 routers
