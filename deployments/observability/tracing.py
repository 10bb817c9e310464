"""OpenTelemetry tracing: one TracerProvider per component (router, replica) from the config.

The W3C trace context crosses process boundaries in two places: from the client's `traceparent`
header into the router's HTTP span, and from the router into the replica inside the
EngineRequest (`trace_context`), so one request is one trace tree. Span attributes carry ids,
counts and timings only: never prompt text, generated text or keys.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import ParamSpec

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanProcessor,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from deployments.observability.config import TracingConfig

INSTRUMENTATION = "inference_cluster"
_PROPAGATOR = TraceContextTextMapPropagator()
# The tracer of the request being served (set by the router's ObservedApp), so that code deep in
# the request path (the tokenizer) can open child spans without a tracer argument.
_request_tracer: contextvars.ContextVar[trace.Tracer | None] = contextvars.ContextVar(
    "inference_cluster_tracer", default=None
)
P = ParamSpec("P")


def tracer_provider(
    config: TracingConfig, service: str, processor: SpanProcessor | None = None
) -> trace.TracerProvider:
    """The component's provider: a no-op one when tracing is off (spans cost nothing then).
    `processor` replaces the configured exporter (tests pass an in-memory one)."""
    if processor is None and config.exporter == "off":
        return trace.NoOpTracerProvider()
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}),
        sampler=ParentBased(TraceIdRatioBased(config.sampling_ratio)),
    )
    provider.add_span_processor(processor or BatchSpanProcessor(_exporter(config)))
    return provider


def tracer(provider: trace.TracerProvider) -> trace.Tracer:
    return provider.get_tracer(INSTRUMENTATION)


def _exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter == "console":
        return ConsoleSpanExporter()
    if config.exporter == "otlp_http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter(endpoint=config.endpoint)


def inject(ctx: otel_context.Context | None = None) -> dict[str, str] | None:
    """The W3C headers (traceparent, tracestate) of the current span, or None without one."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier or None


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The context a `traceparent` carries (an empty context without one: a new trace)."""
    return _PROPAGATOR.extract(carrier=dict(carrier or {}))


@contextmanager
def request_tracer(current: trace.Tracer) -> Iterator[None]:
    token = _request_tracer.set(current)
    try:
        yield
    finally:
        _request_tracer.reset(token)


def traced_tokenization(kind: str) -> Callable[[Callable[P, list[int]]], Callable[P, list[int]]]:
    """Decorate a tokenizing function: a `tokenize` span (kind, token count) under the request's
    span when one is being traced. Runs where the function runs (also in a worker thread, which
    inherits the request's context)."""

    def decorate(function: Callable[P, list[int]]) -> Callable[P, list[int]]:
        @functools.wraps(function)
        def traced(*args: P.args, **kwargs: P.kwargs) -> list[int]:
            current = _request_tracer.get()
            if current is None:
                return function(*args, **kwargs)
            with current.start_as_current_span("tokenize", attributes={"llm.input": kind}) as span:
                token_ids = function(*args, **kwargs)
                span.set_attribute("llm.prompt_tokens", len(token_ids))
                return token_ids

        return traced

    return decorate
