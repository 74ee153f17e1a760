"""Real servers for the API tests: ``python -m sift.server serve`` subprocesses on free ports,
serving the embedded model with a small KV pool."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_MODEL_LEN = 512
SMALL_POOL = ["--num-kv-blocks", "160", "--max-model-len", str(MAX_MODEL_LEN), "--log-level", "warning"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    api_key: str | None = None
    log_path: str = ""

    def log(self) -> str:
        return Path(self.log_path).read_text()[-4000:]

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(*extra: str, api_key: str | None = None, timeout: float = 240.0) -> ServerProcess:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SIFT_API_KEY", None)
    if api_key:
        env["SIFT_API_KEY"] = api_key  # through the env twin, to exercise it
    log = tempfile.NamedTemporaryFile("w+", prefix="sift-server-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "sift.server", "serve", "--port", str(port), *SMALL_POOL, *extra],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", api_key, log.name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError("server did not become ready in time")


@pytest.fixture(scope="session")
def server():
    srv = start_server()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def model_name(server) -> str:
    return httpx.get(server.v1 + "/models").json()["data"][0]["id"]


def metric_samples(server: ServerProcess) -> dict:
    """``{(name, frozenset(labels)): value}`` from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "model_name")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(server: ServerProcess, name: str, **labels) -> float:
    return metric_samples(server).get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="session")
def read_metric():
    """``read_metric(server, name, **labels)``: one sample's current value (0 when absent)."""
    return metric


API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def restricted_server():
    """A second server: API key (set through SIFT_API_KEY), one running sequence, a queue of one."""
    srv = start_server("--max-num-seqs", "1", "--max-queued-requests", "1", "--shutdown-timeout", "120",
                       api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def launch_server():
    """``start_server`` for a module that needs a server with its own flags (in a module-scoped fixture)."""
    return start_server
