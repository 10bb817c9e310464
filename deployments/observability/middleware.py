"""The router's per-request observation: an ASGI middleware around the OpenAI app.

For every HTTP request it continues the client's trace (`traceparent`) in a server span, keeps a
RequestRecord in a context variable for the request path to fill (model, engine outputs, replica),
and when the last byte of the response is sent (streams included) it ends the span, hands the
record to the metrics sink and writes one access-log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from deployments.engines.base import EngineOutput, EngineRequest
from deployments.observability import record as records
from deployments.observability.config import AccessLogConfig
from deployments.observability.record import Clock, RequestRecord, RequestSink
from deployments.observability.tracing import extract, inject, request_tracer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

ACCESS_LOGGER = "inference_cluster.access"
CLIENT_CLOSED_REQUEST = 499


class ObservedApp:
    """Wraps an ASGI app; one span, one record and one access-log line per HTTP request."""

    def __init__(
        self,
        app: ASGIApp,
        tracer: trace.Tracer,
        sink: RequestSink,
        access_log: AccessLogConfig,
        clock: Clock = time.monotonic,
    ) -> None:
        self._app = app
        self._tracer = tracer
        self._sink = sink
        self._access_log = access_log
        self._clock = clock
        self._logger = access_logger() if access_log.enabled else None

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        record = RequestRecord(
            clock=self._clock,
            method=scope["method"],
            path=scope["path"],
            http_request_id=headers.get("x-request-id"),
        )
        status = 500  # what the client gets if the app fails before answering
        answered = left = False

        async def observed_send(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = message["status"]
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                record.stream = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                answered = True
            await send(message)

        async def observed_receive() -> Message:
            nonlocal left
            message = await receive()
            # A client gone mid-stream: Starlette's streaming response stops on this message and
            # returns normally, with no cancellation to see.
            left = left or (message["type"] == "http.disconnect" and not answered)
            return message

        token = records.set_current(record)
        with (
            self._tracer.start_as_current_span(
                f"{scope['method']} {scope['path']}",
                context=extract(headers),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": scope["method"], "url.path": scope["path"]},
            ) as span,
            request_tracer(self._tracer),
        ):
            try:
                await self._app(scope, observed_receive, observed_send)
            except asyncio.CancelledError:
                # Serve cancels the request's task when its client goes away: nginx's 499, as
                # Serve counts it, not the 500 of an app that failed (a client that gives up
                # is no server error), nor the 200 of a stream it left.
                status = CLIENT_CLOSED_REQUEST
                raise
            finally:
                if left:
                    status = CLIENT_CLOSED_REQUEST
                records.reset_current(token)
                record.finish(status)
                _annotate(span, record)
                self._sink.request_finished(record)
                if self._logger is not None:
                    self._logger.info(format_access(record, self._access_log.format))


def observe_engine_call(model: str, request: EngineRequest) -> EngineRequest:
    """Note the engine call in the request's record; the request, carrying the current span's
    trace context to the replica."""
    record = records.current()
    if record is None:
        return request
    record.engine_call(model, request.request_id, len(request.prompt_token_ids))
    return request.model_copy(update={"trace_context": inject()})


def observe_tenant(tenant: str | None) -> None:
    """The authenticated caller's tenant (None: anonymous), for usage metrics and the log."""
    record = records.current()
    if record is not None:
        record.tenant = tenant


def observe_model(model: str) -> None:
    """The request's model, once it is known to be served: its refusals (a 429, a context too
    long) count under it, not under `unknown`."""
    record = records.current()
    if record is not None:
        record.model = model


def observe_stream_error(status: int) -> None:
    """A stream that already answered 200 ended with an error event of this status: the
    request counts (metrics, span, access log) with the error's status."""
    record = records.current()
    if record is not None:
        record.stream_error_status = status


def observe_outputs(batch: list[EngineOutput]) -> None:
    record = records.current()
    if record is not None:
        record.outputs(batch)


def _annotate(span: trace.Span, record: RequestRecord) -> None:
    span.set_attribute("http.response.status_code", record.status or 0)
    if record.status is not None and record.status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    for key, value in _fields(record).items():
        if value is not None and key not in ("method", "path", "status"):
            span.set_attribute(f"llm.{key}", value)


def _fields(record: RequestRecord) -> dict[str, Any]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 2)

    return {
        "request_id": record.request_id,
        "http_request_id": record.http_request_id,
        "method": record.method,
        "path": record.path,
        "model": record.model,
        "tenant": record.tenant,
        "status": record.status,
        "stream": record.stream,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cached_tokens": record.cached_tokens,
        "ttft_ms": ms(record.ttft_ms),
        "tpot_ms": ms(record.tpot_ms),
        "e2e_ms": ms(record.e2e_ms),
        "replica": record.replica,
    }


def format_access(record: RequestRecord, fmt: str) -> str:
    """One access-log line: ids, model, status, token counts, timings, replica (no prompt)."""
    fields = _fields(record)
    if fmt == "json":
        return json.dumps({"event": "access", **fields}, separators=(",", ":"))
    return "access " + " ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items())


def access_logger() -> logging.Logger:
    """The access log: bare lines on stderr (Ray keeps each replica's in its worker logs), not
    wrapped in Serve's own log format, so a JSON line stays one parseable JSON object."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
