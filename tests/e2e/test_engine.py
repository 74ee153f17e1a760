"""Engine-level behaviour on the real embedded model: batching, prefix cache, preemption,
block accounting, seeded sampling, bad input."""
from __future__ import annotations

import pytest
from pydoc_data.topics import topics

from sift.server.engine.llm import LLM
from sift.server.engine.request import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


def _prompts(tok, n: int) -> list:
    """n real prompts of mixed lengths (3..~200 tokens) cut from CPython's pydoc topics."""
    keys = sorted(topics)
    out = []
    for i in range(n):
        ids = tok.encode(topics[keys[(i * 7) % len(keys)]], add_special_tokens=False)
        out.append(ids[: 3 + (i * 37) % 200])
    return out


@pytest.fixture(scope="module")
def llm():
    # float32 on every device: these exactness checks compare batch shapes, which bfloat16 rounds differently
    return LLM(dtype="float32", num_blocks=1200, max_num_batched_tokens=2048)


@pytest.fixture(scope="module")
def prompts(llm):
    return _prompts(llm.tokenizer, 16)


@pytest.fixture(scope="module")
def solo(llm, prompts):
    return [llm.generate([p], GREEDY)[0].token_ids for p in prompts]


def _free(llm) -> int:
    return llm.engine.kv.num_free_blocks


def test_batch_invariance(llm, prompts, solo):
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == solo


def test_batch_invariance_small_chunks(prompts, solo):
    small = LLM(dtype="float32", num_blocks=1200, max_num_batched_tokens=32)
    outs = small.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == solo
    assert small.engine.kv.num_requests == 0


def test_prefix_cache_hit_identical(llm):
    doc = llm.tokenizer.encode(topics["assignment"], add_special_tokens=False)[:300]
    a = llm.generate([doc + [13]], GREEDY)[0]
    hits_before = llm.engine.kv.stats["prefix_cache_hits"]
    b = llm.generate([doc + [13]], GREEDY)[0]
    assert llm.engine.kv.stats["prefix_cache_hits"] > hits_before
    assert b.num_cached_tokens >= 256
    assert a.token_ids == b.token_ids


def test_preemption_keeps_outputs(prompts, solo):
    # 40 blocks of 16 tokens cannot hold 16 requests of up to ~220 tokens at once
    tight = LLM(dtype="float32", num_blocks=40, block_size=16, max_model_len=512)
    outs = tight.generate(prompts, GREEDY)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == solo
    assert tight.engine.kv.num_free_blocks == 39  # all but the null block


def test_blocks_return_after_finish_and_abort(llm, prompts):
    start = _free(llm)
    eng = llm.engine
    for i, p in enumerate(prompts[:6]):
        eng.add_request(f"acc-{i}", p, SamplingParams(max_tokens=8, temperature=0.0))
    eng.step()
    eng.abort_request("acc-0")
    eng.step()
    eng.abort_request("acc-3")
    while eng.has_unfinished_requests():
        eng.step()
    eng.abort_request("acc-4")  # already finished: a no-op
    eng.step()
    assert _free(llm) == start
    assert eng.kv.num_requests == 0


def test_seeded_sampling_independent_of_batch(llm, prompts):
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = llm.generate([prompts[3]], sp)[0].token_ids
    mixed = llm.generate([prompts[0], prompts[3], prompts[5]],
                         [SamplingParams(max_tokens=12, temperature=1.0, seed=7), sp,
                          SamplingParams(max_tokens=5, temperature=0.0)])
    assert mixed[1].token_ids == alone
    again = llm.generate([prompts[3]], sp)[0].token_ids
    assert again == alone


def test_stop_strings_and_token_ids(llm, prompts):
    full = llm.generate([prompts[2]], SamplingParams(max_tokens=24, temperature=0.0))[0]
    stop = full.text[5:8]
    assert stop
    cut = llm.generate([prompts[2]], SamplingParams(max_tokens=24, temperature=0.0, stop=stop))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    tid = full.token_ids[3]
    by_id = llm.generate([prompts[2]], SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[tid]))[0]
    assert by_id.token_ids == full.token_ids[: full.token_ids.index(tid) + 1]
    assert by_id.finish_reason == "stop"


def test_logprobs_and_prompt_logprobs(llm, prompts):
    out = llm.generate([prompts[1]], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3,
                                                    prompt_logprobs=2))[0]
    assert len(out.logprobs) == 4
    for tok, (lp, top) in zip(out.token_ids, out.logprobs):
        assert len(top) == 3 and top[0][0] == tok and abs(top[0][1] - lp) < 1e-5
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompts[1])


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"stop": 5}, "stop"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_requests_rejected_before_queueing(llm):
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="context length"):
        llm.generate(["hello"], SamplingParams(max_tokens=llm.engine.max_model_len))
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(["hello"], SamplingParams(max_tokens=2, logit_bias={10**7: 1.0}))
    assert llm.engine.kv.num_requests == 0 and not llm.engine.has_unfinished_requests()


def test_bad_request_does_not_break_batch(llm, prompts):
    eng = llm.engine
    eng.add_request("good", prompts[0], GREEDY)
    with pytest.raises(ValueError):
        eng.add_request("bad", [eng.vocab_size + 5], GREEDY)
    toks = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            toks.extend(o.new_token_ids)
    assert toks == llm.generate([prompts[0]], GREEDY)[0].token_ids


def test_penalties_and_bias_change_output(llm, prompts):
    base = llm.generate([prompts[4]], SamplingParams(max_tokens=8, temperature=0.0))[0].token_ids
    banned = llm.generate([prompts[4]], SamplingParams(max_tokens=8, temperature=0.0,
                                                       logit_bias={base[0]: -100}))[0].token_ids
    assert banned[0] != base[0]
    forced = llm.generate([prompts[4]], SamplingParams(max_tokens=3, temperature=0.0,
                                                       logit_bias={42: 100}))[0].token_ids
    assert forced == [42, 42, 42]


def test_identical_prompts_share_kv_by_fork(llm, prompts):
    start = _free(llm)
    forks = llm.engine.scheduler.num_forks
    p = prompts[7]
    sp = SamplingParams(max_tokens=12, temperature=0.8, seed=11)
    solo = llm.generate([p], sp)[0].token_ids
    outs = llm.generate([p, p, p], [GREEDY, sp, GREEDY])
    assert llm.engine.scheduler.num_forks >= forks + 2
    assert outs[0].token_ids == outs[2].token_ids == llm.generate([p], GREEDY)[0].token_ids
    assert outs[1].token_ids == solo
    assert _free(llm) == start
