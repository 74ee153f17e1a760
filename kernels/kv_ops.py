"""KV pool writes in Triton: store by slot mapping, copy-on-write block copies, per-head compaction.

Same contracts as :mod:`sift.kernels.reference` (pool layout [num_slots, Hkv, D] per layer).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, num_heads, head_dim,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_kcs, stride_kch, stride_vcs, stride_vch,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token: nothing to store
        return
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    ok = (h < num_heads) & (d < head_dim)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=ok)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=ok)
    tl.store(kc_ptr + slot * stride_kcs + h * stride_kch + d, k.to(kc_ptr.dtype.element_ty), mask=ok)
    tl.store(vc_ptr + slot * stride_vcs + h * stride_vch + d, v.to(vc_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _copy_blocks_kernel(kc_ptr, vc_ptr, src_ptr, dst_ptr, block_numel, BLOCK: tl.constexpr):
    pair, chunk = tl.program_id(0), tl.program_id(1)
    src = tl.load(src_ptr + pair).to(tl.int64) * block_numel
    dst = tl.load(dst_ptr + pair).to(tl.int64) * block_numel
    off = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = off < block_numel
    tl.store(kc_ptr + dst + off, tl.load(kc_ptr + src + off, mask=ok), mask=ok)
    tl.store(vc_ptr + dst + off, tl.load(vc_ptr + src + off, mask=ok), mask=ok)


@triton.jit
def _move_rows_kernel(src_k, src_v, dst_k, dst_v, src_idx, dst_idx, stride_src_idx_h, stride_dst_idx_h, n_rows,
                      head_dim, stride_ss, stride_sh, stride_ds, stride_dh,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[dst_idx[h, r], h] = src[src_idx[h, r], h] for every kv head h (an index stride of 0 shares a row)."""
    h, rblk = tl.program_id(0), tl.program_id(1)
    r = rblk * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)[None, :]
    ok = (r < n_rows)[:, None] & (d < head_dim)
    s = tl.load(src_idx + h * stride_src_idx_h + r, mask=r < n_rows, other=0).to(tl.int64)[:, None]
    t = tl.load(dst_idx + h * stride_dst_idx_h + r, mask=r < n_rows, other=0).to(tl.int64)[:, None]
    tl.store(dst_k + t * stride_ds + h * stride_dh + d, tl.load(src_k + s * stride_ss + h * stride_sh + d, mask=ok),
             mask=ok)
    tl.store(dst_v + t * stride_ds + h * stride_dh + d, tl.load(src_v + s * stride_ss + h * stride_sh + d, mask=ok),
             mask=ok)


# ----------------------------------------------------------------------------- launchers / public functions
def _check_pool(k_cache: Tensor, v_cache: Tensor) -> None:
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(-1) == 1, "head_dim must be contiguous"


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write new keys/values ([T, Hkv, D]) into the paged pool at ``slot_mapping`` ([T]); slot < 0 is skipped."""
    if slot_mapping.numel() == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k.shape == v.shape
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    _, hkv, dim = k.shape
    _store_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping, hkv, dim, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(dim))


def copy_blocks(k_cache: Tensor, v_cache: Tensor, src: Tensor, dst: Tensor, block_size: int) -> None:
    """Copy whole blocks src[i] -> dst[i] (copy-on-write) in one layer's pool.

    The dst blocks must not be sources of another pair (copies run concurrently), as for fresh CoW blocks.
    """
    if src.numel() == 0:
        return
    _check_pool(k_cache, v_cache)
    assert k_cache.is_contiguous(), "whole-block copies need a contiguous pool"
    block_numel = block_size * k_cache.stride(0)
    chunk = min(4096, triton.next_power_of_2(block_numel))
    _copy_blocks_kernel[(src.numel(), triton.cdiv(block_numel, chunk))](
        k_cache, v_cache, src, dst, block_numel, BLOCK=chunk)


def _move_rows(src_k, src_v, dst_k, dst_v, src_idx, dst_idx, n_rows):
    hkv, dim = src_k.shape[1], src_k.shape[2]
    block_r = 16
    _move_rows_kernel[(hkv, triton.cdiv(n_rows, block_r))](
        src_k, src_v, dst_k, dst_v, src_idx, dst_idx, src_idx.stride(0), dst_idx.stride(0), n_rows, dim,
        src_k.stride(0), src_k.stride(1), dst_k.stride(0), dst_k.stride(1),
        BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(dim))


def gather_compact(k_cache: Tensor, v_cache: Tensor, src_slots: Tensor, dst_slots: Tensor) -> None:
    """Per-head compaction in one layer's pool; same contract as :func:`sift.kernels.reference.gather_compact`.

    Sources and destinations may overlap: the kept entries are gathered into a temporary first (one
    launch), then scattered (a second launch), because programs of one launch run in no fixed order.
    """
    hkv, n = src_slots.shape
    if n == 0:
        return
    _check_pool(k_cache, v_cache)
    src_slots, dst_slots = src_slots.contiguous(), dst_slots.contiguous()  # the kernel steps rows by 1
    tmp_k = torch.empty(n, hkv, k_cache.shape[2], device=k_cache.device, dtype=k_cache.dtype)
    tmp_v = torch.empty_like(tmp_k)
    rows = torch.arange(n, device=k_cache.device).expand(hkv, n)  # stride 0 over heads
    _move_rows(k_cache, v_cache, tmp_k, tmp_v, src_slots, rows, n)
    _move_rows(tmp_k, tmp_v, k_cache, v_cache, rows, dst_slots.expand(hkv, n), n)
