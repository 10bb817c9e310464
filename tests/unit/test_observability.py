"""Request records, the access log, and one trace tree per request across router and replica."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import ValidationError

from deployments.api.openai_app import OpenAIApp
from deployments.config import AppConfig, ModelConfig, RouterConfig
from deployments.engines.base import EngineOutput, EngineRequest, EngineStats
from deployments.engines.profiles import ZERO_LATENCY
from deployments.engines.simulated import SimulatedEngine
from deployments.observability.config import AccessLogConfig, ObservabilityConfig, TracingConfig
from deployments.observability.middleware import ACCESS_LOGGER, format_access
from deployments.observability.record import RequestRecord
from deployments.observability.replica import ReplicaTelemetry
from deployments.observability.tracing import tracer, tracer_provider
from deployments.tokenizer import PromptTokenizer
from tests.support import observed_client, parse_sse

PROMPT = "the secret prompt text"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def output(tokens: int, **fields: object) -> EngineOutput:
    return EngineOutput(request_id="r", token_ids=tuple(range(tokens)), **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # (seconds before each batch, tokens in it) -> (ttft_ms, tpot_ms, e2e_ms at +0.5 s)
        ([(0.2, 1), (0.1, 1), (0.1, 1)], (200.0, 350.0, 900.0)),  # (0.9 - 0.2) / 2
        ([(0.05, 4)], (50.0, 500 / 3, 550.0)),  # one batch of 4: (0.55 - 0.05) / 3 per token
        ([(0.3, 1)], (300.0, None, 800.0)),  # a single token has no TPOT
        ([], (None, None, 500.0)),  # refused before any output
    ],
)
def test_record_timings(
    steps: list[tuple[float, int]], expected: tuple[float | None, float | None, float]
) -> None:
    clock = FakeClock()
    record = RequestRecord(clock=clock, method="POST", path="/v1/chat/completions")
    for delay, tokens in steps:
        clock.now += delay
        record.outputs([output(tokens, num_prompt_tokens=7, num_cached_tokens=3)])
    clock.now += 0.5
    record.finish(200)
    timings = (record.ttft_ms, record.tpot_ms, record.e2e_ms)
    assert timings == pytest.approx(expected)
    if steps:
        assert (record.prompt_tokens, record.cached_tokens) == (7, 3)


def test_access_log_formats() -> None:
    clock = FakeClock()
    record = RequestRecord(clock=clock, method="POST", path="/v1/completions")
    record.engine_call("tiny", "cmpl-1", 5)
    clock.now += 0.25
    record.outputs([output(2, replica="abc123")])
    record.finish(200)
    line = json.loads(format_access(record, "json"))
    assert line | {"e2e_ms": 0} == {
        "event": "access",
        "request_id": "cmpl-1",
        "http_request_id": None,
        "method": "POST",
        "path": "/v1/completions",
        "model": "tiny",
        "tenant": None,
        "status": 200,
        "stream": False,
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "cached_tokens": 0,
        "ttft_ms": 250.0,
        "tpot_ms": 0.0,
        "e2e_ms": 0,
        "replica": "abc123",
    }
    text = format_access(record, "text")
    assert text.startswith("access request_id=cmpl-1 ") and "replica=abc123" in text
    assert "tenant=-" in text


def test_tracing_config_is_checked() -> None:
    with pytest.raises(ValidationError, match="endpoint applies to the otlp"):
        TracingConfig(exporter="console", endpoint="http://collector:4318")
    with pytest.raises(ValidationError):
        TracingConfig(sampling_ratio=1.5)


class ReplicaBackend:
    """The replica's side in process: the engine stream through ReplicaTelemetry, exactly as
    LLMServer.generate runs it, with the EngineRequest as the only carrier of the context."""

    def __init__(self, engine: SimulatedEngine, telemetry: ReplicaTelemetry) -> None:
        self._engine = engine
        self._telemetry = telemetry

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[EngineOutput]]:
        # What crosses the process boundary: a pickled copy of the request.
        wire = EngineRequest.model_validate_json(request.model_dump_json())
        async for item in self._telemetry.generate(wire, self._engine.generate(wire)):
            yield [item]

    async def stats(self) -> EngineStats:
        return self._engine.stats()


@pytest.fixture
async def traced_api(
    embedded_model: Path, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[httpx.AsyncClient, InMemorySpanExporter, list[RequestRecord]]]:
    exporter = InMemorySpanExporter()
    tracing = TracingConfig(exporter="off", sampling_ratio=0.0)
    model = ModelConfig(
        name="tiny",
        engine="simulated",
        source=str(embedded_model),
        device="cpu",
        max_model_len=512,
    )
    tokenizer = PromptTokenizer(str(embedded_model))
    engine = SimulatedEngine(
        ZERO_LATENCY, seed=1, detokenize=tokenizer.decode, vocab_size=tokenizer.vocab_size
    )
    await engine.start()
    replica = ReplicaTelemetry(
        model,
        "replica-1",
        ObservabilityConfig(),
        tracer_provider(tracing, "llm-server", SimpleSpanProcessor(exporter)),
    )
    api = OpenAIApp(
        AppConfig(router=RouterConfig(), models=[model]),
        {"tiny": ReplicaBackend(engine, replica)},
    )
    router_tracer = tracer(tracer_provider(tracing, "router", SimpleSpanProcessor(exporter)))
    access_log = AccessLogConfig(format="json")
    try:
        # The middleware sets its access logger up first (a handler of its own, not propagated),
        # then the test's handler joins it.
        async with observed_client(api.app, router_tracer, access_log) as (http, finished):
            caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
            logging.getLogger(ACCESS_LOGGER).addHandler(caplog.handler)
            yield http, exporter, finished
    finally:
        logging.getLogger(ACCESS_LOGGER).removeHandler(caplog.handler)
        await engine.shutdown()


def tree(spans: tuple[ReadableSpan, ...]) -> list[tuple[int, str]]:
    """(depth, name) in parent-first order: the shape of the trace."""
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    ids = {s.context.span_id for s in spans}
    for span in spans:
        parent = span.parent.span_id if span.parent and span.parent.span_id in ids else None
        by_parent.setdefault(parent, []).append(span)
    lines: list[tuple[int, str]] = []

    def walk(parent: int | None, depth: int) -> None:
        for span in sorted(by_parent.get(parent, []), key=lambda s: s.start_time or 0):
            lines.append((depth, span.name))
            walk(span.context.span_id, depth + 1)

    walk(None, 0)
    return lines


async def test_one_trace_tree_per_streamed_request_from_the_clients_traceparent(
    traced_api: tuple[httpx.AsyncClient, InMemorySpanExporter, list[RequestRecord]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    http, exporter, finished = traced_api
    response = await http.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 5,
            "stream": True,
        },
        # Sampled by the client: recorded although the ratio of new traces is 0.
        headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
    )
    assert response.status_code == 200
    events, done = parse_sse(response.text)
    assert done and events

    spans = exporter.get_finished_spans()
    assert tree(spans) == [
        (0, "POST /v1/chat/completions"),
        (1, "tokenize"),
        (1, "engine.generate"),
    ]
    assert {format(s.context.trace_id, "032x") for s in spans} == {CLIENT_TRACE}
    by_name = {s.name: s for s in spans}
    http_span, engine_span = by_name["POST /v1/chat/completions"], by_name["engine.generate"]
    assert format(http_span.parent.span_id, "016x") == CLIENT_SPAN  # type: ignore[union-attr]
    assert engine_span.parent.span_id == http_span.context.span_id  # type: ignore[union-attr]
    assert engine_span.resource.attributes["service.name"] == "llm-server"
    assert http_span.resource.attributes["service.name"] == "router"

    attrs = engine_span.attributes or {}
    assert attrs["llm.model"] == "tiny" and attrs["llm.replica"] == "replica-1"
    assert attrs["llm.completion_tokens"] == 5 and attrs["llm.prompt_tokens"] > 0
    assert attrs["llm.finish_reason"] == "length"
    (first_token,) = [e for e in engine_span.events if e.name == "first_token"]
    ttft_ms = (first_token.attributes or {})["llm.ttft_ms"]
    http_attrs = http_span.attributes or {}
    assert http_attrs["http.response.status_code"] == 200
    assert http_attrs["llm.replica"] == "replica-1" and http_attrs["llm.completion_tokens"] == 5
    assert http_attrs["llm.ttft_ms"] <= http_attrs["llm.e2e_ms"] and http_attrs["llm.stream"]
    assert 0 <= ttft_ms <= http_attrs["llm.ttft_ms"]  # the engine's, within the router's
    assert (by_name["tokenize"].attributes or {})["llm.prompt_tokens"] == attrs["llm.prompt_tokens"]

    # Never the prompt (or any text) in spans or the access log.
    every_value = [str(v) for s in spans for v in (s.attributes or {}).values()]
    assert not any("secret" in v for v in every_value)
    (line,) = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert "secret" not in line
    logged = json.loads(line)
    assert (logged["status"], logged["model"], logged["replica"]) == (200, "tiny", "replica-1")
    assert logged["completion_tokens"] == 5 and logged["stream"] is True
    (record,) = finished
    assert record.request_id == logged["request_id"] == events[0]["id"]


async def test_unsampled_requests_record_no_spans_but_still_metrics(
    traced_api: tuple[httpx.AsyncClient, InMemorySpanExporter, list[RequestRecord]],
) -> None:
    http, exporter, finished = traced_api
    response = await http.post(
        "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3}
    )
    assert response.status_code == 200
    assert exporter.get_finished_spans() == ()  # sampling_ratio 0 and no client trace
    (record,) = finished
    assert (record.status, record.model, record.completion_tokens) == (200, "tiny", 3)
    bad = await http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert bad.status_code == 404
    assert (finished[-1].status, finished[-1].model) == (404, None)
