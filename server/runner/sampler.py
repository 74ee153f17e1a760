"""Batched sampling: penalties, logit bias, temperature, top-k/top-p/min-p, seeded draws, logprobs.

Logprobs are reported from the raw model distribution (log_softmax of the
logits before penalties and temperature), as vLLM does by default.

Grammar constraints: rows whose request carries a ``GrammarState`` (``req.grammar``) get
their token bitmask applied after the penalties (``sift.server.structured.masks``), and their matcher
advances by the chosen token; the other rows are untouched.

Reproducibility: each request owns a CPU ``torch.Generator``; its random draw is
made from that generator alone (an exponential race over the vocabulary), so a
seeded request samples the same tokens whatever its batch mates are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sift.server.engine.request import Request
from sift.server.structured.masks import apply_masks

Tensor = torch.Tensor


@dataclass
class SampleResult:
    token_ids: list  # one per row
    logprobs: Optional[list]  # per row: (logprob of the chosen token, [(id, logprob), ...]) or None
    mask_seconds: float = 0.0  # time spent filling and applying grammar bitmasks


def check_sampling_row(params, vocab_size: int) -> None:
    """Turn one request's sampling parameters into the tensors the batched sampler builds from them, alone and
    before the request joins a batch: a value that cannot be represented fails this request at admission
    (ValueError naming the field) instead of every request of a later step."""
    try:
        torch.tensor([params.top_k], dtype=torch.long)
        floats = torch.tensor([params.temperature, params.top_p, params.min_p, params.presence_penalty,
                               params.frequency_penalty, params.repetition_penalty], dtype=torch.float32)
    except (OverflowError, RuntimeError, TypeError) as e:
        raise ValueError(f"sampling parameters cannot be represented: {e}") from None
    if not bool(torch.isfinite(floats).all()):
        raise ValueError("temperature, top_p, min_p and the penalties must be finite numbers")
    if params.logit_bias:
        try:
            ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long)
            vals = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        except (OverflowError, RuntimeError, TypeError) as e:
            raise ValueError(f"logit_bias cannot be represented: {e}") from None
        if bool((ids < 0).any() | (ids >= vocab_size).any()) or not bool(torch.isfinite(vals).all()):
            raise ValueError(f"logit_bias: token ids must be in [0, {vocab_size}) and biases finite")


def apply_penalties(logits: Tensor, reqs: list[Request]) -> Tensor:
    """In place on float32 logits [N, V], one row per request. Only rows that ask pay for it."""
    for i, req in enumerate(reqs):
        p = req.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias.keys()), dtype=torch.long, device=logits.device)
            vals = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            logits[i].index_add_(0, ids, vals)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.token_ids)), dtype=torch.long, device=logits.device)
            x = logits[i, seen]
            logits[i, seen] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
            out = torch.tensor(req.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if req.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(req.eos_token_ids))
            if banned:
                logits[i, banned] = float("-inf")
    return logits


def filter_logits(logits: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Mask logits outside top-k / nucleus top-p / min-p, per row (vectorised, one sort)."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    v = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, v)).clamp(max=v)
    ranks = torch.arange(v, device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    cum = probs.cumsum(dim=-1)
    drop |= (cum - probs) >= top_p[:, None]  # keep the smallest prefix whose mass reaches top_p
    drop |= probs < (min_p[:, None] * probs[:, :1])
    drop[:, 0] = False
    mask = torch.zeros_like(drop).scatter_(1, idx, drop)
    return logits.masked_fill(mask, float("-inf"))


def sample(logits: Tensor, reqs: list[Request], penalties: bool = True) -> SampleResult:
    """logits: float32 [N, V], row i belongs to reqs[i]. Returns one token per row."""
    want_lp = [r.params.logprobs for r in reqs]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in want_lp) else None
    if penalties:
        logits = apply_penalties(logits, reqs)
    constrained = [i for i, r in enumerate(reqs) if r.grammar is not None]
    mask_seconds = 0.0
    if constrained:
        mask_seconds = apply_masks(logits, constrained, [reqs[i].grammar for i in constrained])
    greedy = torch.tensor([r.params.greedy for r in reqs], device=logits.device)
    tokens = logits.argmax(dim=-1)
    if not bool(greedy.all()):
        rows = (~greedy).nonzero().flatten()
        sub = [reqs[i] for i in rows.tolist()]
        x = logits[rows] / torch.tensor([r.params.temperature for r in sub], device=logits.device)[:, None]
        if any(r.params.top_k > 0 or r.params.top_p < 1 or r.params.min_p > 0 for r in sub):
            x = filter_logits(
                x,
                torch.tensor([r.params.top_k for r in sub], device=x.device),
                torch.tensor([r.params.top_p for r in sub], device=x.device, dtype=x.dtype),
                torch.tensor([r.params.min_p for r in sub], device=x.device, dtype=x.dtype),
            )
        probs = torch.softmax(x, dim=-1)
        for j, req in enumerate(sub):
            tokens[rows[j]] = draw(probs[j], req.generator)
    token_list = tokens.tolist()
    for i in constrained:
        reqs[i].grammar.accept(token_list[i])
    lps = None
    if raw_logprobs is not None:
        lps = []
        for i, k in enumerate(want_lp):
            lps.append(None if k is None else token_logprobs(raw_logprobs[i], token_list[i], k))
    return SampleResult(token_list, lps, mask_seconds)


def draw(probs: Tensor, generator: Optional[torch.Generator]) -> int:
    """One sample from ``probs`` using only ``generator`` (exponential race: argmax p / E, E ~ Exp(1))."""
    # the uniforms come from the request's generator, which lives on the CPU (so a seed gives the same draws
    # on every device): draw there, compute where the probabilities are
    u = torch.rand(probs.shape[-1], generator=generator, dtype=torch.float32).to(probs.device)
    # clamped: torch.rand can return 0, and 0/0 = nan would win argmax for a token of probability 0 (one
    # that top-k/top-p or a grammar mask excluded)
    e = (-torch.log1p(-u)).clamp_min(1e-30)
    return int((probs / e).argmax())


def token_logprobs(row_logprobs: Tensor, token: int, top: int) -> tuple:
    """(logprob of ``token``, top-``top`` alternatives as [(id, logprob)])."""
    lp = float(row_logprobs[token])
    if top <= 0:
        return lp, []
    vals, ids = row_logprobs.topk(top)
    return lp, list(zip(ids.tolist(), vals.tolist()))
