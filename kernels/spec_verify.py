"""Speculative tree verification in Triton: one program per tree walks the accepted path.

Same contract as :func:`sift.kernels.reference_spec.spec_verify` (greedy / lossless sampling, LANTERN delta and
LANTERN++ lambda relaxation, residuals written in place into ``probs``). Per tried child it gathers
the draft's nearest neighbours' probabilities, prefix-sums them under the limit, runs the accept test
and, on rejection, zeroes the tried mass; the walk itself is sequential, the gathers are vectorised.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


@triton.jit
def _spec_verify_kernel(probs_ptr, stride_p, target_ptr, draft_ptr, first_ptr, count_ptr, u_ptr,
                        roots_ptr, greedy_ptr, k_ptr, delta_ptr, lam_ptr, nearest_ptr, stride_nb,
                        path_ptr, stride_path, num_acc_ptr, last_ptr, relaxed_ptr,
                        MAX_DEPTH: tl.constexpr, MAX_CHILDREN: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    cur = tl.load(roots_ptr + b)
    is_greedy = tl.load(greedy_ptr + b) != 0
    k = tl.load(k_ptr + b)
    delta = tl.load(delta_ptr + b)
    lam = tl.load(lam_ptr + b)
    offs = tl.arange(0, BLOCK_K)
    in_k = offs < k
    tl.store(path_ptr + b * stride_path, cur)
    depth = tl.full([], 0, tl.int32)
    relaxed = tl.full([], 0, tl.int32)
    active = tl.full([], 1, tl.int1)
    for _d in range(MAX_DEPTH):
        row = probs_ptr + cur.to(tl.int64) * stride_p
        tgt = tl.load(target_ptr + cur)
        first = tl.load(first_ptr + cur)
        count = tl.load(count_ptr + cur)
        mass = tl.full([], 1.0, tl.float32)
        budget = delta
        accepted = tl.full([], -1, tl.int32)
        for j in range(MAX_CHILDREN):
            c = first + j
            live = active & (j < count) & (accepted < 0)
            x = tl.load(draft_ptr + c, mask=live, other=0).to(tl.int64)
            use_row = live & ((k > 0) | (~is_greedy))
            px = tl.load(row + x, mask=use_row, other=0.0)
            nb = tl.load(nearest_ptr + x * stride_nb + offs, mask=in_k & live, other=0).to(tl.int64)
            pn = tl.load(row + nb, mask=in_k & live, other=0.0)
            cum = tl.cumsum(pn, 0)
            limit = tl.where(lam > 0, (lam - 1.0) * px, budget)
            take = in_k & live & (cum <= limit)
            moved = tl.sum(tl.where(take, pn, 0.0), 0)
            p_tgt = tl.load(row + tgt, mask=live & is_greedy & (k > 0), other=0.0)
            strict_greedy = x == tgt
            relax_greedy = (moved > 0) & (px + moved >= p_tgt)
            u = tl.load(u_ptr + c, mask=live, other=1.0)
            ok_sample = u * mass < px + moved
            ok = tl.where(is_greedy, strict_greedy | relax_greedy, ok_sample)
            ok = live & ok
            was_relaxed = tl.where(is_greedy, ~strict_greedy, u * mass >= px)
            relaxed += (ok & was_relaxed).to(tl.int32)
            accepted = tl.where(ok, c, accepted)
            reject = live & (~ok) & (~is_greedy)
            tl.store(row + x, 0.0, mask=reject)
            tl.store(row + nb, tl.zeros_like(pn), mask=take & reject)
            tl.debug_barrier()
            mass = tl.where(reject, mass - px - moved, mass)
            budget = tl.where(reject, budget - moved, budget)
        step = active & (accepted >= 0)
        depth += step.to(tl.int32)
        tl.store(path_ptr + b * stride_path + depth, accepted, mask=step)
        cur = tl.where(step, accepted, cur)
        active = step
    tl.store(num_acc_ptr + b, depth)
    tl.store(last_ptr + b, cur)
    tl.store(relaxed_ptr + b, relaxed)


def spec_verify(probs: Tensor, target: Tensor, draft: Tensor, first_child: Tensor, num_children: Tensor,
                uniforms: Tensor, roots: Tensor, greedy: Tensor, relax_k: Tensor, delta: Tensor, lam: Tensor,
                nearest: Optional[Tensor], max_depth: int):
    """See :func:`sift.kernels.reference_spec.spec_verify`; ``probs`` is required here (rows of strict greedy trees
    are never read). Returns (path, num_accepted, last, relaxed) on ``probs``' device."""
    assert probs.dtype == torch.float32 and probs.stride(-1) == 1
    dev = probs.device
    bsz = roots.numel()
    i32 = dict(dtype=torch.int32, device=dev)
    if nearest is None or nearest.numel() == 0:
        nearest = torch.zeros(1, 1, **i32)
    kmax = int(relax_k.max()) if bsz else 0
    assert kmax <= nearest.shape[1], "relax_k exceeds the neighbour table"
    path = torch.full((bsz, max_depth + 1), -1, **i32)
    num_acc = torch.empty(bsz, **i32)
    last = torch.empty(bsz, **i32)
    relaxed = torch.empty(bsz, **i32)
    if bsz == 0:
        return path, num_acc, last, relaxed
    # rounded up so that few variants get compiled; the loops mask the excess
    max_children = triton.next_power_of_2(max(int(num_children.max()), 1))
    _spec_verify_kernel[(bsz,)](
        probs, probs.stride(0), target.to(**i32), draft.to(**i32), first_child.to(**i32), num_children.to(**i32),
        uniforms.to(dev, torch.float32), roots.to(**i32), greedy.to(**i32), relax_k.to(**i32),
        delta.to(dev, torch.float32), lam.to(dev, torch.float32), nearest.to(**i32), nearest.stride(0),
        path, path.stride(0), num_acc, last, relaxed,
        MAX_DEPTH=triton.next_power_of_2(max(max_depth, 1)), MAX_CHILDREN=max_children, BLOCK_K=max(triton.next_power_of_2(max(kmax, 1)), 16))
    return path, num_acc, last, relaxed
