"""The image's exact entrypoint, run on this machine, serves and drains like the container.

The command, environment, working directory and healthcheck all come from the runtime
stage of deploy/Dockerfile; only what cannot exist outside the image is mapped
(see server_process.container_env).
"""

import json
import signal
import subprocess
import threading
import time

import httpx
import pytest

from dockerfile_parse import parse
from server_process import REPO, container_env, free_port, start, stop, wait_ready

RUNTIME = parse(REPO / "deploy" / "Dockerfile")[-1]
NUM_STREAMS = 4


@pytest.fixture(scope="module")
def entrypoint(tmp_path_factory):
    """Start ENTRYPOINT + CMD with the image's ENV; yields (process, base_url, shutdown_timeout, env).

    One server for the module (model load dominates the run time): the drain test,
    last in this file, ends it.
    """
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    env = container_env(RUNTIME, home, port)
    log = home / "server.log"
    proc = start(RUNTIME.command(), env, cwd=home, log=log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base_url, log)
        yield proc, base_url, float(env["SIFT_SHUTDOWN_TIMEOUT"]), env
    finally:
        stop(proc)


def _healthcheck_argv(env: dict) -> list[str]:
    """HEALTHCHECK CMD with the script at its path in the repository instead of the image."""
    argv = json.loads(RUNTIME.last("HEALTHCHECK").split(" CMD ", 1)[1])
    copies = dict(reversed(c.split()) for c in RUNTIME.all("COPY") if not c.startswith("--from="))
    return [str(REPO / copies[a]) if a in copies else a for a in argv]


def test_entrypoint_serves_and_passes_its_healthcheck(entrypoint):
    proc, base_url, _, env = entrypoint
    assert httpx.get(f"{base_url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{base_url}/v1/models", timeout=5).json()["data"]
    check = subprocess.run(_healthcheck_argv(env), env=env, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stderr
    dead_env = dict(env, SIFT_PORT=str(free_port()))
    assert subprocess.run(_healthcheck_argv(dead_env), env=dead_env, timeout=30).returncode == 1


PROMPT = "Write a long story about a dragon who learns to sail."


def _drain_sized_max_tokens(base_url: str, model: str, shutdown_timeout: float) -> int:
    """max_tokens for streams still generating at SIGTERM yet done well within the drain window.

    Decode speed differs by orders of magnitude between machines (and CPU contention), so it
    is measured: one short stream gives the per-token time. Assuming, pessimistically, that
    NUM_STREAMS batched streams decode no faster than one after another, they get half the
    drain window; 4 to 64 tokens.
    """
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        stamps = [time.monotonic() for line in response.iter_lines() if line.startswith("data: {")]
    per_token = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    return int(min(64, max(4, shutdown_timeout / (2 * NUM_STREAMS * per_token))))


def _stream(base_url: str, body: dict, started: threading.Event, result: dict) -> None:
    try:
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as response:
            result["status"] = response.status_code
            events = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    started.set()
            result["events"] = events
    except httpx.HTTPError as error:
        result["error"] = repr(error)
    finally:
        started.set()


def _new_request_refused(base_url: str, model: str) -> bool:
    try:
        response = httpx.post(f"{base_url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1},
                              timeout=10)
    except httpx.ConnectError:
        return True
    return response.status_code == 503


def test_sigterm_drains_in_flight_streams_and_exits_zero(entrypoint):
    proc, base_url, shutdown_timeout, _ = entrypoint
    model = httpx.get(f"{base_url}/v1/models", timeout=5).json()["data"][0]["id"]
    body = {"model": model, "prompt": PROMPT, "temperature": 0, "stream": True,
            "max_tokens": _drain_sized_max_tokens(base_url, model, shutdown_timeout)}
    streams = []
    for _ in range(NUM_STREAMS):
        started, result = threading.Event(), {}
        thread = threading.Thread(target=_stream, args=(base_url, body, started, result))
        thread.start()
        streams.append((thread, started, result))
    for _, started, _ in streams:
        assert started.wait(timeout=60), "a stream produced no chunk"

    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:  # the signal is handled asynchronously: wait until the server says it drains
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 503:
                break
        except httpx.ConnectError:
            break
        assert time.monotonic() < deadline, "/ready still 200 ten seconds after SIGTERM"
        time.sleep(0.05)
    still_streaming = sum(thread.is_alive() for thread, _, _ in streams)
    assert _new_request_refused(base_url, model)

    for thread, _, _ in streams:
        thread.join(timeout=shutdown_timeout + 10)
    assert proc.wait(timeout=shutdown_timeout + 10) == 0
    assert still_streaming, "every stream had finished before the drain began: the test proved nothing"
    for _, _, result in streams:
        assert "error" not in result, result["error"]
        assert result["status"] == 200
        events = result["events"]
        assert events[-1] == "[DONE]"
        finish = [json.loads(e)["choices"][0].get("finish_reason") for e in events[:-1]]
        assert finish[-1] in {"length", "stop"}, finish[-1]
