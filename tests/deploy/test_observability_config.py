"""The compose stack, Prometheus config, alert rules and Grafana provisioning fit together."""

import json
import re
from pathlib import Path

import yaml

from dockerfile_parse import parse

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def load(relative: str):
    return yaml.safe_load((DEPLOY / relative).read_text())


def _duration_seconds(text: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", text))


def _bind_mounts(service: dict) -> dict[str, str]:
    """container path -> host path, for the binds given relative to deploy/."""
    mounts = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        if host.startswith("./"):
            mounts[container] = host
    return mounts


def test_compose_builds_the_images_it_runs_and_mounts_existing_files():
    compose = load("compose.yaml")
    services = compose["services"]
    assert set(services) == {"sift", "prometheus", "grafana"}
    sift = services["sift"]
    assert (DEPLOY / sift["build"]["context"] / sift["build"]["dockerfile"]).is_file()
    for name in ("prometheus", "grafana"):
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", services[name]["image"]), "pin third-party images"
        for host in _bind_mounts(services[name]).values():
            assert (DEPLOY / host).exists(), host
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(("./", "$"))}
    assert named == set(compose["volumes"])


def test_compose_stop_grace_covers_the_image_shutdown_timeout():
    sift = load("compose.yaml")["services"]["sift"]
    shutdown_timeout = float(parse(DEPLOY / "Dockerfile")[-1].env()["SIFT_SHUTDOWN_TIMEOUT"])
    assert _duration_seconds(sift["stop_grace_period"]) > shutdown_timeout


def test_gpu_override_switches_image_and_reserves_a_gpu():
    sift = load("compose.gpu.yaml")["services"]["sift"]
    assert (DEPLOY / sift["build"]["context"] / sift["build"]["dockerfile"]).name == "Dockerfile.cuda"
    (device,) = sift["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_prometheus_scrapes_sift_and_loads_the_mounted_rules():
    compose = load("compose.yaml")["services"]
    config = load("prometheus/prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "sift" and job["metrics_path"] == "/metrics"
    port = parse(DEPLOY / "Dockerfile")[-1].env()["SIFT_PORT"]
    assert job["static_configs"] == [{"targets": [f"sift:{port}"]}]
    mounts = _bind_mounts(compose["prometheus"])
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    for rule_file in config["rule_files"]:
        assert rule_file in mounts, f"{rule_file} is not mounted into the container"


def test_alert_rules_are_well_formed_and_match_the_k8s_prometheus_rule():
    alerts = load("prometheus/alerts.yml")
    names = [rule["alert"] for group in alerts["groups"] for rule in group["rules"]]
    assert len(names) == len(set(names))
    for group in alerts["groups"]:
        for rule in group["rules"]:
            assert rule["expr"].count("(") == rule["expr"].count(")")
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"]
    assert load("k8s/base/prometheusrule.yaml")["spec"] == alerts


def test_grafana_provisions_the_datasource_and_dashboard_the_panels_use():
    grafana = load("compose.yaml")["services"]["grafana"]
    mounts = _bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    (datasource,) = load("grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = load("grafana/provisioning/dashboards/sift.yml")["providers"]
    dashboard_dir = provider["options"]["path"]
    (dashboard_mount,) = [c for c, h in mounts.items() if h == "./grafana/sift.json"]
    assert Path(dashboard_mount).parent.as_posix() == dashboard_dir

    dashboard = json.loads((DEPLOY / "grafana" / "sift.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used = set().union(*(re.findall(r"\$(\w+)", t["expr"]) for p in dashboard["panels"] for t in p["targets"]))
    assert used - {"__rate_interval"} <= variables


def test_dashboard_covers_the_issue_topics():
    titles = " | ".join(p["title"].lower() for p in json.loads((DEPLOY / "grafana" / "sift.json").read_text())["panels"])
    for topic in ("request rate", "time to first token", "inter-token latency", "end-to-end latency",
                  "running / waiting", "kv cache usage", "prefix cache hit rate", "preemptions",
                  "speculative decoding acceptance", "kv eviction"):
        assert topic in titles, topic
