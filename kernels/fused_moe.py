"""Mixture-of-experts in Triton: the step's (token, expert) pairs, sorted by expert, run as tiles of
``BLOCK_M`` pairs that all belong to one expert, so each tile multiplies by one expert's weights.

Two kernels: ``_gate_up_kernel`` computes a tile's gate and up projections together and writes
``act(gate) * up`` (the [P, I] intermediate never exists unactivated); ``_down_kernel`` projects back and
scales each row by its routing weight. The per-token sum over its k experts is one ``index_add_``.
Tiles are laid out without a host sync: an upper bound of ``cdiv(P, BLOCK_M) + E`` tiles, the unused ones
empty. Same contract as :func:`sift.kernels.moe.grouped_experts` (the torch reference and CPU path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sift.kernels.moe import sort_by_expert

Tensor = torch.Tensor
ACTS = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    else:  # tanh-approximated GELU, tanh from exp of a non-positive argument
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        return 0.5 * g * (1.0 + tl.where(u < 0, -t, t))


@triton.jit
def _tile(tile_expert_ptr, tile_start_ptr, tile_end_ptr, t, BLOCK_M: tl.constexpr):
    e = tl.load(tile_expert_ptr + t)
    start = tl.load(tile_start_ptr + t)
    rows = start + tl.arange(0, BLOCK_M)
    return e, rows, rows < tl.load(tile_end_ptr + t)


@triton.jit
def _gate_up_kernel(x_ptr, tok_ptr, w_ptr, h_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, hidden, inter,
                    stride_x, stride_we, stride_wn, stride_h, ACT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t, nb = tl.program_id(0), tl.program_id(1)
    e, rows, ok = _tile(tile_expert_ptr, tile_start_ptr, tile_end_ptr, t, BLOCK_M)
    if tl.max(ok.to(tl.int32), 0) == 0:
        return
    tok = tl.load(tok_ptr + rows, mask=ok, other=0).to(tl.int64)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < inter
    w = w_ptr + e.to(tl.int64) * stride_we
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < hidden
        a = tl.load(x_ptr + tok[:, None] * stride_x + k[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(w + n[None, :] * stride_wn + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        wu = tl.load(w + (n[None, :] + inter) * stride_wn + k[:, None], mask=n_ok[None, :] & k_ok[:, None],
                     other=0.0)
        acc_g += tl.dot(a.to(tl.float32), wg.to(tl.float32), input_precision="ieee")
        acc_u += tl.dot(a.to(tl.float32), wu.to(tl.float32), input_precision="ieee")
    out = _act(acc_g, ACT) * acc_u
    tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_h + n[None, :], out.to(h_ptr.dtype.element_ty),
             mask=ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, y_ptr, weight_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, hidden, inter,
                 stride_h, stride_we, stride_wn, stride_y,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t, nb = tl.program_id(0), tl.program_id(1)
    e, rows, ok = _tile(tile_expert_ptr, tile_start_ptr, tile_end_ptr, t, BLOCK_M)
    if tl.max(ok.to(tl.int32), 0) == 0:
        return
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < hidden
    w = w_ptr + e.to(tl.int64) * stride_we
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < inter
        a = tl.load(h_ptr + rows64[:, None] * stride_h + k[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w + n[None, :] * stride_wn + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    scale = tl.load(weight_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows64[:, None] * stride_y + n[None, :], (acc * scale[:, None]).to(y_ptr.dtype.element_ty),
             mask=ok[:, None] & n_ok[None, :])


def _tiles(offsets: Tensor, num_pairs: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """(expert, first pair, end pair) int32 of every tile, on the device without a host sync: each expert's
    run of sorted pairs cut into ``block_m`` tiles, in an upper bound of ``cdiv(num_pairs, block_m) + E``
    tiles whose surplus is empty (start == end)."""
    num_experts = offsets.shape[0]
    ends = offsets.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    per_expert = (ends - starts + block_m - 1) // block_m
    cum = per_expert.cumsum(0)
    tile = torch.arange(triton.cdiv(num_pairs, block_m) + num_experts, device=offsets.device)
    expert = torch.searchsorted(cum, tile, right=True).clamp(max=num_experts - 1)
    start = (starts[expert] + (tile - (cum[expert] - per_expert[expert])) * block_m).clamp(max=num_pairs)
    end = torch.where(tile < cum[-1], torch.minimum(start + block_m, ends[expert]), start)
    return expert.to(torch.int32), start.to(torch.int32), end.to(torch.int32)


def fused_experts(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor, act: str = "silu",
                  block_m: int = 16, block_n: int = 32, block_k: int = 32) -> Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]): x [T, H], w13 [E, 2I, H], w2 [E, H, I] -> [T, H]."""
    num_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    assert x.stride(-1) == 1 and w13.is_contiguous() and w2.is_contiguous()
    order, tokens, offsets = sort_by_expert(ids, num_experts)
    num_pairs = ids.numel()
    tile_expert, tile_start, tile_end = _tiles(offsets, num_pairs, block_m)
    num_tiles = tile_expert.shape[0]
    h = torch.empty(num_pairs, inter, device=x.device, dtype=x.dtype)
    _gate_up_kernel[(num_tiles, triton.cdiv(inter, block_n))](
        x, tokens, w13, h, tile_expert, tile_start, tile_end, hidden, inter, x.stride(0), w13.stride(0),
        w13.stride(1), h.stride(0), ACT=ACTS[act], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    y = torch.empty(num_pairs, hidden, device=x.device, dtype=x.dtype)
    _down_kernel[(num_tiles, triton.cdiv(hidden, block_n))](
        h, w2, y, weights.reshape(-1)[order].contiguous(), tile_expert, tile_start, tile_end, hidden, inter,
        h.stride(0), w2.stride(0), w2.stride(1), y.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return torch.zeros_like(x).index_add_(0, tokens, y)
