"""Metric names that the deploy configs use, and the names a server exposes.

Every PromQL expression in the Grafana dashboard, the alert rules and the Prometheus
adapter rules is collected; names are the ``sift:...`` identifiers in it. The HPA
does not use PromQL: its metric names are the adapter's renamed series and are
mapped back to the series they come from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

# The metrics the server contract (issue 7's brief) says it exports, as exposed on /metrics.
_HISTOGRAMS = [
    "sift:time_to_first_token_seconds",
    "sift:inter_token_latency_seconds",
    "sift:e2e_request_latency_seconds",
    "sift:request_queue_time_seconds",
]
EXPORTED_METRICS = frozenset(
    [
        "sift:num_requests_running",
        "sift:num_requests_waiting",
        "sift:kv_cache_usage_perc",
        "sift:prompt_tokens_total",
        "sift:generation_tokens_total",
        "sift:request_success_total",
        "sift:num_preemptions_total",
        "sift:prefix_cache_queries_total",
        "sift:prefix_cache_hits_total",
        "sift:spec_decode_num_drafts_total",
        "sift:spec_decode_num_draft_tokens_total",
        "sift:spec_decode_num_accepted_tokens_total",
        "sift:spec_decode_num_accepted_tokens_per_pos_total",
        "sift:kv_evicted_tokens_total",
        "sift:kv_compactions_total",
        "sift:kv_resident_tokens",
        "sift:kv_logical_tokens",
    ]
    + [f"{h}{suffix}" for h in _HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")]
)


def sift_names(promql: str) -> set[str]:
    """Names of the sift metrics an expression reads."""
    return set(re.findall(r"(?<![\w:])sift:[a-zA-Z0-9_:]+", promql))


def dashboard_exprs(path: Path = DEPLOY / "grafana" / "sift.json") -> list[str]:
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_exprs(path: Path = DEPLOY / "prometheus" / "alerts.yml") -> list[str]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def adapter_rules(path: Path = DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml") -> list[dict]:
    return yaml.safe_load(path.read_text())["rules"]["custom"]


def adapter_metric_name(rule: dict, series: str) -> str | None:
    """The custom-metrics-API name the adapter serves ``series`` under, if the rule renames it.

    The adapter's ``as`` template uses Go regexp syntax (``${1}``); Python's is ``\\g<1>``.
    """
    pattern = re.compile(rule["name"]["matches"])
    if not pattern.search(series):
        return None
    return pattern.sub(re.sub(r"\$\{(\d+)\}", r"\\g<\1>", rule["name"]["as"]), series)


def adapter_series(rule: dict) -> str:
    """The one series a rule's seriesQuery selects (the rules here each name one)."""
    (name,) = sift_names(rule["seriesQuery"])
    return name


def hpa_sources(hpa_metric_names: set[str]) -> dict[str, str]:
    """HPA metric name -> the Prometheus series the adapter serves it from."""
    sources = {}
    for rule in adapter_rules():
        series = adapter_series(rule)
        served = adapter_metric_name(rule, series)
        if served in hpa_metric_names:
            sources[served] = series
    return sources


def referenced_names() -> dict[str, set[str]]:
    """Where each sift metric is used: {"dashboard": {...}, "alerts": {...}, "adapter": {...}}."""
    return {
        "dashboard": set().union(*(sift_names(e) for e in dashboard_exprs())),
        "alerts": set().union(*(sift_names(e) for e in alert_exprs())),
        "adapter": {adapter_series(rule) for rule in adapter_rules()},
    }


def exposed_names(exposition: str) -> set[str]:
    """Sample names a Prometheus text exposition can contain, including declared-but-empty ones.

    A labelled metric with no children yet has ``# TYPE`` but no samples, so names come
    from both the TYPE lines (expanded by type) and the sample lines.
    """
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
            elif kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names
