"""Configuration of metrics, traces and the access log (`observability` in the config file)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class TracingConfig(_Strict):
    """OpenTelemetry traces of each request: HTTP, tokenization, routing, the engine call."""

    exporter: Literal["off", "console", "otlp_http", "otlp_grpc"] = Field(
        "off",
        description="Where spans go: off, console (stdout of each process), otlp_http or "
        "otlp_grpc (to `endpoint`, e.g. an OpenTelemetry Collector, Jaeger or Tempo).",
    )
    endpoint: str | None = Field(
        None,
        description="OTLP endpoint (e.g. http://otel-collector:4318/v1/traces for otlp_http, "
        "http://otel-collector:4317 for otlp_grpc); none: the exporter's default / "
        "OTEL_EXPORTER_OTLP_ENDPOINT.",
    )
    sampling_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of new traces recorded; a request whose client sent a sampled "
        "traceparent is always recorded (parent-based sampling).",
    )

    @model_validator(mode="after")
    def _endpoint_for_otlp(self) -> TracingConfig:
        if self.endpoint is not None and not self.exporter.startswith("otlp"):
            raise ValueError("endpoint applies to the otlp_http and otlp_grpc exporters only")
        return self


class AccessLogConfig(_Strict):
    """One line per request on the router's log (never the prompt, never a key)."""

    enabled: bool = Field(True, description="Write the access log.")
    format: Literal["text", "json"] = Field(
        "text", description="`text` (key=value) or `json` (one JSON object per line)."
    )


class ObservabilityConfig(_Strict):
    """Metrics (ray.util.metrics: Ray's /metrics, Prometheus, Grafana), traces, access log."""

    tracing: TracingConfig = Field(default_factory=TracingConfig, description="Traces.")
    access_log: AccessLogConfig = Field(
        default_factory=AccessLogConfig, description="The per-request access log."
    )
    accelerator_hourly_usd: NonNegativeFloat | None = Field(
        None,
        description="Price of one accelerator-hour (a GPU; for CPU models, one worker's "
        "share of a machine) in USD: each replica exports its cost per hour, and the dashboard "
        "divides it by the measured token throughput (cost per million tokens).",
    )
