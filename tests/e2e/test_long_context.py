"""Sparse decode attention, windowed attention and token skipping on the embedded model: exact when the
budget covers the context, bounded memory with a window, and batch-invariant in a mixed batch."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from pydoc_data.topics import topics

from sift.server.engine.llm import LLM
from sift.server.engine.request import SamplingParams
from sift.server.options import SkipOptions, SparsityOptions

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0)
SKIP = SkipOptions(method="spts", min_prompt_len=128, start_layer=6, ratio=0.5, probe_tokens=16)


@pytest.fixture(scope="module")
def llm():
    # float32 on every device: these exactness checks compare batch shapes, which bfloat16 rounds differently
    return LLM(dtype="float32", num_blocks=600, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def doc(llm):
    text = topics["assignment"] + topics["for"]
    return llm.tokenizer.encode(text, add_special_tokens=False)[:200]


@pytest.fixture(scope="module")
def dense(llm, doc):
    return llm.generate([doc], GREEDY)[0]


def _logprobs(out):
    return [lp for lp, _ in out.logprobs]


@pytest.mark.parametrize("opts", [SparsityOptions(method="tidal", budget=1024),
                                  SparsityOptions(method="tidal", budget=1024, candidates=2048),
                                  SparsityOptions(method="quest", budget=1024),
                                  SparsityOptions(method="loki", budget=1024),
                                  SparsityOptions(method="loki", budget=1024, candidates=2048, rank=4),
                                  SparsityOptions(method="window", window=1024, sinks=4)],
                         ids=["tidal", "tidal-rerank", "quest", "loki", "loki-rerank", "window"])
def test_budget_covering_the_context_equals_dense(llm, doc, dense, opts):
    out = llm.generate([doc], replace(GREEDY, sparsity=opts))[0]
    assert out.token_ids == dense.token_ids
    assert _logprobs(out) == pytest.approx(_logprobs(dense), abs=1e-4)


def test_skip_ratio_zero_is_dense(llm, doc, dense):
    out = llm.generate([doc], replace(GREEDY, skipping=replace(SKIP, ratio=0.0)))[0]
    assert out.token_ids == dense.token_ids
    assert _logprobs(out) == pytest.approx(_logprobs(dense), abs=1e-5)


def test_mixed_batch_gives_each_request_its_solo_tokens(llm, doc):
    params = [GREEDY,
              replace(GREEDY, sparsity=SparsityOptions(method="tidal", budget=48)),
              replace(GREEDY, sparsity=SparsityOptions(method="tidal", budget=32, candidates=96)),
              replace(GREEDY, sparsity=SparsityOptions(method="quest", budget=48)),
              replace(GREEDY, sparsity=SparsityOptions(method="loki", budget=32, rank=8)),
              replace(GREEDY, sparsity=SparsityOptions(method="loki", budget=32, rank=4, candidates=64)),
              replace(GREEDY, skipping=SKIP),
              replace(GREEDY, sparsity=SparsityOptions(method="window", window=48, sinks=4))]
    prompts = [doc[i * 7:] for i in range(len(params))]  # distinct prompts: no prefix sharing between them
    solo = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    together = llm.generate(prompts, params)
    assert [o.token_ids for o in together] == solo
    assert all(s != solo[0] for s in solo[1:7])  # every lossy method changed something
    assert llm.engine.kv.num_requests == 0


@pytest.mark.slow  # ~minutes on 2 CPU cores; bench/long_context.py reports the same peak (window_kv_blocks)
def test_window_bounds_kv_blocks_over_2000_tokens():
    llm = LLM(dtype="float32", num_blocks=600, max_num_batched_tokens=512)
    eng = llm.engine
    params = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True,
                            sparsity=SparsityOptions(method="window", window=64, sinks=4))
    eng.add_request("w", list(range(100, 140)), params)
    peak = 0
    while eng.has_unfinished_requests():
        eng.step()
        peak = max(peak, eng.kv.pool.num_blocks - 1 - eng.kv.num_free_blocks)
    assert peak <= 1 + 64 // eng.kv.block_size + 2


def test_server_default_skipping_and_technique_counters():
    from sift.server.config import CacheConfig, EngineConfig, SchedulerConfig
    from sift.server.options import SkipOptions

    config = EngineConfig(cache=CacheConfig(num_blocks=600), scheduler=SchedulerConfig(max_num_batched_tokens=512),
                          skipping=SkipOptions(method="spts", ratio=0.5, start_layer=4, min_prompt_len=256,
                                               schedule="geometric", probe_tokens=16, recent=64))
    llm = LLM(config=config)
    opts = llm.engine.techniques["skipping"].default
    assert (opts.schedule, opts.probe_tokens, opts.recent) == ("geometric", 16, 64)
    prompt = llm.tokenizer.encode(topics["assignment"], add_special_tokens=False)[:400]
    llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0,
                                          sparsity=SparsityOptions(method="tidal", budget=64)))
    stats = llm.engine.stats()
    assert stats["skip_prefill_tokens"] == len(prompt)  # the server default applied to a request without options
    assert stats["skip_token_blocks"] > 0
    assert stats["sparse_decode_tokens"] == 3  # every decode step after the first token
    llm.generate([prompt[:200]], SamplingParams(max_tokens=2, temperature=0.0))  # shorter than min_prompt_len
    assert llm.engine.stats()["skip_prefill_tokens"] == len(prompt)


def _kv_rows(engine, rid, positions):
    """K of every layer at the given positions of a pristine request: [L, n, Hkv, D]."""
    table, bs = engine.kv.block_table(rid), engine.kv.block_size
    slots = [table[p // bs] * bs + p % bs for p in positions]
    return torch.stack([k[slots] for k, _ in engine.runner.kv_caches])


def test_tidal_kv_correction_rewrites_generated_kv_densely(llm, doc):
    """Every T generated tokens the request re-encodes them in one dense chunk: their K then equals a dense
    prefill of the same tokens, while without correction the sparse layers leave them different."""
    engine, prompt, t = llm.engine, doc[:160], 8

    def generated_k(interval):
        rid = f"tidal-kvc-{interval}"
        opts = SparsityOptions(method="tidal", budget=16, correction_interval=interval)
        engine.add_request(rid, prompt, SamplingParams(max_tokens=4 * t, temperature=0.0, ignore_eos=True,
                                                       sparsity=opts))
        req = engine.scheduler.requests[rid]
        while req.num_computed_tokens < len(prompt) + 2 * t + 1:
            engine.step()
        positions = list(range(len(prompt), len(prompt) + 2 * t))
        rows, tokens = _kv_rows(engine, rid, positions), list(req.token_ids)
        engine.abort_request(rid)
        engine.step()
        return rows, tokens[:len(prompt) + 2 * t]

    def dense_k(tokens):
        engine.add_request("dense-ref", tokens, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=0))
        engine.step()  # the whole prefill in one step (prompt_logprobs: no prefix-cache reuse)
        rows = _kv_rows(engine, "dense-ref", list(range(len(prompt), len(tokens))))
        engine.abort_request("dense-ref")
        engine.step()
        return rows

    corrected, tokens = generated_k(t)
    torch.testing.assert_close(corrected, dense_k(tokens), rtol=1e-3, atol=1e-3)
    sparse, tokens = generated_k(0)
    assert (sparse - dense_k(tokens)).abs().amax() > 1e-2
    assert engine.kv.num_requests == 0
