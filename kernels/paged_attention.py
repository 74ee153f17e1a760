"""Paged attention in Triton: varlen prefill/extend, and split-K decode with optional score emission.

Layout and masking rules are those of :mod:`sift.kernels.reference` (the test oracle).
Both kernels walk a request's *visible* kv indices as one list, the sinks
``[0, sink_end)`` followed by the window ``[win_lo, last query]``, so a windowed
request never touches K/V outside its window. Softmax is online, in the log2
domain (``scale * log2(e)`` folded into the logits), with float32 statistics.

Decode (flash-decoding): one program per (request, kv head, split) handles every
query head of the kv-head group as the rows of one tile, so GQA reads each K/V
entry once. Splits write partial (max, sum, acc); a reduce kernel combines them.
Score emission stores the raw logits during that single pass and normalizes them
with the final logsumexp in a small second kernel: no second pass over K.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- helpers
@triton.jit
def tile_dot(a, b, UPCAST: tl.constexpr):
    """a @ b accumulated in float32. UPCAST does it on float32 operands in IEEE precision: float32 inputs
    must not be rounded to tf32, and the CPU interpreter computes bfloat16 dots wrongly (numpy has no bf16)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _logits(q, k, scale_log2, cap_in, cap_out, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr):
    """q @ k^T in the log2 domain. SOFTCAP (Gemma 2): ``cap * tanh(x * scale / cap)`` with cap_in = scale / cap
    and cap_out = cap * log2(e); tanh from exp of a non-positive argument (no overflow, no libdevice)."""
    s = tile_dot(q, tl.trans(k), UPCAST)
    if SOFTCAP:
        x = s * cap_in
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t) * cap_out
    else:
        return s * scale_log2


@triton.jit
def _visible(q_first, window, sinks):
    """Visible kv indices of queries at kv index >= q_first: sinks [0, sink_end), then [win_lo, query]."""
    win_lo = tl.where(window > 0, tl.maximum(q_first - window + 1, 0), 0)
    sink_end = tl.minimum(sinks, win_lo)
    return win_lo, sink_end


