"""Must-shows 3 and 4: 50 concurrent streams equal solo runs; a disconnect frees its request."""
from __future__ import annotations

import asyncio
import json
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


def test_disconnect_mid_stream_aborts_and_frees_kv(server, model_name, read_metric):
    metric = read_metric
    kv_before = metric(server, "sift:kv_cache_usage_perc")
    aborted_before = metric(server, "sift:request_success_total", finished_reason="abort")
    body = {"model": model_name, "prompt": "Tell me a long story about a dragon.", "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        received = 0
        while received < 2:
            line = next(lines)
            received += line.startswith("data: {")
        assert metric(server, "sift:num_requests_running") == 1
        assert metric(server, "sift:kv_cache_usage_perc") > kv_before
    # Leaving the block closed the connection: the request must be aborted long before 400 tokens.
    assert _wait_for(lambda: metric(server, "sift:num_requests_running") == 0)
    assert metric(server, "sift:kv_cache_usage_perc") == kv_before
    assert metric(server, "sift:request_success_total", finished_reason="abort") == aborted_before + 1


def test_disconnect_while_waiting_for_non_streamed_reply(server, model_name, read_metric):
    metric = read_metric
    kv_before = metric(server, "sift:kv_cache_usage_perc")
    body = {"model": model_name, "prompt": "Write an essay about rivers.", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}
    try:
        httpx.post(server.v1 + "/completions", json=body, timeout=httpx.Timeout(120, read=4.0))
        raise AssertionError("400 tokens should not finish within the read timeout")
    except httpx.ReadTimeout:
        pass
    assert _wait_for(lambda: metric(server, "sift:num_requests_running") == 0)
    assert metric(server, "sift:kv_cache_usage_perc") == kv_before
