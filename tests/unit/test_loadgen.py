"""The load generator's pure parts: arrivals, SLOs, summary statistics (no server)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from sift.clients import loadgen


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_arrivals_have_the_requested_rate_and_burstiness(burstiness):
    times = np.fromiter(itertools.islice(loadgen.arrival_offsets(50.0, burstiness, seed=1), 20000), float)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


def test_ramp_up_starts_slow_then_reaches_the_rate():
    times = np.fromiter(itertools.islice(loadgen.arrival_offsets(100.0, ramp_up_s=10.0), 3000), float)
    early = np.sum(times < 2.0)
    late = np.sum((times >= 10.0) & (times < 12.0))
    assert early < 0.3 * late and late == pytest.approx(200, rel=0.2)


def test_infinite_rate_sends_everything_at_once():
    assert list(itertools.islice(loadgen.arrival_offsets(math.inf), 3)) == [0.0, 0.0, 0.0]


def test_parse_slo_in_milliseconds_and_rejects_typos():
    assert loadgen.parse_slo("ttft=500,tpot=50") == {"ttft": 0.5, "tpot": 0.05}
    assert loadgen.parse_slo(None) == {}
    with pytest.raises(ValueError, match="ttfb"):
        loadgen.parse_slo("ttfb=5")


def _rec(ttft, e2e, n, ok=True):
    return loadgen.RequestRecord(ok=ok, error="" if ok else "HTTP 500", prompt_tokens=10, output_tokens=n,
                                 ttft=ttft, e2e=e2e, itl=[(e2e - ttft) / max(n - 1, 1)] * (n - 1))


def test_summary_throughput_percentiles_and_goodput():
    records = [_rec(0.1, 1.1, 11), _rec(0.2, 2.2, 11), _rec(1.0, 1.5, 6), _rec(0, 0, 0, ok=False)]
    cfg = loadgen.LoadConfig("http://x", concurrency=2, num_requests=4)
    s = loadgen.summarize(loadgen.RunResult(cfg, records, 4.0, None, None), loadgen.parse_slo("ttft=500,tpot=150"))
    assert (s["completed"], s["failed"], s["errors"]) == (3, 1, ["HTTP 500"])
    assert s["output_throughput"] == pytest.approx(28 / 4) and s["total_token_throughput"] == pytest.approx(58 / 4)
    assert s["tpot_ms"]["median"] == pytest.approx(100) and s["ttft_ms"]["median"] == pytest.approx(200)
    assert s["goodput"] == pytest.approx(1 / 4)  # tpot 200 ms fails the SLO; ttft 1 s fails too
    assert s["server_counters"] is None and s["config"]["rate"] is None


def test_counter_deltas_derive_technique_ratios():
    before = dict.fromkeys(loadgen.COUNTERS, 0.0)
    after = dict(before, spec_decode_num_drafts_total=10, spec_decode_num_draft_tokens_total=40,
                 spec_decode_num_accepted_tokens_total=30, prefix_cache_queries_total=100, prefix_cache_hits_total=25)
    d = loadgen.counter_deltas(before, after)
    assert d["spec_acceptance_rate"] == 0.75 and d["spec_mean_accepted_length"] == 4.0
    assert d["prefix_cache_hit_rate"] == 0.25
