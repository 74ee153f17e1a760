"""Smoke test of the load generator against a real Sift server in a subprocess: what it
measures must agree with what the server counted (tokens, requests) on its /metrics."""
from __future__ import annotations

import pytest

from sift.bench.compare import ServerSpec, free_port, launched
from sift.clients import loadgen

PROSE = ("The quick brown fox jumps over the lazy dog while the cat watches from the window.",
         "In the beginning the universe was created. This has made a lot of people very angry.",
         "def fibonacci(n):\n    if n < 2:\n        return n\n",
         "Paged attention stores keys and values in fixed-size blocks")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import sys

    spec = ServerSpec("sift", (sys.executable, "-m", "sift.server", "serve", "--host", "127.0.0.1", "--port", "{port}",
                               "--log-level", "warning"), "/ready")
    with launched(spec, free_port(), str(tmp_path_factory.mktemp("sift") / "server.log"), timeout_s=120) as url:
        yield url


def _check_against_server(result: loadgen.RunResult, n: int) -> dict:
    summary = loadgen.summarize(result, loadgen.parse_slo("ttft=60000,tpot=60000"))
    counted = summary["server_counters"]
    assert summary["completed"] == n and summary["failed"] == 0, summary["errors"]
    assert counted["request_success_total"] == n
    assert counted["generation_tokens_total"] == summary["total_output_tokens"]
    assert counted["prompt_tokens_total"] == summary["total_input_tokens"]
    assert summary["goodput"] == pytest.approx(summary["request_throughput"])  # the SLO is loose
    for rec in result.records:
        assert 0 < rec.ttft <= rec.e2e
        assert len(rec.itl) <= rec.output_tokens - 1  # a chunk may carry several tokens
    return summary


def test_fixed_concurrency_completions_match_server_counters(server):
    specs = [loadgen.RequestSpec(p, max_tokens=3 + i) for i, p in enumerate(PROSE)]
    result = loadgen.run(loadgen.LoadConfig(server, concurrency=2, num_requests=4), specs, progress=False)
    summary = _check_against_server(result, 4)
    assert summary["total_output_tokens"] == sum(s.max_tokens for s in specs)  # EOS ignored
    assert summary["ttft_ms"]["p99"] >= summary["ttft_ms"]["median"]


def test_poisson_chat_with_shared_system_prompt_matches_server_counters(server):
    specs = [loadgen.RequestSpec(p, max_tokens=4, system=PROSE[1] * 4) for p in PROSE[:3]]
    # one in flight at a time, so the later requests find the system prompt's blocks cached
    cfg = loadgen.LoadConfig(server, endpoint="chat", rate=20.0, burstiness=0.5, max_concurrency=1, num_requests=3,
                             ignore_eos=False)
    summary = _check_against_server(loadgen.run(cfg, specs, progress=False), 3)
    assert summary["server_counters"]["prefix_cache_hits_total"] > 0
