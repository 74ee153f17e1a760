"""Sparse decode attention in Triton: each (request, kv head) attends over its own slot list.

TidalDecode and Quest both end in the same read: for request b and kv head h, a list of physical
slots of the paged pool (``slots[b, h, :]``, -1 = padding) holds the tokens that head attends to.
Quest's page lists are expanded to slot lists by :func:`sift.kernels.selection.pages_to_slots`, so one
kernel serves both. The torch reference is :func:`sift.kernels.reference.sparse_decode`.

One program per (request, kv head) handles every query head of the group as the rows of one tile,
so each selected K/V entry is read once; online softmax in the log2 domain with float32 statistics,
as in :mod:`sift.kernels.paged_attention`. Budgets are a few hundred slots, so there is no split-K.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sift.kernels.paged_attention import LOG2E, tile_dot, online_softmax_step, needs_upcast

Tensor = torch.Tensor


@triton.jit
def _sparse_decode_kernel(q_ptr, k_ptr, v_ptr, slot_ptr, o_ptr, n_slots, qk_scale,
                          stride_qb, stride_qh, stride_ks, stride_kh, stride_sb, stride_sh, stride_ob, stride_oh,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q_rows = q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :]
    q = tl.load(q_rows, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    slot_row = slot_ptr + b * stride_sb + h * stride_sh
    for start in range(0, n_slots, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        slot = tl.load(slot_row + n, mask=n < n_slots, other=-1).to(tl.int64)
        ok = slot >= 0
        kv_off = tl.where(ok, slot, 0)[:, None] * stride_ks + h * stride_kh + d[None, :]
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tile_dot(q, tl.trans(k), UPCAST) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        p, m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc)
        acc += tile_dot(p.to(v.dtype), v, UPCAST)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_rows = o_ptr + b * stride_ob + (h * GROUP + g)[:, None] * stride_oh + d[None, :]
    tl.store(o_rows, out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def sparse_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, scale: float) -> Tensor:
    """q: [B, Hq, D]; k_cache/v_cache: [num_slots, Hkv, D]; slots: [B, Hkv, N] (-1 = padding).
    Returns out [B, Hq, D] in q's dtype. A row whose slots are all padding gets zeros."""
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "head_dim must be contiguous"
    assert k_cache.stride() == v_cache.stride() and q.shape[-1] == k_cache.shape[-1]
    bsz, hq, d = q.shape
    hkv = k_cache.shape[1]
    assert hq % hkv == 0 and slots.shape[:2] == (bsz, hkv)
    slots = slots.contiguous()
    out = torch.empty_like(q)
    if bsz == 0:
        return out
    group = hq // hkv
    block_n = 64 if q.is_cuda else 32
    _sparse_decode_kernel[(bsz, hkv)](
        q, k_cache, v_cache, slots, out, slots.shape[2], scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), slots.stride(0), slots.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=d, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_N=block_n, UPCAST=needs_upcast(q, k_cache),
        num_warps=4 if q.is_cuda else 1)
    return out
