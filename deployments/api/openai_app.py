"""The OpenAI HTTP API as a FastAPI app over model backends.

Kept free of Ray: the Serve Router deployment hands it backends that call LLMServer handles, and
the unit tests hand it backends that call an engine in-process. The flow per request:
parse (bounded body) -> validate -> tokenize -> context check -> backend.generate -> JSON or SSE.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from deployments.api import chat, sse
from deployments.api.auth import Authenticator, Caller
from deployments.api.errors import (
    APIError,
    bad_request,
    body_timeout,
    client_closed_request,
    from_validation_error,
    internal_error,
    model_not_found,
    request_timeout,
    service_unavailable,
    too_large,
)
from deployments.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    Usage,
    make_usage,
)
from deployments.api.ratelimit import Admission, KeyRateLimiter
from deployments.config import AppConfig, ModelConfig
from deployments.engines.base import (
    EngineDeadError,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    SamplingParams,
    TokenLogprob,
)
from deployments.observability.middleware import (
    observe_engine_call,
    observe_model,
    observe_outputs,
    observe_stream_error,
    observe_tenant,
)
from deployments.tokenizer import PromptTokenizer

logger = logging.getLogger("ray.serve")

# Retry-After of a request that waited out a cold start: a replica is on its way by then.
_COLD_START_RETRY_AFTER_S = 10

# Tokenizing a long prompt takes milliseconds; off the event loop it cannot stall other requests.
_TOKENIZE_INLINE_MAX_CHARS = 4096


class ModelBackend(Protocol):
    """How the API reaches a model's replicas."""

    def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineOutput]]: ...

    async def stats(self) -> EngineStats:
        """Stats of one healthy replica; raises when none answers."""


class SharedLimiter(Protocol):
    """The rate limiter every router replica asks (deployments/rate_limits.py)."""

    async def admit(self, key_id: str, tokens: int) -> Admission: ...


class UnavailableError(RuntimeError):
    """The replica died or no replica could take the request (dead, draining or none yet):
    retried before the first output, else a 503."""


class OverloadedError(RuntimeError):
    """The model's queue is full (Serve's backpressure): a 503 with Retry-After, not retried
    here (the client's back-off is what relieves the queue)."""


# A failure before the first output of an attempt: the request is re-sent after this pause
# (doubling per attempt), as long as the deadline allows.
_RETRY_BACKOFF_S = 0.1


@dataclass
class ServedModel:
    config: ModelConfig
    tokenizer: PromptTokenizer
    backend: ModelBackend
    created: int = field(default_factory=lambda: int(time.time()))
    # Whether the chat template handles the developer role (deployments/api/chat.py).
    developer_role: bool = field(init=False)
    # When a request's first output last came (the event loop's clock); None: never here.
    last_output_s: float | None = None

    def __post_init__(self) -> None:
        self.developer_role = chat.supports_developer_role(self.tokenizer.chat_template)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None


class _Accumulator:
    """Collects a request's outputs: per-choice text and counts, and the usage."""

    def __init__(self, n: int) -> None:
        self.choices = [_Choice() for _ in range(n)]
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def add(self, output: EngineOutput) -> None:
        choice = self.choices[output.index]
        choice.text.append(output.text)
        choice.num_tokens += len(output.token_ids)
        if output.logprobs:
            choice.logprobs.extend(output.logprobs)
        if output.finish_reason is not None:
            choice.finish_reason = output.finish_reason
        self.prompt_tokens = max(self.prompt_tokens, output.num_prompt_tokens)
        self.cached_tokens = max(self.cached_tokens, output.num_cached_tokens)

    def usage(self) -> Usage:
        completion = sum(c.num_tokens for c in self.choices)
        return make_usage(self.prompt_tokens, completion, self.cached_tokens)


