"""Token skipping's data movement in Triton: pack the active tokens' rows, add their block updates back.

The references are :func:`sift.kernels.reference.gather_rows` and :func:`sift.kernels.reference.scatter_add_rows_`
(the CPU path). One program per (active row, column tile); rows are distinct, so the scatter needs no
atomics, and rows outside ``rows`` are never touched: skipped tokens stay bit-identical.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor
BLOCK_H = 256


@triton.jit
def _gather_kernel(x_ptr, rows_ptr, out_ptr, width, stride_x, stride_o, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    row = tl.load(rows_ptr + i).to(tl.int64)
    tl.store(out_ptr + i * stride_o + cols, tl.load(x_ptr + row * stride_x + cols, mask=ok), mask=ok)


@triton.jit
def _scatter_add_kernel(x_ptr, rows_ptr, upd_ptr, width, stride_x, stride_u, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    row = tl.load(rows_ptr + i).to(tl.int64)
    dst = x_ptr + row * stride_x + cols
    x = tl.load(dst, mask=ok)
    u = tl.load(upd_ptr + i * stride_u + cols, mask=ok)
    # float32 add, one rounding: what torch's index_add does for half types (and numpy has no bfloat16)
    tl.store(dst, (x.to(tl.float32) + u.to(tl.float32)).to(x.dtype), mask=ok)


def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x: [T, H] (rows contiguous); rows: [M] int -> [M, H] copy of those rows."""
    assert x.dim() == 2 and x.stride(1) == 1
    out = torch.empty(rows.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    if rows.numel():
        _gather_kernel[(rows.shape[0], triton.cdiv(x.shape[1], BLOCK_H))](
            x, rows, out, x.shape[1], x.stride(0), out.stride(0), BLOCK=BLOCK_H)
    return out


def scatter_add_rows_(x: Tensor, rows: Tensor, update: Tensor) -> Tensor:
    """In place: x[rows[i]] += update[i]; rows must be distinct. Returns x."""
    assert x.dim() == 2 and x.stride(1) == 1 and update.stride(1) == 1 and update.shape == (rows.shape[0], x.shape[1])
    if rows.numel():
        _scatter_add_kernel[(rows.shape[0], triton.cdiv(x.shape[1], BLOCK_H))](
            x, rows, update, x.shape[1], x.stride(0), update.stride(0), BLOCK=BLOCK_H)
    return x
