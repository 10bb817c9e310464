"""Router: the Serve ingress deployment that serves the OpenAI API for every model.

The API itself is `OpenAIApp` (Ray-free); this file only adapts LLMServer deployment handles to
its `ModelBackend` protocol and hands the app to Serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
from ray.experimental import internal_kv
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.api.openai_app import OpenAIApp, OverloadedError, UnavailableError
from deployments.autoscaling import KV_NAMESPACE
from deployments.config import AppConfig
from deployments.engines.base import EngineOutput, EngineRequest, EngineStats
from deployments.observability.metrics import RouterMetrics
from deployments.observability.middleware import ObservedApp
from deployments.observability.tracing import tracer, tracer_provider
from deployments.rate_limits import ServeSharedLimiter
from deployments.routing.first_outputs import first_output_seen

logger = logging.getLogger("ray.serve")

# The cluster drains (SIGTERM on `inference-cluster serve`) once this internal-KV key exists;
# every router replica reads it every DRAIN_POLL_S. A key rather than a new user_config: without
# a fixed code version, Serve redeploys (restarts) every replica of an app run again.
DRAIN_KEY = "router:draining"
DRAIN_POLL_S = 0.5

# What a handle raises when the replica died under a request or none can take it right now:
# retryable (the app retries before the first output, else answers 503).
_UNAVAILABLE = (
    RayActorError,
    WorkerCrashedError,
    NodeDiedError,
    ObjectLostError,
    DeploymentUnavailableError,
)


class ServeBackend:
    """A model's LLMServer replicas, reached through a Serve deployment handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle
        self._streaming = handle.options(stream=True)

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineOutput]]:
        responses = self._streaming.generate.remote(request)
        finished = started = False
        try:
            async for batch in responses:
                if not started:
                    started = True
                    first_output_seen(request.request_id)
                yield batch
            finished = True
        except BackPressureError as exc:
            raise OverloadedError(exc.message) from exc
        except _UNAVAILABLE as exc:
            raise UnavailableError(str(exc)) from exc
        finally:
            if not finished:
                # Cancels the replica's generator, whose cleanup aborts the engine request.
                # On Ray 2.60, cancel() re-raises the error of a request that failed to be
                # assigned (it fetches the assignment's result): that error is already being
                # handled, and letting cancel() raise it again replaced our OpenAI-shaped 503
                # with Serve's plain-text one (found by tests/chaos/test_overload.py).
                with contextlib.suppress(Exception):
                    responses.cancel()

    async def stats(self) -> EngineStats:
        try:
            return await self._handle.stats.remote()
        except (BackPressureError, *_UNAVAILABLE) as exc:
            raise UnavailableError(str(exc)) from exc


@serve.ingress()
class Router:
    def __init__(
        self,
        config: AppConfig,
        llm_servers: dict[str, DeploymentHandle],
        rate_limits: DeploymentHandle | None = None,
    ) -> None:
        self._api = OpenAIApp(
            config,
            {name: ServeBackend(handle) for name, handle in llm_servers.items()},
            shared_limiter=ServeSharedLimiter(rate_limits) if rate_limits is not None else None,
        )
        observability = config.observability
        self._app = ObservedApp(
            self._api.app,
            tracer(tracer_provider(observability.tracing, "router")),
            RouterMetrics(),
            observability.access_log,
        )
        # Serve constructs replicas on their event loop; the task lives as long as the replica.
        self._drain_watch = asyncio.get_running_loop().create_task(self._watch_drain())

    async def _watch_drain(self) -> None:
        while True:
            try:
                draining = await asyncio.to_thread(
                    internal_kv._internal_kv_exists, DRAIN_KEY, namespace=KV_NAMESPACE
                )
            except RuntimeError:  # the replica is stopping: its thread pool is shut down
                return
            except Exception:  # the GCS restarting: keep serving, read again
                logger.warning("could not read the drain flag", exc_info=True)
                draining = False
            if draining:
                logger.info("draining: new requests get 503, in-flight ones finish")
                self._api.start_draining()
                return
            await asyncio.sleep(DRAIN_POLL_S)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app