def completion_logprobs(
    items: Sequence[TokenLogprob], offset: int
) -> tuple[CompletionLogprobs, int]:
    """The completions logprobs of `items`, the first at text offset `offset`, and the offset
    after the last. Offsets count the tokens' own text, which the output text can lag: a token
    that ends inside a UTF-8 character shows up in the text only with the next one."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    logprobs = CompletionLogprobs(
        tokens=[i.token for i in items],
        token_logprobs=[i.logprob for i in items],
        top_logprobs=[{tok: lp for _, tok, lp in i.top} for i in items],
        text_offset=offsets,
    )
    return logprobs, offset


def chat_logprobs(items: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=i.token,
                logprob=i.logprob,
                bytes=list(i.token.encode()),
                top_logprobs=[
                    TopLogprob(token=tok, logprob=lp, bytes=list(tok.encode()))
                    for _, tok, lp in i.top
                ],
            )
            for i in items
        ]
    )


Parsed = TypeVar("Parsed", bound=BaseModel)


def _surely_up(served: ServedModel, now: float) -> bool:
    """A replica of the model ran within its idle period: it cannot have gone to zero since (the
    period restarts with every request), so a request that waits is queued behind busy
    replicas, under the request deadline, not held for a cold start (whose shorter bound sent
    503s "starting from zero" for a burst on a warm model)."""
    idle_s = served.config.autoscaling.scale_to_zero_idle_s
    return served.last_output_s is not None and now - served.last_output_s < idle_s


class OpenAIApp:
    """Builds the FastAPI app; `self.app` is what Serve (or httpx's ASGI transport in tests) runs.

    X-Request-Id is Serve's: its proxy accepts the client's or generates one, and echoes it.
    """

    def __init__(
        self,
        config: AppConfig,
        backends: Mapping[str, ModelBackend],
        clock: Callable[[], float] = time.monotonic,
        shared_limiter: SharedLimiter | None = None,
    ) -> None:
        self._config = config.router
        self._clock = clock
        self._shared_limiter = shared_limiter
        self._shared_limiter_failing = False
        # This replica's own buckets at its share of every limit: what it enforces without a
        # shared limiter, or while that one does not answer.
        self._auth = Authenticator(
            config.router.auth, share=1 / config.router.num_replicas, now=clock()
        )
        self._models = {
            m.name: ServedModel(m, PromptTokenizer(m.tokenizer_source), backends[m.name])
            for m in config.models
        }
        self.app = FastAPI(title="inference-cluster", docs_url=None, redoc_url=None)
        self.app.add_exception_handler(APIError, self._api_error)  # type: ignore[arg-type]
        self.app.add_exception_handler(HTTPException, self._http_error)  # type: ignore[arg-type]
        self.app.add_exception_handler(Exception, self._unexpected_error)
        self.app.add_api_route("/health", self.health, methods=["GET"])
        self.app.add_api_route("/v1/models", self.list_models, methods=["GET"])
        self.app.add_api_route("/v1/models/{model:path}", self.get_model, methods=["GET"])
        self.app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        self.app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        self.app.router.default = self._not_found  # type: ignore[assignment]
        self._draining = False

    def start_draining(self) -> None:
        """The cluster is shutting down: from now on new completions get a 503 with Retry-After
        (a restarted or another cluster takes them) and /health says draining, while the
        requests already in flight finish."""
        self._draining = True

    def _refuse_if_draining(self) -> None:
        if self._draining:
            raise service_unavailable(
                "The server is shutting down and takes no new requests; retry later.",
                self._config.drain_retry_after_s,
                code="draining",
            )

    # ---- endpoints ------------------------------------------------------------------------------

    async def health(self) -> Response:
        if self._draining:  # a load balancer's readiness probe: send no more traffic here
            error = service_unavailable(
                "draining: the server is shutting down",
                self._config.drain_retry_after_s,
                "draining",
            )
            return JSONResponse(error.body(), error.status, headers=error.headers)

        timeout_s = self._config.health_check_timeout_s

        async def check(served: ServedModel) -> str | None:
            # Each call reaches one replica: a model is healthy when some replica answers, so a
            # dead one (until Serve replaces it) gets a few more tries to find a live one. The
            # tries share one budget: a hung replica costs the probe timeout_s, not a multiple.
            problem = None
            try:
                async with asyncio.timeout(timeout_s):
                    for _ in range(self._config.retry_attempts):
                        try:
                            await served.backend.stats()
                            return None
                        except Exception as exc:
                            problem = f"{type(exc).__name__}: {exc}"[:300]
            except TimeoutError:
                problem = f"no replica answered within {timeout_s:g} s" + (
                    f" (earlier: {problem})" if problem else ""
                )
            return problem

        names = list(self._models)
        problems = await asyncio.gather(*(check(self._models[n]) for n in names))
        unhealthy = {n: p for n, p in zip(names, problems, strict=True) if p is not None}
        if unhealthy:
            error = service_unavailable(f"models without a healthy replica: {unhealthy}", 5)
            return JSONResponse(error.body(), error.status, headers=error.headers)
        return JSONResponse({"status": "ok", "models": names})

    async def list_models(self, request: Request) -> ModelList:
        self._auth.authenticate(request.headers)
        return ModelList(data=[self._card(m) for m in self._models.values()])

    async def get_model(self, request: Request, model: str) -> ModelCard:
        self._auth.authenticate(request.headers)
        return self._card(self._served(model))

    async def completions(self, request: Request) -> Response:
        self._refuse_if_draining()
        caller = self._auth.authenticate(request.headers)
        body = await self._parse(request, CompletionRequest)
        served = self._served_for(body)
        if isinstance(body.prompt, str):
            prompt_ids = await _off_loop_if_long(
                served.tokenizer.encode_text, body.prompt, len(body.prompt)
            )
        else:
            prompt_ids = list(body.prompt)
            _check_token_ids(prompt_ids, served.tokenizer.vocab_size, "prompt")
        max_tokens = body.max_tokens or 16
        _check_context(served.config, len(prompt_ids), max_tokens, "prompt")
        _check_min_tokens(body.min_tokens, max_tokens, "max_tokens")
        engine_request, headers = await self._admit(
            caller, "cmpl", prompt_ids, body.sampling_params(max_tokens, body.logprobs)
        )
        outputs = self._generate(served, engine_request)
        if body.stream:
            return await self._stream(
                outputs, self._completion_chunks(body, engine_request.request_id, outputs), headers
            )
        acc = await self._collect(outputs, body.n)
        offset_logprobs = body.logprobs is not None
        return _json(
            CompletionResponse(
                id=engine_request.request_id,
                model=body.model,
                choices=[
                    CompletionChoice(
                        index=i,
                        text="".join(c.text),
                        logprobs=completion_logprobs(c.logprobs, 0)[0] if offset_logprobs else None,
                        finish_reason=c.finish_reason,
                    )
                    for i, c in enumerate(acc.choices)
                ],
                usage=acc.usage(),
            ),
            headers,
        )

    async def chat_completions(self, request: Request) -> Response:
        self._refuse_if_draining()
        caller = self._auth.authenticate(request.headers)
        body = await self._parse(request, ChatCompletionRequest)
        served = self._served_for(body)
        messages = chat.conversation(body.messages, served.developer_role)
        size = sum(len(m["content"]) for m in messages)
        prompt_ids = await _off_loop_if_long(served.tokenizer.encode_chat, messages, size)
        max_tokens = body.requested_max_tokens
        if max_tokens is None:
            # Like vLLM: without a limit, generate until the context is full.
            max_tokens = max(served.config.max_model_len - len(prompt_ids), 1)
        _check_context(
            served.config, len(prompt_ids), max_tokens, "messages", body.max_tokens_param
        )
        _check_min_tokens(body.min_tokens, max_tokens, body.max_tokens_param)
        engine_request, headers = await self._admit(
            caller, "chatcmpl", prompt_ids, body.sampling_params(max_tokens, body.engine_logprobs)
        )
        outputs = self._generate(served, engine_request)
        if body.stream:
            return await self._stream(
                outputs, self._chat_chunks(body, engine_request.request_id, outputs), headers
            )
        acc = await self._collect(outputs, body.n)
        return _json(
            ChatCompletionResponse(
                id=engine_request.request_id,
                model=body.model,
                choices=[
                    ChatChoice(
                        index=i,
                        message=AssistantMessage(content="".join(c.text)),
                        logprobs=chat_logprobs(c.logprobs) if body.logprobs else None,
                        finish_reason=c.finish_reason,
                    )
                    for i, c in enumerate(acc.choices)
                ],
                usage=acc.usage(),
            ),
            headers,
        )

    # ---- request path ---------------------------------------------------------------------------

    async def _parse(self, request: Request, model: type[Parsed]) -> Parsed:
        _check_content_type(request.headers.get("content-type"))
        limit = self._config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large(limit)
        chunks: list[bytes] = []
        size = 0
        deadline_s = self._config.request_timeout_s
        try:
            # The upload has the request's deadline too: a stalled one held a router slot.
            async with asyncio.timeout(deadline_s):
                async for chunk in request.stream():  # bounded: never more than the limit
                    size += len(chunk)
                    if size > limit:
                        raise too_large(limit)
                    chunks.append(chunk)
        except ClientDisconnect:
            raise client_closed_request() from None
        except TimeoutError:
            raise body_timeout(deadline_s) from None
        data = parse_json_object(b"".join(chunks), self._config.limits.max_json_depth)
        try:
            return model.model_validate(data, context=self._config.limits)
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    async def _admit(
        self, caller: Caller, prefix: str, prompt_ids: list[int], sampling: SamplingParams
    ) -> tuple[EngineRequest, dict[str, str]]:
        """The engine request of a valid API request, once the caller's rate limits allow it
        (else a 429), and the x-ratelimit-* headers of its answer."""
        observe_tenant(caller.tenant)
        headers: dict[str, str] = {}
        if caller.limiter is not None:
            # OpenAI counts the prompt plus every choice's max_tokens against tokens per minute.
            tokens = len(prompt_ids) + sampling.max_tokens * sampling.n
            headers = await self._rate_limit(caller, caller.limiter, tokens)
        request = EngineRequest(
            request_id=f"{prefix}-{uuid.uuid4().hex}",
            prompt_token_ids=tuple(prompt_ids),
            sampling=sampling,
            cache_salt=self._auth.cache_salt(caller),
        )
        return request, headers

    async def _rate_limit(
        self, caller: Caller, local: KeyRateLimiter, tokens: int
    ) -> dict[str, str]:
        """The caller's limits across every router replica, through the shared limiter; when
        there is none, or it does not answer in time, this replica's own share of them."""
        if self._shared_limiter is not None and caller.key_id is not None:
            try:
                async with asyncio.timeout(self._config.auth.shared_limits_timeout_s):
                    admission = await self._shared_limiter.admit(caller.key_id, tokens)
            except Exception as exc:
                if not self._shared_limiter_failing:  # once per outage, not per request
                    logger.warning(
                        "shared rate limiter unavailable (%s): enforcing this router's share",
                        type(exc).__name__,
                    )
                self._shared_limiter_failing = True
            else:
                self._shared_limiter_failing = False
                return admission.headers_or_429()
        return local.admit(tokens, self._clock())

    def _served_for(self, body: CompletionRequest | ChatCompletionRequest) -> ServedModel:
        """The requested model, once the request's model-specific fields fit it."""
        served = self._served(body.model)
        vocab_size = served.tokenizer.vocab_size
        _check_token_ids(body.stop_token_ids or (), vocab_size, "stop_token_ids")
        _check_token_ids(body.allowed_token_ids or (), vocab_size, "allowed_token_ids")
        return served

    def _served(self, model: str) -> ServedModel:
        served = self._models.get(model)
        if served is None:
            raise model_not_found(model)
        observe_model(model)
        return served

    async def _generate(
        self, served: ServedModel, request: EngineRequest
    ) -> AsyncIterator[list[EngineOutput]]:
        """The backend stream under the request deadline, with backend failures as APIErrors.

        A replica or engine that dies before the request's first output costs nothing but time:
        the request goes out again (router.retry_attempts in all). The deadline applies only
        while waiting on the backend, never while the client reads what it was given.
        """
        request = observe_engine_call(served.config.name, request)
        timeout_s = self._config.request_timeout_s
        now = asyncio.get_running_loop().time()
        deadline = now + timeout_s
        # A model that scales to zero may have no replica: the request waits at the handle
        # (Serve's bounded queue) for its first output at most cold_start_timeout_s, then gets
        # a 503 with Retry-After instead of hanging until the request deadline.
        scaling = served.config.autoscaling
        hold_until = deadline
        if scaling.enabled and not scaling.min_replicas and not _surely_up(served, now):
            hold_until = min(deadline, now + scaling.cold_start_timeout_s)
        for attempt in range(1, self._config.retry_attempts + 1):
            stream = served.backend.generate(request)
            started = False
            try:
                while True:
                    if not started and hold_until < deadline:
                        batch = await self._first_output(served, stream, hold_until)
                    else:
                        async with asyncio.timeout_at(deadline):
                            batch = await anext(stream, None)
                    if batch is None:
                        return
                    if not started:
                        served.last_output_s = asyncio.get_running_loop().time()
                    started = True
                    observe_outputs(batch)
                    yield batch
            except TimeoutError:
                raise request_timeout(timeout_s) from None
            except OverloadedError as exc:
                message = f"model {served.config.name!r} is overloaded: {exc}"
                raise service_unavailable(
                    message, self._config.overload_retry_after_s, code="overloaded"
                ) from exc
            except (UnavailableError, EngineDeadError) as exc:
                if started or attempt == self._config.retry_attempts:
                    # Ray's errors carry remote tracebacks: the client gets the kind only.
                    logger.warning("request %s failed: %s", request.request_id, exc)
                    cause = type(exc.__cause__ or exc).__name__
                    message = f"model {served.config.name!r} is unavailable ({cause})"
                    raise service_unavailable(message) from exc
                logger.warning(
                    "request %s: attempt %d failed before its first output (%s); retrying",
                    request.request_id,
                    attempt,
                    type(exc).__name__,
                )
            finally:
                # Closing the backend stream aborts the engine request when it has not finished
                # (client gone, deadline, error): nothing keeps running for nobody.
                await stream.aclose()  # type: ignore[attr-defined]
            pause = min(
                _RETRY_BACKOFF_S * 2 ** (attempt - 1), deadline - asyncio.get_running_loop().time()
            )
            if pause <= 0:
                raise request_timeout(timeout_s)
            await asyncio.sleep(pause)

    async def _first_output(
        self, served: ServedModel, stream: AsyncIterator[list[EngineOutput]], until: float
    ) -> list[EngineOutput] | None:
        try:
            async with asyncio.timeout_at(until):
                return await anext(stream, None)
        except TimeoutError:
            hold_s = served.config.autoscaling.cold_start_timeout_s
            message = (
                f"model {served.config.name!r} has no replica ready after {hold_s:g} s "
                "(it is starting from zero); retry later"
            )
            raise service_unavailable(message, _COLD_START_RETRY_AFTER_S) from None

    async def _collect(self, outputs: AsyncIterator[list[EngineOutput]], n: int) -> _Accumulator:
        acc = _Accumulator(n)
        async for batch in outputs:
            for output in batch:
                acc.add(output)
        if any(c.finish_reason is None for c in acc.choices):
            raise internal_error("The engine stream ended before every choice finished.")
        return acc

    async def _stream(
        self,
        outputs: AsyncIterator[list[EngineOutput]],
        chunks: AsyncIterator[bytes],
        headers: Mapping[str, str],
    ) -> Response:
        """Start streaming only once the first chunk exists, so that a failure before the first
        token is still a plain HTTP error with the right status, not a 200 with an error event."""
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            raise internal_error("The engine produced no output.") from None

        async def body() -> AsyncIterator[bytes]:
            yield first
            try:
                async for chunk in chunks:
                    yield chunk
            except APIError as exc:
                observe_stream_error(exc.status)
                yield sse.event(exc.body())
                return
            except Exception:
                logger.exception("stream failed after its first byte")
                error = internal_error()
                observe_stream_error(error.status)
                yield sse.event(error.body())
                return
            yield sse.DONE

        return StreamingResponse(body(), media_type=sse.MEDIA_TYPE, headers=headers)

    async def _completion_chunks(
        self,
        body: CompletionRequest,
        request_id: str,
        outputs: AsyncIterator[list[EngineOutput]],
    ) -> AsyncIterator[bytes]:
        created = int(time.time())
        acc = _Accumulator(body.n)
        offsets = [0] * body.n
        async for batch in outputs:
            events = []
            for output in batch:
                acc.add(output)
                logprobs = None
                if body.logprobs is not None and output.logprobs is not None:
                    logprobs, offsets[output.index] = completion_logprobs(
                        output.logprobs, offsets[output.index]
                    )
                events.append(
                    CompletionResponse(
                        id=request_id,
                        created=created,
                        model=body.model,
                        choices=[
                            CompletionChoice(
                                index=output.index,
                                text=output.text,
                                logprobs=logprobs,
                                finish_reason=output.finish_reason,
                            )
                        ],
                    )
                )
            yield sse.events(events)
        if body.include_usage_chunk:
            yield sse.event(
                CompletionResponse(
                    id=request_id, created=created, model=body.model, choices=[], usage=acc.usage()
                )
            )

    async def _chat_chunks(
        self,
        body: ChatCompletionRequest,
        request_id: str,
        outputs: AsyncIterator[list[EngineOutput]],
    ) -> AsyncIterator[bytes]:
        created = int(time.time())
        acc = _Accumulator(body.n)
        opened = False

        def chunk(
            choices: list[ChatChunkChoice], usage: Usage | None = None
        ) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=request_id, created=created, model=body.model, choices=choices, usage=usage
            )

        async for batch in outputs:
            events = []
            for output in batch:
                if not opened:
                    # OpenAI opens every choice with the assistant role and empty content.
                    opened = True
                    events.append(
                        chunk(
                            [
                                ChatChunkChoice(
                                    index=i, delta=ChatDelta(role="assistant", content="")
                                )
                                for i in range(body.n)
                            ]
                        )
                    )
                acc.add(output)
                logprobs = None
                if body.logprobs and output.logprobs is not None:
                    logprobs = chat_logprobs(output.logprobs)
                events.append(
                    chunk(
                        [
                            ChatChunkChoice(
                                index=output.index,
                                delta=ChatDelta(content=output.text),
                                logprobs=logprobs,
                                finish_reason=output.finish_reason,
                            )
                        ]
                    )
                )
            yield sse.events(events)
        if body.include_usage_chunk:
            yield sse.event(chunk([], acc.usage()))

    # ---- helpers --------------------------------------------------------------------------------

    def _card(self, served: ServedModel) -> ModelCard:
        return ModelCard(
            id=served.config.name,
            created=served.created,
            max_model_len=served.config.max_model_len,
        )

    async def _api_error(self, request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        # Starlette's own errors (405 wrong method, ...) in OpenAI's envelope too.
        error = APIError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}")
        return JSONResponse(error.body(), error.status, headers=exc.headers)

    async def _unexpected_error(self, request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
        error = internal_error()
        return JSONResponse(error.body(), error.status)

    async def _not_found(self, scope: Any, receive: Any, send: Any) -> None:
        error = APIError(404, f"No route {scope.get('path')!r}.", code="not_found")
        await JSONResponse(error.body(), error.status)(scope, receive, send)


def _check_context(
    model: ModelConfig,
    prompt_tokens: int,
    max_tokens: int,
    prompt_param: str,
    max_tokens_param: str = "max_tokens",
) -> None:
    limit = model.max_model_len
    if prompt_tokens >= limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens, but the prompt has "
            f"{prompt_tokens} tokens (at least one token must be left to generate).",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if prompt_tokens + max_tokens > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens; the prompt has "
            f"{prompt_tokens} tokens and {max_tokens_param} is {max_tokens} "
            f"({prompt_tokens + max_tokens} in all). Lower {max_tokens_param} to at most "
            f"{limit - prompt_tokens}.",
            param=max_tokens_param,
            code="context_length_exceeded",
        )