@triton.jit
def _load_kv(ptr, bt_row, vi, ok, sink_end, win_lo, stride_s, head_off, d, d_ok, BLOCK_SIZE: tl.constexpr):
    """Tile [len(vi), D] of positions ``vi`` of the visible list, and their kv indices."""
    idx = tl.where(vi < sink_end, vi, vi - sink_end + win_lo)
    blk = tl.load(bt_row + idx // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
    slot = blk * BLOCK_SIZE + idx % BLOCK_SIZE
    tile = tl.load(ptr + slot[:, None] * stride_s + head_off + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
    return tile, idx


@triton.jit
def online_softmax_step(s, m_i, l_i, acc):
    """Online-softmax update for logits s (-inf where hidden); returns (p, m, l, acc rescaled)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully hidden rows stay at p = 0, not NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


# ----------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class _Tiles:
    block_m: int  # query rows (prefill) per program
    block_n: int  # kv entries per inner step
    num_warps: int
    num_stages: int


def _tiles(head_dim: int, on_gpu: bool) -> _Tiles:
    if not on_gpu:  # interpreter: fewer, larger numpy steps; tl.dot needs dims >= 16
        return _Tiles(32, 32, 1, 1)
    return _Tiles(64, 64 if head_dim <= 64 else 32, 4, 3 if head_dim <= 64 else 2)


MIN_SPLIT_LEN = 256  # a split shorter than this costs more in the reduce than it gains in parallelism
MAX_SPLITS = 64


def num_splits(batch: int, kv_heads: int, max_kv_len: int, num_sms: int) -> int:
    """Splits per (request, kv head): enough programs for ~2 waves over the SMs, none shorter than MIN_SPLIT_LEN."""
    want = triton.cdiv(2 * num_sms, batch * kv_heads)
    return max(1, min(want, triton.cdiv(max_kv_len, MIN_SPLIT_LEN), MAX_SPLITS))


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, cu_q_ptr, kv_len_ptr, win_ptr, sink_ptr, tree_ptr,
                    scale_log2, cap_in, cap_out, head_dim, stride_qt, stride_qh, stride_ot, stride_oh, stride_ks, stride_kh,
                    stride_vs, stride_vh, stride_bt, stride_tree,
                    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_TREE: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    mblk, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    n_q = tl.load(cu_q_ptr + b + 1) - q_start
    if mblk * BLOCK_M >= n_q:
        return
    kv_len = tl.load(kv_len_ptr + b)
    rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_q
    q_pos = kv_len - n_q + rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    window, sinks = 0, 0
    if HAS_WINDOW:
        window = tl.load(win_ptr + b)
        sinks = tl.load(sink_ptr + b)
    q_first = kv_len - n_q + mblk * BLOCK_M
    win_lo, sink_end = _visible(q_first, window, sinks)
    n_vis = sink_end + tl.minimum(q_first + BLOCK_M, kv_len) - win_lo
    kv_off = (h // GROUP) * stride_kh
    bt_row = bt_ptr + b * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n_vis, BLOCK_N):
        vi = start + tl.arange(0, BLOCK_N)
        ok = vi < n_vis
        k, idx = _load_kv(k_ptr, bt_row, vi, ok, sink_end, win_lo, stride_ks, kv_off, d, d_ok, BLOCK_SIZE)
        s = _logits(q, k, scale_log2, cap_in, cap_out, UPCAST, SOFTCAP)
        see = ok[None, :] & (idx[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            see &= (window <= 0) | (q_pos[:, None] - idx[None, :] < window) | (idx[None, :] < sinks)
        if HAS_TREE:
            m = idx - (kv_len - n_q)  # index among the new tokens; < 0 for the context
            tree = tl.load(tree_ptr + (q_start + rows)[:, None] * stride_tree + m[None, :],
                           mask=row_ok[:, None] & (ok & (m >= 0))[None, :], other=1)
            see &= tree != 0
        s = tl.where(see, s, float("-inf"))
        p, m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc)
        v, _ = _load_kv(v_ptr, bt_row, vi, ok, sink_end, win_lo, stride_vs, (h // GROUP) * stride_vh, d, d_ok,
                        BLOCK_SIZE)
        acc += tile_dot(p.to(v.dtype), v, UPCAST)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + (q_start + rows)[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, kv_len_ptr, win_ptr, sink_ptr,
                   o_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, lse_ptr, logit_ptr,
                   scale_log2, cap_in, cap_out, head_dim, n_splits, max_kv_len, stride_qb, stride_qh, stride_ob, stride_oh,
                   stride_ks, stride_kh, stride_vs, stride_vh, stride_bt,
                   GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
                   EMIT: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_len = tl.load(kv_len_ptr + b)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    heads = kvh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    window, sinks = 0, 0
    if HAS_WINDOW:
        window = tl.load(win_ptr + b)
        sinks = tl.load(sink_ptr + b)
    win_lo, sink_end = _visible(kv_len - 1, window, sinks)
    n_vis = sink_end + kv_len - win_lo
    chunk = tl.cdiv(tl.cdiv(n_vis, n_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_vis)
    bt_row = bt_ptr + b * stride_bt
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        vi = start + tl.arange(0, BLOCK_N)
        ok = vi < hi
        k, idx = _load_kv(k_ptr, bt_row, vi, ok, sink_end, win_lo, stride_ks, kvh * stride_kh, d, d_ok, BLOCK_SIZE)
        s = tl.where(ok[None, :], _logits(q, k, scale_log2, cap_in, cap_out, UPCAST, SOFTCAP), float("-inf"))
        if EMIT:
            tl.store(logit_ptr + (b * GROUP * tl.num_programs(1) + heads[:, None]) * max_kv_len + idx[None, :], s,
                     mask=g_ok[:, None] & ok[None, :])
        p, m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc)
        v, _ = _load_kv(v_ptr, bt_row, vi, ok, sink_end, win_lo, stride_vs, kvh * stride_vh, d, d_ok, BLOCK_SIZE)
        acc += tile_dot(p.to(v.dtype), v, UPCAST)
    row = b * GROUP * tl.num_programs(1) + heads  # flat (request, query head)
    if SPLIT:
        tl.store(part_m_ptr + row * n_splits + split, m_i, mask=g_ok)
        tl.store(part_l_ptr + row * n_splits + split, l_i, mask=g_ok)
        tl.store(part_acc_ptr + (row * n_splits + split)[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None])
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])
        if EMIT:
            tl.store(lse_ptr + row, m_i + tl.log2(l_i), mask=g_ok)


@triton.jit
def _reduce_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, o_ptr, lse_ptr, n_splits, head_dim, num_heads,
                   stride_ob, stride_oh, EMIT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)  # flat (request, query head)
    sp = tl.arange(0, BLOCK_S)
    sp_ok = sp < n_splits
    d = tl.arange(0, BLOCK_D)
    m = tl.load(part_m_ptr + row * n_splits + sp, mask=sp_ok, other=float("-inf"))
    l_part = tl.load(part_l_ptr + row * n_splits + sp, mask=sp_ok, other=0.0)
    acc = tl.load(part_acc_ptr + (row * n_splits + sp)[:, None] * BLOCK_D + d[None, :], mask=sp_ok[:, None], other=0.0)
    m_all = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_all))  # empty splits weigh nothing
    l_all = tl.sum(l_part * w, 0)
    out = tl.sum(acc * w[:, None], 0) / l_all
    b, h = row // num_heads, row % num_heads
    tl.store(o_ptr + b * stride_ob + h * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d < head_dim)
    if EMIT:
        tl.store(lse_ptr + row, m_all + tl.log2(l_all))


@triton.jit
def _scores_kernel(logit_ptr, lse_ptr, kv_len_ptr, win_ptr, sink_ptr, sum_ptr, max_ptr, max_kv_len,
                   GROUP: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr):
    b, kvh, lblk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_len = tl.load(kv_len_ptr + b)
    window, sinks = 0, 0
    if HAS_WINDOW:
        window = tl.load(win_ptr + b)
        sinks = tl.load(sink_ptr + b)
    win_lo, sink_end = _visible(kv_len - 1, window, sinks)
    i = lblk * BLOCK_L + tl.arange(0, BLOCK_L)
    seen = ((i < sink_end) | (i >= win_lo)) & (i < kv_len)  # exactly the entries the decode pass wrote
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    row = b * GROUP * tl.num_programs(1) + kvh * GROUP + g
    lse = tl.load(lse_ptr + row, mask=g_ok, other=0.0)
    logit = tl.load(logit_ptr + row[:, None] * max_kv_len + i[None, :], mask=g_ok[:, None] & seen[None, :],
                    other=float("-inf"))
    p = tl.exp2(logit - lse[:, None])
    out = (b * tl.num_programs(1) + kvh) * max_kv_len + i
    tl.store(sum_ptr + out, tl.sum(p, 0), mask=i < max_kv_len)
    tl.store(max_ptr + out, tl.max(p, 0), mask=i < max_kv_len)


# ----------------------------------------------------------------------------- launchers
def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "head_dim must be contiguous"
    assert k_cache.shape == v_cache.shape and q.shape[-1] == k_cache.shape[-1]
    assert q.shape[-2] % k_cache.shape[1] == 0, "query heads must be a multiple of kv heads"


def needs_upcast(q: Tensor, k_cache: Tensor) -> bool:
    return q.dtype == torch.float32 or k_cache.dtype != q.dtype or not q.is_cuda


def _window_args(window: Optional[Tensor], sinks: Optional[Tensor], like: Tensor):
    if window is None:
        return like, like, False  # never read
    return window, sinks if sinks is not None else torch.zeros_like(window), True


def _cap_args(scale: float, softcap: float) -> tuple:
    return (scale / softcap, softcap * LOG2E) if softcap > 0 else (0.0, 0.0)


def _launch_prefill(q, k_cache, v_cache, out, block_tables, cu_seqlens_q, kv_lens, block_size, scale,
                    window, sinks, tree_mask, max_q_len, softcap=0.0):
    _check(q, k_cache, v_cache)
    t = _tiles(q.shape[-1], q.is_cuda)
    win, snk, has_window = _window_args(window, sinks, kv_lens)
    tree = tree_mask.view(torch.uint8) if tree_mask is not None else kv_lens
    grid = (triton.cdiv(max_q_len, t.block_m), q.shape[1], kv_lens.shape[0])
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, kv_lens, win, snk, tree,
        scale * LOG2E, *_cap_args(scale, softcap), q.shape[-1], q.stride(0), q.stride(1), out.stride(0),
        out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        tree.stride(0) if tree_mask is not None else 0,
        GROUP=q.shape[1] // k_cache.shape[1], BLOCK_SIZE=block_size, HAS_WINDOW=has_window,
        HAS_TREE=tree_mask is not None, UPCAST=needs_upcast(q, k_cache), SOFTCAP=softcap > 0,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=triton.next_power_of_2(q.shape[-1]),
        num_warps=t.num_warps, num_stages=t.num_stages)


def _launch_decode(q, k_cache, v_cache, out, block_tables, kv_lens, block_size, scale, window, sinks,
                   splits, logits, lse, softcap=0.0):
    _check(q, k_cache, v_cache)
    bsz, hq, dim = q.shape
    hkv = k_cache.shape[1]
    t = _tiles(dim, q.is_cuda)
    block_d = triton.next_power_of_2(dim)
    win, snk, has_window = _window_args(window, sinks, kv_lens)
    emit = logits is not None
    if splits > 1:
        part_m = torch.empty(bsz * hq, splits, device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(bsz * hq, splits, block_d, device=q.device, dtype=torch.float32)
    else:
        part_m = part_l = part_acc = lse if emit else kv_lens  # never read
    _decode_kernel[(bsz, hkv, splits)](
        q, k_cache, v_cache, block_tables, kv_lens, win, snk, out, part_m, part_l, part_acc,
        lse if emit else kv_lens, logits if emit else kv_lens,
        scale * LOG2E, *_cap_args(scale, softcap), dim, splits, logits.shape[-1] if emit else 0, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0),
        GROUP=hq // hkv, BLOCK_SIZE=block_size, HAS_WINDOW=has_window, SPLIT=splits > 1, EMIT=emit,
        UPCAST=needs_upcast(q, k_cache), SOFTCAP=softcap > 0, BLOCK_G=max(16, triton.next_power_of_2(hq // hkv)), BLOCK_N=t.block_n,
        BLOCK_D=block_d, num_warps=t.num_warps, num_stages=t.num_stages)
    if splits > 1:
        _reduce_kernel[(bsz * hq,)](
            part_m, part_l, part_acc, out, lse if emit else kv_lens, splits, dim, hq, out.stride(0), out.stride(1),
            EMIT=emit, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d)


def _launch_scores(logits, lse, kv_lens, window, sinks, hkv):
    bsz, hq, max_kv_len = logits.shape
    win, snk, has_window = _window_args(window, sinks, kv_lens)
    s_sum = torch.empty(bsz, hkv, max_kv_len, device=logits.device, dtype=torch.float32)
    s_max = torch.empty_like(s_sum)
    block_l = 128
    _scores_kernel[(bsz, hkv, triton.cdiv(max_kv_len, block_l))](
        logits, lse, kv_lens, win, snk, s_sum, s_max, max_kv_len,
        GROUP=hq // hkv, HAS_WINDOW=has_window, BLOCK_G=triton.next_power_of_2(hq // hkv), BLOCK_L=block_l)
    return s_sum, s_max


# ----------------------------------------------------------------------------- public functions
def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, cu_seqlens_q: Tensor,
                    kv_lens: Tensor, block_size: int, scale: float, window: Optional[Tensor] = None,
                    sinks: Optional[Tensor] = None, tree_mask: Optional[Tensor] = None, *,
                    max_q_len: Optional[int] = None, softcap: float = 0.0) -> Tensor:
    """Varlen prefill/extend attention; same contract as :func:`sift.kernels.reference.paged_attention`.

    ``max_q_len`` (host int) sizes the grid; without it, it is read from ``cu_seqlens_q`` (a device sync).
    """
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    _launch_prefill(q, k_cache, v_cache, out, block_tables, cu_seqlens_q, kv_lens, block_size, scale,
                    window, sinks, tree_mask, max_q_len, softcap)
    return out


def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, kv_lens: Tensor,
                 block_size: int, scale: float, window: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
                 return_scores: bool = False, *, max_kv_len: Optional[int] = None, splits: Optional[int] = None,
                 softcap: float = 0.0):
    """Decode attention, one query per request; same contract as :func:`sift.kernels.reference.paged_decode`.

    Returns (out [B, Hq, D], scores or None), scores = (sum, max) each [B, Hkv, max_kv_len] float32.
    ``max_kv_len`` (host int) avoids a device sync; ``splits`` forces the split-K count (default: chosen
    from batch size, kv heads and max_kv_len).
    """
    bsz, hq, _ = q.shape
    hkv = k_cache.shape[1]
    out = torch.empty_like(q)
    if max_kv_len is None:
        max_kv_len = int(kv_lens.max()) if bsz else 0
    if bsz == 0 or max_kv_len == 0:
        zeros = torch.zeros(bsz, hkv, max_kv_len, device=q.device, dtype=torch.float32)
        return out.zero_(), ((zeros, zeros.clone()) if return_scores else None)
    if splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        splits = num_splits(bsz, hkv, max_kv_len, sms)
    logits = lse = None
    if return_scores:
        logits = torch.empty(bsz, hq, max_kv_len, device=q.device, dtype=torch.float32)
        lse = torch.empty(bsz * hq, device=q.device, dtype=torch.float32)
    _launch_decode(q, k_cache, v_cache, out, block_tables, kv_lens, block_size, scale, window, sinks,
                   splits, logits, lse, softcap)
    if not return_scores:
        return out, None
    return out, _launch_scores(logits, lse, kv_lens, window, sinks, hkv)
