"""Every Prometheus collector Sift exposes, in one place.

Collectors live on a per-app ``CollectorRegistry`` (never the process-global one) so that
several servers or tests in one process do not collide. Every series carries a
``model_name`` label. Deployment dashboards and autoscalers are written against these
exact names; rename nothing without updating ``deploy/``.

prometheus_client appends ``_total`` to counter names on exposition, so counters are
declared without it: ``Counter("sift:prompt_tokens")`` is scraped as ``sift:prompt_tokens_total``.
"""
from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                   30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# engine stats() key -> counter name (without the _total suffix prometheus_client adds)
_CUMULATIVE = {
    "prompt_tokens": ("sift:prompt_tokens", "Prefill tokens processed (prompt tokens of admitted requests)."),
    "generation_tokens": ("sift:generation_tokens", "Tokens generated."),
    "num_preemptions": ("sift:num_preemptions", "Requests preempted (recompute) for lack of KV blocks."),
    "prefix_cache_queries": ("sift:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": ("sift:prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    "spec_num_drafts": ("sift:spec_decode_num_drafts", "Speculative drafts verified."),
    "spec_num_draft_tokens": ("sift:spec_decode_num_draft_tokens", "Draft tokens proposed."),
    "spec_num_accepted_tokens": ("sift:spec_decode_num_accepted_tokens", "Draft tokens accepted."),
    "kv_evicted_tokens": ("sift:kv_evicted_tokens", "KV entries dropped by eviction policies."),
    "kv_compactions": ("sift:kv_compactions", "KV compactions performed by eviction policies."),
    "sparse_decode_tokens": ("sift:sparse_decode_tokens", "Decode tokens that attended sparsely (quest, tidal, loki, pruned reads)."),
    "skip_prefill_tokens": ("sift:token_skip_prefill_tokens", "Prompt tokens prefilled with token skipping."),
    "skip_token_blocks": ("sift:token_skip_skipped_blocks", "Token-block computations skipped (attention + MLP)."),
    "structured_requests": ("sift:structured_requests", "Requests admitted with a grammar constraint."),
    "structured_spec_disabled": ("sift:structured_spec_disabled",
                                 "Constrained requests that ran without the speculation they would otherwise use."),
    "structured_mask_seconds": ("sift:structured_mask_seconds",
                                "Seconds spent filling and applying grammar token bitmasks in the sampler."),
}
COMPILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# engine stats() key -> gauge name
_GAUGES = {
    "num_running": ("sift:num_requests_running", "Requests in the running batch."),
    "num_waiting": ("sift:num_requests_waiting", "Requests waiting for admission."),
    "kv_usage": ("sift:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)."),
    "kv_resident_tokens": ("sift:kv_resident_tokens", "KV entries resident in the cache (after eviction)."),
    "kv_logical_tokens": ("sift:kv_logical_tokens", "Tokens the running requests logically hold."),
}


class EngineMetrics:
    """The collectors for one served model, bound to its ``model_name`` label."""

    def __init__(self, model_name: str, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        reg = self.registry

        self._gauges = {key: Gauge(name, doc, labels, registry=reg).labels(model_name)
                        for key, (name, doc) in _GAUGES.items()}
        self._counters = {key: Counter(name, doc, labels, registry=reg).labels(model_name)
                          for key, (name, doc) in _CUMULATIVE.items()}
        self._accepted_per_pos = Counter(
            "sift:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position.", labels + ["position"], registry=reg)
        self._success = Counter(
            "sift:request_success", "Finished requests by finish reason.",
            labels + ["finished_reason"], registry=reg)
        self.ttft = Histogram("sift:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=TTFT_BUCKETS, registry=reg).labels(model_name)
        self.itl = Histogram("sift:inter_token_latency_seconds", "Time between successive outputs of a request.",
                             labels, buckets=ITL_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram("sift:e2e_request_latency_seconds", "Arrival to last token.",
                             labels, buckets=REQUEST_BUCKETS, registry=reg).labels(model_name)
        self.queue_time = Histogram("sift:request_queue_time_seconds",
                                    "Arrival to the start of the step that produced the first token.",
                                    labels, buckets=REQUEST_BUCKETS, registry=reg).labels(model_name)
        self.grammar_compile = Histogram("sift:grammar_compile_seconds",
                                         "Grammar compile time (cache misses; compiled off the engine thread).",
                                         labels, buckets=COMPILE_BUCKETS, registry=reg).labels(model_name)
        self.grammar_cache_hits = Counter("sift:grammar_cache_hits", "Grammar compilations served from the cache.",
                                          labels, registry=reg).labels(model_name)
        # Last cumulative values seen from the engine, to turn them into counter increments.
        self._last: dict = {}
        self._last_per_pos: list = []

    def observe_engine_stats(self, stats: dict) -> None:
        """Set gauges and advance counters from one ``LLMEngine.stats()`` snapshot."""
        for key, gauge in self._gauges.items():
            if key in stats:
                gauge.set(stats[key])
        for key, counter in self._counters.items():
            if key in stats:
                delta = stats[key] - self._last.get(key, 0)
                if delta > 0:
                    counter.inc(delta)
                self._last[key] = stats[key]
        per_pos = list(stats.get("spec_accepted_per_pos", ()))
        for pos, value in enumerate(per_pos):
            prev = self._last_per_pos[pos] if pos < len(self._last_per_pos) else 0
            if value > prev:
                self._accepted_per_pos.labels(self.model_name, str(pos)).inc(value - prev)
        if per_pos:
            self._last_per_pos = per_pos

    def observe_finished(self, finished_reason: str) -> None:
        self._success.labels(self.model_name, finished_reason).inc()
