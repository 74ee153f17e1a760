"""Start a Sift server as a subprocess the way a container would, and wait for it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from dockerfile_parse import Stage

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def container_env(stage: Stage, home: Path, port: int) -> dict[str, str]:
    """The image's ENV, made to run on this machine.

    The image's virtualenv (/opt/venv) is this interpreter's environment and its home
    (/home/sift) is ``home``; the server listens on 127.0.0.1:``port`` instead of
    0.0.0.0:8000. SIFT_* variables of the calling shell are dropped so only the
    image's configuration applies.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIFT_")}
    for key, value in stage.env().items():
        value = value.replace("$PATH", os.environ.get("PATH", ""))
        value = value.replace("/opt/venv", sys.prefix).replace("/home/sift", str(home))
        env[key] = value
    env.update(HOME=str(home), SIFT_HOST="127.0.0.1", SIFT_PORT=str(port))
    return env


def start(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start ``argv``; the first word is resolved on ``env``'s PATH, as `docker run` does."""
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, base_url: str, log: Path, timeout: float = 120.0) -> None:
    """Poll /ready until 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"server not ready after {timeout} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
