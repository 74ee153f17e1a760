"""Must-shows 5, 6 and 7: error statuses and bodies, metrics that move, graceful SIGTERM.

The SIGTERM test stops the module's restricted server, so it stays the last test here.
"""
from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from sift.clients.sdk import AuthenticationError, Client, NotFoundError, RateLimitError

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"

ERROR_CASES = [
    # (case, path, body (dict, or raw bytes), status, param)
    ("malformed json", COMPLETIONS, b'{"prompt": "hi", ', 400, None),
    ("max_tokens wrong type", COMPLETIONS, {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("prompt wrong type", COMPLETIONS, {"prompt": {"text": "hi"}}, 400, "prompt.str"),
    ("negative max_tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("temperature below zero", COMPLETIONS, {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("oversized prompt", COMPLETIONS, {"prompt": "hello " * 600, "max_tokens": 4}, 400, None),
    ("max_tokens beyond context", CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
     400, "max_tokens"),
    ("typo inside a technique option", COMPLETIONS, {"prompt": "hi", "kv_eviction": {"method": "h2o", "budgett": 8}},
     400, "kv_eviction.budgett"),
    ("unknown technique method", COMPLETIONS, {"prompt": "hi", "speculative": {"method": "magic"}}, 400,
     "speculative.method"),
    ("negative technique option", COMPLETIONS, {"prompt": "hi", "sparsity": {"method": "tidal", "recent": -1}}, 400,
     "sparsity.recent"),
    ("zero-dimension key sketches", COMPLETIONS, {"prompt": "hi", "sparsity": {"method": "loki", "rank": 0}}, 400,
     "sparsity.rank"),
    ("re-selection layer past the model's layers", COMPLETIONS,
     {"prompt": "hi", "sparsity": {"method": "tidal", "reselection_layer": [3, 99]}}, 400,
     "sparsity.reselection_layer.1"),
    ("unknown model", COMPLETIONS, {"prompt": "hi", "model": "gpt-4o"}, 404, "model"),
]


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in response.text
    return error


@pytest.mark.parametrize("case,path,body,status,param", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_table(server, case, path, body, status, param):
    if isinstance(body, bytes):
        response = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(server.url + path, json=body, timeout=60)
    error = assert_openai_error(response, status)
    assert error["param"] == param
    if case in ("oversized prompt", "max_tokens beyond context"):
        assert "context length" in error["message"]


def test_metrics_exposed_and_moving(server, model_name, read_metric):
    text = httpx.get(server.url + "/metrics").text
    for name in ("sift:num_requests_running", "sift:num_requests_waiting", "sift:kv_cache_usage_perc",
                 "sift:prompt_tokens_total", "sift:generation_tokens_total", "sift:num_preemptions_total",
                 "sift:prefix_cache_queries_total", "sift:prefix_cache_hits_total",
                 "sift:time_to_first_token_seconds_bucket", "sift:inter_token_latency_seconds_bucket",
                 "sift:e2e_request_latency_seconds_bucket", "sift:request_queue_time_seconds_bucket",
                 "sift:spec_decode_num_drafts_total", "sift:kv_evicted_tokens_total", "sift:kv_resident_tokens"):
        assert f'\n{name}{{' in text, name
    names = ["sift:time_to_first_token_seconds_count", "sift:e2e_request_latency_seconds_count",
             "sift:request_queue_time_seconds_count", "sift:inter_token_latency_seconds_count",
             "sift:generation_tokens_total", "sift:prompt_tokens_total"]
    before = {n: read_metric(server, n) for n in names}
    success_before = read_metric(server, "sift:request_success_total", finished_reason="length")
    prompts = ["Count: 1, 2,", "Colours: red,", "Fruit: apple,"]
    for prompt in prompts:
        r = httpx.post(server.v1 + "/completions", timeout=60, json={
            "model": model_name, "prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200
    prompt_tokens = sum(len(httpx.post(server.url + "/tokenize", json={"prompt": p}).json()["tokens"])
                        for p in prompts)
    delta = {n: read_metric(server, n) - before[n] for n in names}
    assert delta["sift:time_to_first_token_seconds_count"] == len(prompts)
    assert delta["sift:e2e_request_latency_seconds_count"] == len(prompts)
    assert delta["sift:request_queue_time_seconds_count"] == len(prompts)
    assert delta["sift:inter_token_latency_seconds_count"] == 2 * len(prompts)
    assert delta["sift:generation_tokens_total"] == 3 * len(prompts)
    assert delta["sift:prompt_tokens_total"] == prompt_tokens
    assert read_metric(server, "sift:request_success_total", finished_reason="length") == success_before + 3


def test_api_key_required_except_probes(restricted_server):
    url = restricted_server.url
    assert httpx.get(url + "/health").status_code == 200
    assert_openai_error(httpx.get(url + "/v1/models"), 401)
    assert_openai_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    assert httpx.get(url + "/v1/models", headers=restricted_server.headers()).status_code == 200
    with pytest.raises(AuthenticationError):
        Client(restricted_server.v1, api_key="nope", max_retries=0).models.list()
    with pytest.raises(NotFoundError):
        Client(restricted_server.v1, api_key=restricted_server.api_key).completions.create(model="x", prompt="hi")


def _first_token(response: httpx.Response):
    """Read up to the first token; the returned iterator must stay referenced: when httpx's
    line iterator is garbage-collected it closes the connection, which the server (rightly)
    treats as a client disconnect."""
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: {"):
            return lines


def test_full_queue_is_429_with_retry_after(restricted_server):
    """One running sequence, a queue of one: a third request is turned away."""
    url, headers = restricted_server.v1 + "/completions", restricted_server.headers()
    body = {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=120, headers=headers) as http:
        with http.stream("POST", url, json=body) as running:
            lines = _first_token(running)
            with http.stream("POST", url, json=body) as waiting:
                assert waiting.status_code == 200  # admitted to the waiting queue
                rejected = http.post(url, json={**body, "stream": False})
                error = assert_openai_error(rejected, 429)
                assert error["type"] == "rate_limit_error"
                assert float(rejected.headers["retry-after"]) > 0
                with pytest.raises(RateLimitError):
                    Client(restricted_server.v1, api_key=restricted_server.api_key, max_retries=0) \
                        .completions.create(prompt="hi", max_tokens=2)
            assert next(line for line in lines if line.startswith("data: {"))  # still streaming


def _seconds_per_token(srv, headers: dict) -> float:
    """The server's decode time per token, from the chunk arrivals of one short stream."""
    body = {"prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv.v1 + "/completions", json=body, headers=headers, timeout=120) as r:
        stamps = [time.monotonic() for line in r.iter_lines() if line.startswith("data: {")]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def test_sigterm_drains_in_flight_then_exits_zero(restricted_server, read_metric):
    srv, headers = restricted_server, restricted_server.headers()
    # long enough (about 2 s, at most 400 tokens of the 512 context) to be still generating when the drain
    # begins on a server of any speed, short enough to drain well within --shutdown-timeout
    max_tokens = int(min(400, max(8, 2.0 / _seconds_per_token(srv, headers))))
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", srv.v1 + "/completions", json=body, headers=headers, timeout=120) as r:
        lines = r.iter_lines()
        chunks = []
        for line in lines:
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                break
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/ready").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # the drain has begun: the stream must still be generating, else the test proved nothing
        assert read_metric(srv, "sift:num_requests_running") == 1, "the stream had finished before the drain"
        refused = httpx.post(srv.v1 + "/completions", json={"prompt": "hi", "max_tokens": 2}, headers=headers)
        assert assert_openai_error(refused, 503)["code"] == "draining"
        rest = list(lines)
    chunks += [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
    assert "data: [DONE]" in rest
    assert len(chunks) == max_tokens and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert srv.proc.wait(60) == 0
