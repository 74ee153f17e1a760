"""Which slots a sparse decode step reads: TidalDecode's token top-k, Quest's page bounds and Loki's low-rank
key sketches.

Tensors in, slot lists out ([B, Hkv, N] physical slots, -1 = padding), ready for
:func:`sift.kernels.sparse_attention.sparse_decode`. These are plain torch on every device: the work is
one top-k over at most a context's worth of scores (or pages) per (request, kv head), which
``torch.topk`` already runs as a single fused kernel on CUDA; a hand-written Triton top-k would not
read less memory. Quest's per-page bound reads the page metadata once ([B, pages, Hkv, D]).
"""
from __future__ import annotations

from typing import Optional

import torch

from sift.kernels.reference import head_rows

Tensor = torch.Tensor


def _top(score: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk along the last dim with ties broken by position, the earlier first (what a stable
    descending sort gives): which of several equal scores (kept tokens' +inf, underflowed zeros) survive
    must not depend on the batch the row is in. Each float32 score becomes a distinct int64 key: its bits
    mapped to an order-preserving int32 in the high half, the reversed position in the low half, so the
    top k are unique and torch.topk may pick them in any order of work (on CPU 6x faster than the stable
    sort over an 8K context). Returns (scores, positions), highest first."""
    bits = (score.float() + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 ties with 0.0, as in a sort
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    width = score.shape[-1]
    position = torch.arange(width, device=score.device)
    key = (ordered.long() << 32) + ((1 << 32) - 1 - position)
    idx = torch.topk(key, k, dim=-1, sorted=True).indices
    return torch.gather(score, -1, idx), idx


def kept_tokens(idx: Tensor, last: Tensor, first: Tensor, latest: Tensor) -> Tensor:
    """Which kv indices ``idx`` a TidalDecode selection keeps before ranking the rest: the first ``first``
    tokens and the ``latest`` before the current one (kv index ``last``), which itself counts as kept.
    Arguments broadcast against each other."""
    return (idx < first) | (idx >= last - latest)


def topk_token_slots(scores: Tensor, slots: Tensor, kv_lens: Tensor, budgets: Tensor,
                     first: Optional[Tensor] = None, latest: Optional[Tensor] = None,
                     max_budget: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """TidalDecode selection: per (request, kv head) the top-(budget - 1) earlier tokens by score, plus the
    current token (kv index kv_len - 1), which is always attended.

    scores: [B, Hkv, L] (the selection layer's attention of the current query, aggregated over the
    group's query heads); slots: [B, L] physical slot of each kv index; kv_lens, budgets: [B].
    ``first`` / ``latest`` ([B], optional): the first and the latest earlier tokens every head keeps
    before ranking the rest (inside the budget; when they alone exceed it, the earliest of them).
    ``max_budget``: a host-side bound on ``budgets`` (spares a device sync for their maximum on a GPU).
    Returns (slot lists [B, Hkv, K], kv indices [B, Hkv, K]) with K = max(budget) capped at L; entries
    past a request's budget or context are -1. The current token is the last valid column.
    """
    bsz, hkv, width = scores.shape
    lens = kv_lens.long()
    idx = torch.arange(width, device=scores.device)
    earlier = idx[None, :] < (lens - 1)[:, None]  # the current token is added separately
    masked = scores.float().masked_fill(~earlier[:, None, :], float("-inf"))
    if first is not None:
        kept = earlier & kept_tokens(idx[None, :], (lens - 1)[:, None], first.long()[:, None], latest.long()[:, None])
        masked.masked_fill_(kept[:, None, :], float("inf"))
    top = int(budgets.max()) if max_budget is None else max_budget
    k = max(0, min(top - 1, width - 1))
    top_val, top_idx = _top(masked, k) if k else (masked[..., :0], idx.new_zeros(bsz, hkv, 0))
    keep = (top_val > float("-inf")) & (torch.arange(k, device=scores.device) < (budgets.long() - 1)[:, None, None])
    cur = (lens - 1)[:, None, None].expand(bsz, hkv, 1)
    kv_idx = torch.cat([torch.where(keep, top_idx, -1), cur], dim=-1)
    gathered = torch.gather(slots.long()[:, None, :].expand(bsz, hkv, width), 2, kv_idx.clamp(min=0))
    return torch.where(kv_idx >= 0, gathered, -1), kv_idx


def rerank_slots(q: Tensor, k_cache: Tensor, slots: Tensor, forced: Tensor, budgets: Tensor, scale: float,
                 max_budget: int) -> Tensor:
    """One layer's own choice among a selection's candidates: per (request, kv head) the ``budget`` candidates
    its query attends to most (the group's query heads' softmax over the candidates, summed), the ``forced``
    ones (the current token, kept first/latest tokens) always among them.

    q: [B, Hq, D]; slots: [B, Hkv, C] candidate slots (-1 = padding); forced: [B, Hkv, C] bool; budgets: [B]
    with ``max_budget`` >= their maximum (host int). Returns slot lists [B, Hkv, K], K = min(max_budget, C),
    -1 past a request's budget or its candidates.
    """
    bsz, hq, d = q.shape
    hkv, width = slots.shape[1], slots.shape[2]
    valid = slots >= 0
    keys = head_rows(k_cache, slots).float()  # [B, Hkv, C, D]: each head's own candidates
    logits = torch.einsum("bhgd,bhcd->bhgc", q.float().view(bsz, hkv, hq // hkv, d), keys) * scale
    probs = torch.softmax(logits.masked_fill(~valid[:, :, None, :], float("-inf")), dim=-1).sum(2)
    # rounded to 2^-20 before ranking (ties then go by position): the float noise of another batch
    # composition (~1e-7 relative in q) cannot reorder two near-equal candidates
    probs = torch.round(probs * 2.0 ** 20)
    score = probs.masked_fill(~valid, float("-inf")).masked_fill(forced & valid, float("inf"))
    k = min(max_budget, width)
    val, idx = _top(score, k)
    keep = (val > float("-inf")) & (torch.arange(k, device=q.device) < budgets.long()[:, None, None])
    return torch.where(keep, torch.gather(slots, 2, idx), -1)


def key_basis(keys: Tensor, rank: int) -> Tensor:
    """Loki's low-rank key space: per kv head the ``rank`` principal directions of keys [L, Hkv, D], i.e. the
    eigenvectors of KᵀK with the largest eigenvalues (uncentred, since attention scores are plain dot
    products). Returns [Hkv, D, rank] float32, orthonormal columns."""
    k = keys.float()
    _, vectors = torch.linalg.eigh(torch.einsum("lhd,lhe->hde", k, k))  # eigenvalues ascending
    return vectors.flip(-1)[..., :rank].contiguous()


def sketch_scores(q: Tensor, sketch: Tensor, basis: Tensor, scale: float) -> Tensor:
    """One request's approximate decode attention from key sketches: q [Hq, D] projected on ``basis``
    [Hkv, D, r] against every kv index's key sketch [L, Hkv, r] (its key projected on the same basis).
    With r = D the scores are exact. Returns per kv head the group's softmax probabilities summed, [Hkv, L],
    rounded to 2^-20 (as :func:`rerank_slots` does) so that float noise of another batch cannot reorder
    near-equal tokens."""
    hkv, d, _ = basis.shape
    qs = torch.einsum("hgd,hdr->hgr", q.float().view(hkv, -1, d), basis)
    logits = torch.einsum("hgr,lhr->hgl", qs, sketch.float()) * scale
    return torch.round(torch.softmax(logits, dim=-1).sum(1) * 2.0 ** 20)


def sketch_topk(scores: Tensor, slots: Tensor, k: int, first: int, latest: int) -> tuple[Tensor, Tensor]:
    """One request's Loki selection: per kv head the current token (the last of ``scores`` [Hkv, L], L = its
    context), the first ``first`` and the latest ``latest`` earlier tokens, and the highest scoring of the
    rest, min(k, L) in all. ``scores`` are non-negative and integer-valued (:func:`sketch_scores` rounds
    them); equal scores go to the earlier token, and when the kept tokens alone exceed k the earliest of
    them stay, as in :func:`topk_token_slots`, whose selection this equals. One int64 key per token (score
    bits, then the reversed position) makes the order total, in fewer tensor ops than the general path:
    this runs in every sparse layer. ``slots`` [>= L] maps kv index -> physical slot.
    Returns (slot lists [Hkv, K], kv indices [Hkv, K]), highest first."""
    width = scores.shape[-1]
    pos = torch.arange(width, device=scores.device)
    key = (scores.long() << 32) - pos
    kept = (1 << 62) - pos  # above every score, earliest first
    key[:, :first] = kept[:first]
    start = max(width - 1 - latest, 0)
    key[:, start:] = kept[start:]
    key[:, -1] = (1 << 63) - 1  # the current token
    idx = torch.topk(key, min(k, width), dim=-1, sorted=True).indices
    return slots[idx], idx


def quest_page_bounds(q: Tensor, key_min: Tensor, key_max: Tensor, block_tables: Tensor, num_pages: Tensor) -> Tensor:
    """Quest's upper bound of q·k over each page: sum_i max(q_i min_i, q_i max_i).

    q: [B, Hq, D]; key_min/key_max: [num_blocks, Hkv, D] per-block elementwise key extrema of one layer;
    block_tables: [B, P]; num_pages: [B] pages in use. The bound of a kv head is the largest bound among
    its group's query heads (so it still bounds every q·k the group computes). Returns [B, Hkv, P] float32,
    -inf past a request's pages.
    """
    bsz, hq, d = q.shape
    hkv = key_min.shape[1]
    blocks = block_tables.long()
    qg = q.float().view(bsz, 1, hkv, hq // hkv, d)
    lo = key_min[blocks].float()[:, :, :, None, :]  # [B, P, Hkv, 1, D]
    hi = key_max[blocks].float()[:, :, :, None, :]
    bound = torch.maximum(qg * lo, qg * hi).sum(-1).amax(-1)  # [B, P, Hkv]
    pages = torch.arange(blocks.shape[1], device=q.device)
    bound = bound.masked_fill((pages[None, :] >= num_pages.long()[:, None])[:, :, None], float("-inf"))
    return bound.transpose(1, 2).contiguous()


def top_pages(bounds: Tensor, num_pages: Tensor, budgets: Tensor, block_size: int) -> Tensor:
    """Quest selection: per (request, kv head) the budget // block_size pages of highest bound (at least one),
    the current token's page always among them. Returns page indices [B, Hkv, K], -1 = unused."""
    bsz, hkv, width = bounds.shape
    last = (num_pages.long() - 1)[:, None, None].expand(bsz, hkv, 1)
    forced = bounds.scatter(2, last, float("inf"))
    per_req = (budgets.long() // block_size).clamp(min=1)
    k = min(int(per_req.max()), width)
    val, idx = torch.topk(forced, k, dim=-1)
    keep = (val > float("-inf")) & (torch.arange(k, device=bounds.device) < per_req[:, None, None])
    return torch.where(keep, idx, -1)


def pages_to_slots(pages: Tensor, block_tables: Tensor, kv_lens: Tensor, block_size: int) -> Tensor:
    """Expand page lists [B, Hkv, K] into slot lists [B, Hkv, K * block_size] (-1 past the context)."""
    bsz, hkv, k = pages.shape
    off = torch.arange(block_size, device=pages.device)
    blocks = torch.gather(block_tables.long()[:, None, :].expand(bsz, hkv, -1), 2, pages.clamp(min=0))
    kv_idx = pages[..., None] * block_size + off  # [B, Hkv, K, bs]
    slots = blocks[..., None] * block_size + off
    ok = (pages[..., None] >= 0) & (kv_idx < kv_lens.long()[:, None, None, None])
    return torch.where(ok, slots, -1).reshape(bsz, hkv, k * block_size)
