"""Observability of a real local cluster (Ray Serve, simulated engines): a real Prometheus scrapes
it under load; every query of the Grafana dashboard (k8s/base/dashboards/inference-cluster.json)
and every series the alert rules (k8s/base/alerts.yaml) read returns data, and Prometheus
evaluates every rule without error; a streamed request's spans, exported over OTLP/HTTP by the
router and the replica processes, form one tree under the client's traceparent."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from ray import serve

from cluster import runtime
from cluster.dashboard import DASHBOARD_FILE, queries
from deployments.config import AppConfig, RouterConfig
from deployments.observability.config import ObservabilityConfig, TracingConfig
from tests.integration.conftest import free_port, simulated_model
from tests.support import ALERTS_FILE, alert_rules_file

pytestmark = pytest.mark.integration

DATA_TIMEOUT_S = 120
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


class Collector:
    """An OTLP/HTTP trace receiver (protobuf), as an OpenTelemetry Collector would be."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.receive(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def receive(self, request: ExportTraceServiceRequest) -> None:
        for resource in request.resource_spans:
            attributes = {a.key: a.value for a in resource.resource.attributes}
            service = attributes["service.name"].string_value
            for scope in resource.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        {
                            "service": service,
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                            "events": [e.name for e in span.events],
                        }
                    )


def _value(value: object) -> object:
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    inner = getattr(value, kind)
    return [_value(v) for v in inner.values] if kind == "array_value" else inner


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    collector = Collector()
    yield collector
    collector.server.shutdown()


