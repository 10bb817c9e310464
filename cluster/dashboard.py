"""The Grafana dashboard of the cluster, generated from one list of panels.

Its JSON is committed as k8s/base/dashboards/inference-cluster.json (the ConfigMap that Grafana's
sidecar loads on Kubernetes); `inference-cluster dashboard` prints it, or writes it with --out.
Every query names metrics exactly as Ray's metrics endpoint exports them (`ray_` + the
ray.util.metrics name); tests/k8s checks the committed file against this module, and
tests/integration/test_observability_cluster.py checks, with a real Prometheus, that every panel's
query returns data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD_FILE = (
    Path(__file__).parents[1] / "k8s" / "base" / "dashboards" / "inference-cluster.json"
)
UID = "inference-cluster"
RATE_WINDOW = "1m"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""


def _quantiles(metric: str, by: str = "model") -> tuple[Query, ...]:
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket[{RATE_WINDOW}])))",
            f"p{round(q * 100)} {_legend(by)}",
        )
        for q in (0.5, 0.99)
    )


def _legend(by: str) -> str:
    """Grafana's legend of a `by` clause: one {{label}} per label (a "{{a, b}}" names no label,
    and Grafana prints it as is)."""
    return " ".join(f"{{{{{label.strip()}}}}}" for label in by.split(","))


def _rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}[{RATE_WINDOW}]))"


def _token_rates(prefix: str, by: str) -> tuple[Query, ...]:
    """Prompt, completion and cached tokens/s from `<prefix>_<kind>_tokens_total`, per `by`."""
    return tuple(
        Query(_rate(f"{prefix}_{kind}_tokens_total", by), f"{kind} {_legend(by)}")
        for kind in ("prompt", "completion", "cached")
    )


# Cost per million tokens: what the replicas' accelerators cost per hour (replica_cost_per_hour_usd,
# from observability.accelerator_hourly_usd) over the tokens they produced in that hour, measured
# over a longer window than the rates so that it does not swing with each burst.
_COST_WINDOW = "5m"


def _cost_per_million(tokens: str) -> str:
    return f"sum by (model) (ray_replica_cost_per_hour_usd) / ({tokens} * 3600) * 1e6"


PANELS: tuple[Panel, ...] = (
    Panel(
        "Requests/s by model and status (router)",
        "reqps",
        (Query(_rate("ray_router_requests_total", "model, status"), "{{model}} {{status}}"),),
    ),
    Panel("Time to first token (router)", "ms", _quantiles("ray_router_ttft_ms")),
    Panel("Time per output token (router)", "ms", _quantiles("ray_router_tpot_ms")),
    Panel("End-to-end latency (router)", "ms", _quantiles("ray_router_e2e_ms")),
    Panel(
        "Tokens/s: prompt, completion, cached (router)",
        "short",
        _token_rates("ray_router", by="model"),
    ),
    Panel(
        "Cached share of prompt tokens",
        "percentunit",
        (
            Query(
                f"{_rate('ray_router_cached_tokens_total', 'model')} / "
                f"{_rate('ray_router_prompt_tokens_total', 'model')}",
                "{{model}}",
            ),
        ),
        "Prompt tokens the engines served from their prefix cache (usage.cached_tokens).",
    ),
    Panel(
        "Usage by tenant: tokens/s",
        "short",
        _token_rates("ray_tenant", by="tenant"),
    ),
    Panel(
        "Estimated cost per million tokens (USD)",
        "currencyUSD",
        (
            Query(
                _cost_per_million(
                    f"sum by (model) (rate(ray_router_completion_tokens_total[{_COST_WINDOW}]))"
                ),
                "completion {{model}}",
            ),
            Query(
                _cost_per_million(
                    f"(sum by (model) (rate(ray_router_completion_tokens_total[{_COST_WINDOW}]))"
                    f" + sum by (model) (rate(ray_router_prompt_tokens_total[{_COST_WINDOW}])))"
                ),
                "prompt + completion {{model}}",
            ),
        ),
        "Replicas' accelerator price per hour (observability.accelerator_hourly_usd x "
        "accelerators) over the measured token throughput.",
    ),
    Panel(
        "Engine queue per replica: waiting, running",
        "short",
        (
            Query("sum by (model, replica) (ray_replica_waiting)", "waiting {{replica}}"),
            Query("sum by (model, replica) (ray_replica_running)", "running {{replica}}"),
        ),
    ),
    Panel(
        "KV cache usage per replica",
        "percentunit",
        (Query("max by (model, replica) (ray_replica_kv_cache_usage)", "{{replica}}"),),
    ),
    Panel(
        "Prefix cache hit rate per replica",
        "percentunit",
        (
            Query(
                f"{_rate('ray_replica_prefix_cache_hits_total', 'model, replica')} / "
                f"{_rate('ray_replica_prefix_cache_queries_total', 'model, replica')}",
                "{{replica}}",
            ),
        ),
        "Prompt tokens found in each engine's prefix cache over those looked up.",
    ),
    Panel(
        "Routing decision time",
        "ms",
        _quantiles("ray_router_decision_ms", by="deployment, policy"),
        "Time the routing policy took to rank the replicas (deployments/routing).",
    ),
    Panel(
        "Routing: predicted vs actual cached tokens/s",
        "short",
        (
            Query(
                _rate("ray_routing_predicted_cached_tokens_total", "model"), "predicted {{model}}"
            ),
            Query(_rate("ray_routing_actual_cached_tokens_total", "model"), "actual {{model}}"),
        ),
        "Prompt tokens the router believed the chosen replica had cached vs those its engine "
        "found (deployments/llm_server.py).",
    ),
    Panel(
        "Routing: actual / predicted cached tokens per request",
        "short",
        _quantiles("ray_routing_prediction_ratio"),
        "1: the router's view of the cache was exact; below 1: it believed blocks the engine "
        "had lost.",
    ),
    Panel(
        "Routing: KV event staleness",
        "ms",
        _quantiles("ray_router_kv_event_staleness_ms", by="deployment"),
        "How far the routers' view of each replica's cache lagged the engine.",
    ),
    Panel(
        "Autoscaler: desired vs current replicas",
        "short",
        (
            Query(
                "max by (deployment, reason) (ray_autoscaler_desired_replicas)",
                "desired {{deployment}} ({{reason}})",
            ),
            Query(
                "max by (deployment) (ray_autoscaler_current_replicas)",
                "current {{deployment}}",
            ),
        ),
        "What the autoscaling policy asked for at its last decision and why "
        "(deployments/autoscaling.py), against the replicas running then.",
    ),
    Panel(
        "HTTP requests/s by status (ingress)",
        "reqps",
        (
            Query(
                _rate("ray_serve_num_http_requests_total", "application, status_code"),
                "{{application}} {{status_code}}",
            ),
        ),
        "Serve's own count at the ingress: from HAProxy's log (the default) or by Serve's "
        "Python proxy (ingress.haproxy: false).",
    ),
    Panel(
        "Healthy replicas by deployment",
        "short",
        (Query("sum by (deployment) (ray_serve_deployment_replica_healthy)", "{{deployment}}"),),
    ),
)


def dashboard() -> dict[str, Any]:
    panels = [_panel(i, panel) for i, panel in enumerate(PANELS)]
    return {
        "uid": UID,
        "title": "inference-cluster",
        "tags": ["inference-cluster", "ray", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                }
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def queries(dashboard_json: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expression) of every query of a dashboard JSON."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_json["panels"]
        for target in panel["targets"]
    ]


def _panel(index: int, panel: Panel) -> dict[str, Any]:
    width, height = 12, 8
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": (index % 2) * width, "y": (index // 2) * height, "w": width, "h": height},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": query.expr,
                "legendFormat": query.legend,
            }
            for i, query in enumerate(panel.queries)
        ],
    }
