"""Every metric the dashboard, alert rules and HPA/adapter read is one the server exports."""

import subprocess
import sys

import httpx
import pytest

from metric_refs import EXPORTED_METRICS, exposed_names, referenced_names
from server_process import REPO, free_port, stop, wait_ready


def test_references_are_in_the_exported_metric_contract():
    for source, names in referenced_names().items():
        assert names, f"{source} reads no sift metric"
        assert names <= EXPORTED_METRICS, f"{source}: {sorted(names - EXPORTED_METRICS)}"


def test_exposed_names_expand_declared_metrics():
    exposition = "\n".join([
        "# HELP sift:x_seconds x", "# TYPE sift:x_seconds histogram",
        "# TYPE sift:y_total counter",
        "# TYPE sift:z gauge", 'sift:z{model_name="m"} 1.0',
    ])
    assert exposed_names(exposition) == {"sift:x_seconds", "sift:x_seconds_bucket", "sift:x_seconds_sum",
                                         "sift:x_seconds_count", "sift:y_total", "sift:z"}


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sift.server", "serve", "--port", str(port)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base_url, log)
        yield base_url
    finally:
        stop(proc)


def test_references_exist_on_a_live_metrics_endpoint(live_server):
    model = httpx.get(f"{live_server}/v1/models", timeout=10).json()["data"][0]["id"]
    # One finished request, so labelled metrics have children and samples, not just TYPE lines.
    response = httpx.post(f"{live_server}/v1/completions",
                          json={"model": model, "prompt": "Hello", "max_tokens": 4}, timeout=60)
    assert response.status_code == 200, response.text
    metrics = httpx.get(f"{live_server}/metrics", timeout=10)
    assert metrics.status_code == 200
    exposed = exposed_names(metrics.text)
    for source, names in referenced_names().items():
        assert names <= exposed, f"{source} reads metrics the server does not export: {sorted(names - exposed)}"
