"""Sampler math on synthetic logits (no model)."""
import math

import torch

from sift.server.engine.request import Request, SamplingParams
from sift.server.runner.sampler import apply_penalties, draw, sample


def _req(params, prompt=(1, 2), output=()):
    r = Request("r", list(prompt), params, eos_token_ids=(0,))
    r.output_token_ids = list(output)
    r.generator = torch.Generator().manual_seed(params.seed or 0)
    return r


def test_penalties():
    logits = torch.tensor([[1.0, 2.0, -2.0, 3.0, 0.5]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                       logit_bias={4: 1.0})
    out = apply_penalties(logits.clone(), [_req(p, prompt=(1, 2), output=(2, 2, 3))])
    # token 1: prompt only -> repetition /2; token 2: negative -> *2, then 2 outputs: -0.5 - 2*0.25
    exp = torch.tensor([[1.0, 1.0, -4.0 - 0.5 - 0.5, 1.5 - 0.5 - 0.25, 1.5]])
    assert torch.allclose(out, exp)


def test_min_tokens_bans_eos():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    r = _req(SamplingParams(max_tokens=4, min_tokens=2, temperature=0.0, stop_token_ids=[2]))
    assert sample(logits, [r]).token_ids == [1]


def test_top_k_top_p_min_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for params, allowed in [
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.7), {0, 1}),
        (SamplingParams(temperature=1.0, min_p=0.25), {0, 1, 2}),
    ]:
        seen = set()
        for s in range(200):
            r = _req(SamplingParams(**{**params.__dict__, "seed": s}))
            seen.add(sample(logits.clone(), [r]).token_ids[0])
        assert seen == allowed, (params, seen)


def test_draw_matches_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    n = 4000
    for _ in range(n):
        counts[draw(probs, g)] += 1
    chi2 = float((((counts - n * probs) ** 2) / (n * probs)).sum())
    assert chi2 < 13.8  # p = 0.001, 2 dof


def test_logprobs_are_raw_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    r = _req(SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=1.5))
    res = sample(logits.clone(), [r])
    lp, top = res.logprobs[0]
    assert math.isclose(lp, float(torch.log_softmax(logits, -1)[0, 0]), rel_tol=1e-6)
    assert [t for t, _ in top] == [0, 1]
