"""Must-shows 3 and 4: 50 concurrent streams equal solo runs; a disconnect frees its request.

The disconnect tests hang up as soon as the server reports the request running, never after a fixed time,
and ask for nearly the whole context, so that they hold on a server of any speed; a request that finished
before the hang-up fails the test by name instead of passing it vacuously."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx

PROMPTS = ["One, two, three,", "The sky is", "def add(a, b):", "Paris is the capital of", "Water boils at"]
MAX_TOKENS = 4


async def _stream_text(client: httpx.AsyncClient, url: str, body: dict) -> str:
    text = ""
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
    return text


def test_50_concurrent_streams_match_solo_runs(server, model_name):
    url = server.v1 + "/completions"

    def body(prompt: str) -> dict:
        return {"model": model_name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}

    solo = {p: httpx.post(url, json=body(p), timeout=120).json()["choices"][0]["text"] for p in PROMPTS}

    async def run_all() -> list[str]:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=60)) as client:
            return await asyncio.gather(*(_stream_text(client, url, body(PROMPTS[i % len(PROMPTS)]))
                                          for i in range(50)))

    results = asyncio.run(run_all())
    assert results == [solo[PROMPTS[i % len(PROMPTS)]] for i in range(50)]


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# max_tokens of the requests the tests hang up on: nearly the test servers' context (conftest.MAX_MODEL_LEN = 512),
# the prompts being shorter than 32 tokens
LONG = 480


def test_disconnect_mid_stream_aborts_and_frees_kv(server, model_name, read_metric):
    metric = read_metric
    kv_before = metric(server, "sift:kv_cache_usage_perc")
    aborted_before = metric(server, "sift:request_success_total", finished_reason="abort")
    body = {"model": model_name, "prompt": "Tell me a long story about a dragon.", "max_tokens": LONG,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        received = 0
        while received < 2:
            line = next(lines)
            received += line.startswith("data: {")
        assert metric(server, "sift:num_requests_running") == 1
        assert metric(server, "sift:kv_cache_usage_perc") > kv_before
    # Leaving the block closed the connection: the request must be aborted, not run to its length.
    assert _wait_for(lambda: metric(server, "sift:num_requests_running") == 0)
    assert metric(server, "sift:kv_cache_usage_perc") == kv_before
    assert metric(server, "sift:request_success_total", finished_reason="abort") == aborted_before + 1


def _post_raw(url: str, body: dict) -> socket.socket:
    """Send a POST on a socket of our own and return it unread: closing it is the client hanging up."""
    u = httpx.URL(url)
    payload = json.dumps(body).encode()
    head = (f"POST {u.raw_path.decode()} HTTP/1.1\r\nHost: {u.host}:{u.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    sock = socket.create_connection((u.host, u.port), timeout=30)
    sock.sendall(head + payload)
    return sock


def test_disconnect_while_waiting_for_non_streamed_reply(server, model_name, read_metric):
    metric = read_metric
    kv_before = metric(server, "sift:kv_cache_usage_perc")
    aborted_before = metric(server, "sift:request_success_total", finished_reason="abort")
    body = {"model": model_name, "prompt": "Write an essay about rivers.", "max_tokens": LONG, "temperature": 0,
            "ignore_eos": True}
    sock = _post_raw(server.v1 + "/completions", body)
    try:
        assert _wait_for(lambda: metric(server, "sift:num_requests_running") == 1), "the request never ran"
        sock.setblocking(False)
        try:
            early = sock.recv(1)
        except BlockingIOError:
            early = b""
        assert not early, f"the server answered all {LONG} tokens before the client hung up: nothing tested"
    finally:
        sock.close()
    assert _wait_for(lambda: metric(server, "sift:num_requests_running") == 0)
    assert metric(server, "sift:kv_cache_usage_perc") == kv_before
    assert metric(server, "sift:request_success_total", finished_reason="abort") == aborted_before + 1
