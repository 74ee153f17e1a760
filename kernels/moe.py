"""Mixture-of-experts on the CPU / torch path: top-k routing, and the experts run grouped.

Grouped: the step's (token, expert) pairs are sorted by expert once, and each projection is one grouped
matmul over all experts (``F.grouped_mm``: expert e multiplies its own contiguous run of rows), so the
Python work per layer is constant, where a loop over experts costs a handful of ops per expert hit
(:func:`looped_experts`, kept as the baseline for bench/moe.py and as a second oracle).

Weights: ``w13`` [E, 2I, H] (gate rows, then up rows, as HF stores ``gate_up_proj``), ``w2`` [E, H, I].
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def route(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Softmax over the experts in float32, the top ``top_k`` of each token, renormalised to sum to 1 when the
    checkpoint says so (Qwen3-MoE's ``norm_topk_prob``, always in Mixtral). Returns (weights [T, k] in the
    logits' dtype, expert ids [T, k])."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def sort_by_expert(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (token, slot) pairs of ``ids`` [T, k] in expert order: (pair order [T*k] into ids.flatten(),
    each sorted pair's token [T*k], offsets [E] int32 = cumulative pair counts, the end of each expert's run)."""
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    offsets = torch.bincount(flat, minlength=num_experts).cumsum(0).to(torch.int32)
    return order, order // ids.shape[1], offsets


def grouped_experts(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor,
                    act: Callable[[Tensor], Tensor] = F.silu) -> Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for every token: x [T, H] -> [T, H]."""
    order, tokens, offsets = sort_by_expert(ids, w13.shape[0])
    h = F.grouped_mm(x[tokens], w13.transpose(1, 2), offs=offsets)  # [T*k, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = F.grouped_mm(act(gate) * up, w2.transpose(1, 2), offs=offsets)  # [T*k, H]
    y = y * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, tokens, y)


def looped_experts(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor,
                   act: Callable[[Tensor], Tensor] = F.silu) -> Tensor:
    """The same as a Python loop over the experts that were hit (transformers' way): the baseline."""
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        token, slot = torch.where(ids == e)
        gate, up = F.linear(x[token], w13[e]).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, w2[e]) * weights[token, slot, None]
        out.index_add_(0, token, y)
    return out