def _check_min_tokens(min_tokens: int, max_tokens: int, max_tokens_param: str) -> None:
    # vLLM's SamplingParams check, against max_tokens as the request ends up with it (for a chat
    # without one, what is left of the context).
    if min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens must be at most {max_tokens_param} ({max_tokens}), got {min_tokens}.",
            param="min_tokens",
        )


def _check_token_ids(token_ids: Sequence[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in token_ids if t >= vocab_size), None)
    if bad is not None:
        raise bad_request(
            f"{param}: token id {bad} is outside the vocabulary (size {vocab_size}).", param
        )


def _check_content_type(content_type: str | None) -> None:
    """JSON or no content type (raw bytes from httpx's `content=` or requests' `data=`); a form
    or text body is a 415, and that includes curl's `-d`/`--data-binary` without
    `-H 'Content-Type: application/json'` (curl labels those application/x-www-form-urlencoded;
    OpenAI takes JSON only too). vLLM refuses anything but application/json (as a 400); `+json`
    media types are JSON too."""
    if content_type is None:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise APIError(
            415,
            f"Unsupported content type {media_type!r}: send the body as application/json.",
            code="unsupported_media_type",
        )


def parse_json_object(raw: bytes, max_depth: int) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying what is wrong with it: not UTF-8, not JSON,
    not an object, nested deeper than max_depth, or a string with an unpaired surrogate escape
    (valid JSON, but no tokenizer can encode it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"The request body is not valid UTF-8: {exc}") from None
    try:
        data = json.loads(text)
    except RecursionError:  # the C scanner recurses per level: far too deep for any request
        raise _too_deep(max_depth) from None
    except ValueError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    # Iterative, so no body can exhaust the stack here (pydantic's validators recurse later).
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise _too_deep(max_depth)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            for text_value in (key, item):
                if isinstance(text_value, str) and not _encodable(text_value):
                    raise bad_request(
                        "The request body has a string with an unpaired UTF-16 surrogate "
                        "escape (\\ud800-\\udfff must come in pairs)."
                    )
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
    return data


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _too_deep(max_depth: int) -> APIError:
    return bad_request(
        f"The request body nests arrays and objects deeper than {max_depth} levels.",
        code="nesting_too_deep",
    )


async def _off_loop_if_long(fn: Callable[[Any], list[int]], arg: Any, size: int) -> list[int]:
    if size <= _TOKENIZE_INLINE_MAX_CHARS:
        return fn(arg)
    return await asyncio.to_thread(fn, arg)


def _json(model: BaseModel, headers: Mapping[str, str]) -> Response:
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)
