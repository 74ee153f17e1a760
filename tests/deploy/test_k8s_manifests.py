"""deploy/k8s renders to valid manifests whose parts fit together, for every overlay."""

from pathlib import Path

import kubernetes_validate
import pytest

from k8s_render import render
from metric_refs import EXPORTED_METRICS, hpa_sources

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"
OVERLAYS = ["base", "overlays/cpu", "overlays/gpu"]
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def by_kind(docs: list[dict]) -> dict[str, dict]:
    kinds = [doc["kind"] for doc in docs]
    assert len(kinds) == len(set(kinds)), f"one object per kind expected, got {kinds}"
    return {doc["kind"]: doc for doc in docs}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, dict[str, dict]]:
    return request.param, by_kind(render(K8S / request.param))


def test_builtin_kinds_pass_strict_schema_validation(rendered):
    _, objects = rendered
    for doc in objects.values():
        if (doc["apiVersion"], doc["kind"]) not in CUSTOM_RESOURCES:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_overlay_has_the_full_set_of_objects(rendered):
    _, objects = rendered
    assert set(objects) == {"ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service",
                            "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"}


def _container(objects):
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_probes_use_ready_for_traffic_and_health_for_liveness(rendered):
    _, objects = rendered
    container = _container(objects)
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names


def test_grace_period_covers_pre_stop_and_shutdown_timeout(rendered):
    """Kubernetes SIGKILLs at terminationGracePeriodSeconds, counted from the start of preStop."""
    _, objects = rendered
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    command = _container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    shutdown_timeout = float(objects["ConfigMap"]["data"]["SIFT_SHUTDOWN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + shutdown_timeout + 1


def test_config_and_secret_feed_the_server_environment(rendered):
    _, objects = rendered
    container = _container(objects)
    assert container["envFrom"] == [{"configMapRef": {"name": objects["ConfigMap"]["metadata"]["name"]}}]
    data = objects["ConfigMap"]["data"]
    assert all(key.startswith("SIFT_") for key in data)
    assert data["SIFT_HOST"] == "0.0.0.0"
    assert int(data["SIFT_PORT"]) == container["ports"][0]["containerPort"]
    (api_key,) = [e for e in container["env"] if e["name"] == "SIFT_API_KEY"]
    ref = api_key["valueFrom"]["secretKeyRef"]
    assert ref["name"] == objects["Secret"]["metadata"]["name"]
    assert ref["key"] in objects["Secret"]["stringData"]


def test_models_volume_is_the_pvc_mounted_read_only(rendered):
    _, objects = rendered
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (mount,) = [m for m in _container(objects)["volumeMounts"] if m["mountPath"] == "/models"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == objects["PersistentVolumeClaim"]["metadata"]["name"]
    assert mount["readOnly"] is True


def test_pods_run_as_the_image_non_root_user(rendered):
    _, objects = rendered
    security = objects["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001


def test_selectors_connect_service_pdb_monitor_and_hpa(rendered):
    _, objects = rendered
    deployment = objects["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], objects["Service"]["spec"]["selector"],
                     objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    monitor = objects["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= objects["Service"]["metadata"]["labels"].items()
    service_ports = {p["name"] for p in objects["Service"]["spec"]["ports"]}
    assert {e["port"] for e in monitor["endpoints"]} <= service_ports
    assert [e["path"] for e in monitor["endpoints"]] == ["/metrics"]
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_hpa_scales_on_queue_depth_served_by_the_adapter(rendered):
    _, objects = rendered
    metrics = objects["HorizontalPodAutoscaler"]["spec"]["metrics"]
    names = {m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"}
    sources = hpa_sources(names)
    assert set(sources) == names, f"HPA metrics with no adapter rule: {names - set(sources)}"
    assert set(sources.values()) == {"sift:num_requests_waiting"}
    assert set(sources.values()) <= EXPORTED_METRICS


def test_custom_resources_have_the_operator_structure(rendered):
    """ServiceMonitor and PrometheusRule are CRDs: no schema in kubernetes-validate."""
    _, objects = rendered
    monitor = objects["ServiceMonitor"]
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
    rule = objects["PrometheusRule"]
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"}
        for alert in group["rules"]:
            assert {"alert", "expr"} <= set(alert) <= {"alert", "expr", "for", "labels", "annotations"}


def test_overlays_pick_their_image_and_devices():
    cpu, gpu = (by_kind(render(K8S / "overlays" / name)) for name in ("cpu", "gpu"))
    assert _container(cpu)["image"] == "sift:cpu"
    assert _container(gpu)["image"] == "sift:cuda"
    assert "nvidia.com/gpu" not in str(cpu["Deployment"])
    resources = _container(gpu)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    tolerations = gpu["Deployment"]["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
