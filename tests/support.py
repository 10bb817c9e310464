"""Helpers shared by the test suites."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from opentelemetry import trace
from ray import serve

from cluster import ingress, runtime
from cluster.config import IngressConfig
from deployments.api.openai_app import ModelBackend, OpenAIApp, SharedLimiter
from deployments.config import AppConfig, ModelConfig, RouterConfig
from deployments.engines.base import Engine, EngineOutput, EngineRequest, EngineStats
from deployments.engines.profiles import ZERO_LATENCY
from deployments.engines.simulated import SimulatedEngine
from deployments.observability.config import AccessLogConfig
from deployments.observability.middleware import ObservedApp
from deployments.observability.record import RequestRecord
from deployments.tokenizer import PromptTokenizer


@contextmanager
def ingress_environment(config: IngressConfig | None = None) -> Iterator[None]:
    """The environment a local Ray started in this block serves HTTP with: HAProxy in front of
    the routers by default, as `serve` runs it (cluster/ingress.py), on free ports and in a
    folder of its own (stop that Ray with runtime.stop_ray, which removes the folder). Ray's
    processes read it when they start, so it is only needed around ray.init."""
    config = config or IngressConfig()
    with pytest.MonkeyPatch.context() as env:
        for name, value in ingress.ray_env(config).items():
            env.setenv(name, value)
        if config.haproxy:
            for name, value in runtime.local_haproxy_env().items():
                env.setenv(name, value)
        yield


ALERTS_FILE = Path(__file__).parents[1] / "k8s" / "base" / "alerts.yaml"


def alert_rules_file(folder: Path) -> Path:
    """The alert rules of k8s/base/alerts.yaml as a Prometheus rule file in `folder` (the
    PrometheusRule's spec is one as it stands)."""
    rules = folder / "rules.yml"
    rules.write_text(yaml.safe_dump(yaml.safe_load(ALERTS_FILE.read_text())["spec"]))
    return rules


@asynccontextmanager
async def observed_client(
    app: Any, router_tracer: trace.Tracer, access_log: AccessLogConfig
) -> AsyncIterator[tuple[httpx.AsyncClient, list[RequestRecord]]]:
    """A client of the ASGI `app` behind the router's observing middleware, and the records of
    the requests it finished (what the metrics sink gets)."""
    finished: list[RequestRecord] = []

    class Sink:
        def request_finished(self, record: RequestRecord) -> None:
            finished.append(record)

    transport = httpx.ASGITransport(app=ObservedApp(app, router_tracer, Sink(), access_log))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http, finished


API_MODEL = "tiny"
API_MAX_MODEL_LEN = 1024
CHAT, CMPL = "/v1/chat/completions", "/v1/completions"


def asgi_post_scope(path: str) -> dict[str, Any]:
    """The ASGI scope of a JSON POST to `path`, for tests that drive `receive` themselves (a
    body that stalls, a client that leaves)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }


def chat(content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    """A chat request for the API model: one user message, then `extra` (which may replace it)."""
    return {"model": API_MODEL, "messages": [{"role": "user", "content": content}], **extra}


def cmpl(prompt: Any = "Hello", **extra: Any) -> dict[str, Any]:
    """A completions request for the API model."""
    return {"model": API_MODEL, "prompt": prompt, **extra}


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    """The response is an error in OpenAI's shape with this status (and `param`); its message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    return str(error["message"])


class EngineBackend:
    """A ModelBackend over an in-process engine: the API without Ray."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineOutput]]:
        # Closing the engine's stream when this one closes early is what aborts the request.
        async with aclosing(self.engine.generate(request)) as outputs:
            async for output in outputs:
                yield [output]

    async def stats(self) -> EngineStats:
        await self.engine.check_health()
        return self.engine.stats()


def parse_sse(body: str) -> tuple[list[dict], bool]:
    """The JSON events of an SSE body, and whether it ended with [DONE]."""
    events = [line.removeprefix("data: ") for line in body.split("\n\n") if line.strip()]
    done = bool(events) and events[-1] == "[DONE]"
    return [json.loads(e) for e in events if e != "[DONE]"], done


@asynccontextmanager
async def simulated_api(
    model_path: Path,
    router: RouterConfig,
    backend: Callable[[SimulatedEngine], ModelBackend] = EngineBackend,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[tuple[httpx.AsyncClient, SimulatedEngine]]:
    """The OpenAI app over one zero-latency simulated engine (model `tiny`), in process.

    `backend` wraps the engine (to record or inject faults); the teardown checks that no request
    outlived its response.
    """
    async with simulated_app(model_path, router, backend, clock) as (http, engine, _):
        yield http, engine


@asynccontextmanager
async def simulated_app(
    model_path: Path,
    router: RouterConfig,
    backend: Callable[[SimulatedEngine], ModelBackend] = EngineBackend,
    clock: Callable[[], float] = time.monotonic,
    shared_limiter: SharedLimiter | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, SimulatedEngine, OpenAIApp]]:
    """simulated_api, with the app itself (to drive it as the Serve adapter does) and the
    shared rate limiter of a router replica."""
    tokenizer = PromptTokenizer(str(model_path))
    engine = SimulatedEngine(
        ZERO_LATENCY, seed=1, detokenize=tokenizer.decode, vocab_size=tokenizer.vocab_size
    )
    await engine.start()
    config = AppConfig(
        router=router,
        models=[
            ModelConfig(
                name=API_MODEL,
                engine="simulated",
                source=str(model_path),
                device="cpu",
                max_model_len=API_MAX_MODEL_LEN,
            )
        ],
    )
    api = OpenAIApp(
        config, {API_MODEL: backend(engine)}, clock=clock, shared_limiter=shared_limiter
    )
    transport = httpx.ASGITransport(app=api.app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http, engine, api
        stats = engine.stats()
        # No request may outlive its response (leak check at teardown).
        assert stats.num_running == 0 and stats.num_waiting == 0, stats
    finally:
        await engine.shutdown()


# ---- an autoscaled deployment under load (tests/integration and tests/e2e) ---------------------


def running_replicas(deployment: str) -> int:
    """The deployment's replicas Serve reports RUNNING."""
    app = serve.status().applications[runtime.APP_NAME]
    states = app.deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


async def watch_replicas(deployment: str, seconds: float, until: int | None = None) -> list[int]:
    """Running replicas every 0.5 s for `seconds` (or until the count is `until`)."""
    counts: list[int] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        counts.append(await asyncio.to_thread(running_replicas, deployment))
        if until is not None and counts[-1] == until:
            break
        await asyncio.sleep(0.5)
    return counts


def print_decisions(deployment: str, decisions: list[dict], since: float) -> None:
    """The autoscaler's decisions for `deployment`, timed from `since` (for `pytest -s`)."""
    for d in decisions:
        change = f"{d['previous']} -> {d['target']}: {d['reason']}"
        print(f"{deployment} {d['time_s'] - since:+7.1f} s  {change}")


@dataclass
class ClosedLoopUsers:
    """Users that each stream a completion through the real `openai` client and send the next
    one as soon as it ends. Only the first `users` of the started tasks send; change it (and
    `max_tokens`) to step the load. Every stream must end with exactly `max_tokens` tokens
    (`ignore_eos`) and finish_reason "length": anything else is a failure, so a request dropped
    or cut by a scale-down shows."""

    base_url: str
    model: str
    users: int = 0
    max_tokens: int = 150
    completed: int = 0
    failures: list[str] = field(default_factory=list)

    async def user(self, index: int, stop: asyncio.Event) -> None:
        client = openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=300
        )
        async with client:
            while not stop.is_set():
                if index >= self.users:
                    await asyncio.sleep(0.05)
                    continue
                await self._one_request(client, index)

    async def _one_request(self, client: openai.AsyncOpenAI, index: int) -> None:
        max_tokens = self.max_tokens
        finish, usage = None, None
        try:
            stream = await client.completions.create(
                model=self.model,
                prompt=f"user {index}",
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            async for chunk in stream:
                finish = next((c.finish_reason for c in chunk.choices if c.finish_reason), finish)
                usage = chunk.usage or usage
        except openai.APIError as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}"[:300])
            return
        if finish != "length" or usage is None or usage.completion_tokens != max_tokens:
            self.failures.append(f"cut short: finish_reason {finish}, usage {usage}")
        else:
            self.completed += 1