@pytest.fixture(scope="module")
def cluster(embedded_model: Path, collector: Collector) -> Iterator[tuple[str, int]]:
    """(API base URL, Ray metrics port) of the app on 2 simulated replicas."""
    metrics_port = free_port()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        logging_level="ERROR",
        _metrics_export_port=metrics_port,
        # Workers push their metrics to the node's exporter every second (default 10 s).
        _system_config={"metrics_report_interval_ms": 1000},
    )
    port = free_port()
    config = AppConfig(
        router=RouterConfig(cpus=0.1),
        # Autoscaled within [2, 3], so the autoscaler's panel has data and the fleet holds.
        models=[
            simulated_model(
                embedded_model,
                num_replicas=2,
                autoscaling={"enabled": True, "min_replicas": 2, "max_replicas": 3},
            )
        ],
        observability=ObservabilityConfig(
            accelerator_hourly_usd=2.5,
            tracing=TracingConfig(
                exporter="otlp_http", endpoint=collector.endpoint, sampling_ratio=0.0
            ),
        ),
    )
    try:
        runtime.deploy(config, host="127.0.0.1", port=port, timeout_s=180)
        yield f"http://127.0.0.1:{port}", metrics_port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def prometheus(cluster: tuple[str, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make test` installs it (Debian package prometheus)"
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(alert_rules_file(folder))],
                "scrape_configs": [
                    {
                        "job_name": "ray",
                        "static_configs": [{"targets": [f"127.0.0.1:{cluster[1]}"]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(folder / "prometheus.log").open("w"),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


async def load(base_url: str, stop: asyncio.Event) -> int:
    """Shared-prefix chat and completions requests, streamed and not, from 4 users until stopped;
    returns how many succeeded."""
    prefixes = [" ".join(["system prompt", str(g)] * 60) for g in range(3)]
    done = 0

    async def user(u: int, http: httpx.AsyncClient) -> None:
        nonlocal done
        i = 0
        while not stop.is_set():
            i += 1
            body = {"model": "sim", "max_tokens": 8, "stream": i % 2 == 0}
            if i % 3:
                body["messages"] = [{"role": "user", "content": f"{prefixes[i % 3]} q{u}.{i}"}]
                path = "/v1/chat/completions"
            else:
                body["prompt"] = f"{prefixes[i % 3]} q{u}.{i}"
                path = "/v1/completions"
            response = await http.post(path, json=body)
            assert response.status_code == 200, response.text
            done += 1
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        await asyncio.gather(*(user(u, http) for u in range(4)))
    return done


def has_data(result: dict) -> bool:
    return any(not math.isnan(float(series["value"][1])) for series in result["data"]["result"])


# Matchers that select a failure (a 5xx, a capacity limit): a healthy cluster has no such series,
# so for those the metric is asked for without the matcher.
FAILURE_MATCHERS = ('status=~"5.."', 'reason="capacity"')


def alert_series() -> list[tuple[str, str]]:
    """("alert <name>", selector) for every series selector in the alert rules' expressions."""
    rules = yaml.safe_load(ALERTS_FILE.read_text())["spec"]["groups"][0]["rules"]
    series = []
    for rule in rules:
        for selector in re.findall(r"ray_\w+(?:\{[^}]*\})?", rule["expr"]):
            if any(matcher in selector for matcher in FAILURE_MATCHERS):
                selector = selector.split("{")[0]
            series.append((f"alert {rule['alert']}", selector))
    return series


async def test_every_dashboard_query_and_alert_series_returns_data(
    cluster: tuple[str, int], prometheus: str
) -> None:
    panel_queries = queries(json.loads(DASHBOARD_FILE.read_text())) + alert_series()
    stop = asyncio.Event()
    loader = asyncio.create_task(load(cluster[0], stop))
    missing = dict.fromkeys(panel_queries)
    try:
        async with httpx.AsyncClient(base_url=prometheus, timeout=10) as http:
            deadline = time.monotonic() + DATA_TIMEOUT_S
            while missing and time.monotonic() < deadline and not loader.done():
                await asyncio.sleep(2)
                for query in list(missing):
                    response = await http.get("/api/v1/query", params={"query": query[1]})
                    assert response.status_code == 200, (query, response.text)
                    if has_data(response.json()):
                        del missing[query]
    finally:
        stop.set()
        served = await loader
    panels = {title for title, _ in panel_queries}
    empty = {title for title, _ in missing}
    print(
        f"\nPrometheus: {len(panels) - len(empty)}/{len(panels)} panels and alerts with data, "
        f"{len(panel_queries) - len(missing)}/{len(panel_queries)} queries; {served} requests"
    )
    assert not missing, f"queries without data after {DATA_TIMEOUT_S} s: {list(missing)}"
    # Prometheus evaluates the rules every second: each has run on the cluster's series by now.
    async with httpx.AsyncClient(base_url=prometheus, timeout=10) as http:
        rules = (await http.get("/api/v1/rules")).json()["data"]["groups"][0]
    health = {rule["name"]: (rule["health"], rule.get("lastError")) for rule in rules["rules"]}
    print(f"alert rules: {health}")
    assert all(state == "ok" for state, _ in health.values()), health


def test_a_streamed_request_is_one_trace_tree_across_router_and_replica(
    cluster: tuple[str, int], collector: Collector
) -> None:
    response = httpx.post(
        f"{cluster[0]}/v1/chat/completions",
        json={
            "model": "sim",
            "messages": [{"role": "user", "content": "the private prompt " * 40}],
            "max_tokens": 6,
            "stream": True,
        },
        headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
        timeout=60,
    )
    assert response.status_code == 200
    expected = {"POST /v1/chat/completions", "tokenize", "route", "engine.generate"}
    deadline = time.monotonic() + 60  # span processors export in batches every few seconds
    spans: dict[str, dict] = {}
    while time.monotonic() < deadline and set(spans) != expected:
        time.sleep(1)
        spans = {s["name"]: s for s in collector.spans if s["trace_id"] == CLIENT_TRACE}
    assert set(spans) == expected, spans
    http_span = spans["POST /v1/chat/completions"]
    assert http_span["parent"] == CLIENT_SPAN and http_span["service"] == "router"
    for child in ("tokenize", "route", "engine.generate"):
        assert spans[child]["parent"] == http_span["span_id"], child
    route, engine = spans["route"]["attributes"], spans["engine.generate"]
    assert engine["service"] == "llm-server sim"
    assert route["llm.routing.policy"] == "cache_load"
    assert len(route["llm.routing.candidates"]) == 2
    assert route["llm.replica"] == engine["attributes"]["llm.replica"]
    assert route["llm.routing.predicted_cached_blocks"] >= 0
    assert "first_token" in engine["events"]
    assert engine["attributes"]["llm.completion_tokens"] == 6
    assert http_span["attributes"]["llm.replica"] == route["llm.replica"]
    assert not any("private" in str(v) for s in spans.values() for v in s["attributes"].values())
    print("\ntrace " + CLIENT_TRACE)
    for name in ("POST /v1/chat/completions", "tokenize", "route", "engine.generate"):
        span = spans[name]
        indent = "" if name.startswith("POST") else "  "
        print(f"{indent}{name} [{span['service']}] {span['attributes']} events={span['events']}")
