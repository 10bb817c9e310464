"""The cluster's own metrics, through ray.util.metrics: they appear on Ray's metrics endpoint
(hence in Prometheus and Grafana) as `ray_<name>` (counters also get `_total`, histograms
`_bucket`/`_sum`/`_count`). cluster/dashboard.py queries exactly these names.

The thin Ray adapter: what to record comes from RequestRecord and EngineStats.
"""

from __future__ import annotations

from ray.util import metrics

from deployments.engines.base import EngineStats
from deployments.observability.record import UNKNOWN, RequestRecord

# Up to the longest a request may wait or last with the defaults: a first token within
# cold_start_timeout_s (180 s) for a model at zero, a request within request_timeout_s (600 s).
# Past the last bound a value is only "above it", and quantiles there read as that bound.
TTFT_MS_BOUNDARIES = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 180000]
TPOT_MS_BOUNDARIES = [1, 2, 5, 10, 20, 35, 50, 75, 100, 200, 500, 1000]
E2E_MS_BOUNDARIES = [
    10,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    120000,
    300000,
    600000,
]


class RouterMetrics:
    """Per request, in the router: counts by model and status, latencies, token usage (also per
    tenant)."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "router_requests",
            description="Completions and chat requests answered, by model and HTTP status.",
            tag_keys=("model", "status"),
        )
        self.ttft = metrics.Histogram(
            "router_ttft_ms",
            description="Time to first token as the router sees it (arrival to first output).",
            boundaries=TTFT_MS_BOUNDARIES,
            tag_keys=("model",),
        )
        self.tpot = metrics.Histogram(
            "router_tpot_ms",
            description="Mean time per output token after the first, per request.",
            boundaries=TPOT_MS_BOUNDARIES,
            tag_keys=("model",),
        )
        self.e2e = metrics.Histogram(
            "router_e2e_ms",
            description="Request latency from arrival to the last byte sent.",
            boundaries=E2E_MS_BOUNDARIES,
            tag_keys=("model",),
        )
        self.tokens = {
            kind: metrics.Counter(
                f"router_{kind}_tokens",
                description=f"{kind.capitalize()} tokens of answered requests.",
                tag_keys=("model",),
            )
            for kind in ("prompt", "completion", "cached")
        }
        self.tenant_tokens = {
            kind: metrics.Counter(
                f"tenant_{kind}_tokens",
                description=f"{kind.capitalize()} tokens by tenant (usage, billing).",
                tag_keys=("model", "tenant"),
            )
            for kind in ("prompt", "completion", "cached")
        }

    def request_finished(self, record: RequestRecord) -> None:
        if not record.is_generation:
            return
        model = record.model or UNKNOWN
        self.requests.inc(tags={"model": model, "status": str(record.status)})
        if record.request_id is None:
            return  # refused before the engine was called: no latency or tokens to count
        tags = {"model": model}
        for histogram, value in (
            (self.ttft, record.ttft_ms),
            (self.tpot, record.tpot_ms),
            (self.e2e, record.e2e_ms),
        ):
            if value is not None:
                histogram.observe(value, tags=tags)
        counts = {
            "prompt": record.prompt_tokens,
            "completion": record.completion_tokens,
            "cached": record.cached_tokens,
        }
        tenant_tags = {"model": model, "tenant": record.tenant or "anonymous"}
        for kind, count in counts.items():
            if count:
                self.tokens[kind].inc(count, tags=tags)
                self.tenant_tokens[kind].inc(count, tags=tenant_tags)


class ReplicaMetrics:
    """Per LLMServer replica: its engine's queue, KV usage and prefix-cache counters, and its
    accelerators' cost per hour (when a price is configured)."""

    def __init__(self, model: str, replica: str, cost_per_hour_usd: float | None) -> None:
        tags = {"model": model, "replica": replica}
        keys = ("model", "replica")
        self.waiting = metrics.Gauge(
            "replica_waiting", description="Requests waiting in the engine.", tag_keys=keys
        )
        self.running = metrics.Gauge(
            "replica_running", description="Requests running in the engine.", tag_keys=keys
        )
        self.kv_usage = metrics.Gauge(
            "replica_kv_cache_usage", description="Share of KV cache blocks in use.", tag_keys=keys
        )
        self.prefix_hits = metrics.Counter(
            "replica_prefix_cache_hits",
            description="Prompt tokens found in the engine's prefix cache.",
            tag_keys=keys,
        )
        self.prefix_queries = metrics.Counter(
            "replica_prefix_cache_queries",
            description="Prompt tokens looked up in the engine's prefix cache.",
            tag_keys=keys,
        )
        for metric in (self.waiting, self.running, self.kv_usage):
            metric.set_default_tags(tags)
        for counter in (self.prefix_hits, self.prefix_queries):
            counter.set_default_tags(tags)
        self._cost: tuple[metrics.Gauge, float] | None = None  # the gauge and its value
        if cost_per_hour_usd is not None:
            cost = metrics.Gauge(
                "replica_cost_per_hour_usd",
                description="Accelerator price of this replica (accelerators x configured price).",
                tag_keys=keys,
            )
            cost.set_default_tags(tags)
            cost.set(cost_per_hour_usd)
            self._cost = (cost, cost_per_hour_usd)
        self._hits = self._queries = 0

    def update(self, stats: EngineStats) -> None:
        if self._cost is not None:
            # Set again with the others although it never changes: Ray's metrics agent drops a
            # gauge value that no export refreshed within two report intervals (a cost panel
            # once had no data for 120 s on a loaded machine while these gauges did).
            gauge, value = self._cost
            gauge.set(value)
        self.waiting.set(stats.num_waiting)
        self.running.set(stats.num_running)
        self.kv_usage.set(stats.kv_cache_usage)
        # The engine's counters are totals; Ray counters take increments.
        if stats.prefix_cache_hits > self._hits:
            self.prefix_hits.inc(stats.prefix_cache_hits - self._hits)
        if stats.prefix_cache_queries > self._queries:
            self.prefix_queries.inc(stats.prefix_cache_queries - self._queries)
        self._hits, self._queries = stats.prefix_cache_hits, stats.prefix_cache_queries
