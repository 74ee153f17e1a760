"""Building blocks shared by the decoder families: RMSNorm, rotary embedding, gated MLP.

Linear layers are created on the ``meta`` device: their weights always come from a checkpoint
(:meth:`models.llama.LlamaForCausalLM.load_weights`), so initializing them would be wasted time.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


SMALL_ROWS = 16  # up to this many rows, CPU float32 products run as weight @ x.T (see linear)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear``, with a faster product for the few rows of a CPU decode step.

    On CPU, float32 ``F.linear`` of n <= 16 rows runs well below memory bandwidth (MKL's gemv at n = 1,
    its small-m gemm after): measured on this project's 2-core machine with SmolLM2's shapes, cold
    weights, ``weight @ x.T`` is 2.8x faster for the fused gate/up projection at n = 1 (pad to 2
    rows: MKL's single-column path is the slow gemv again), 5x at n = 2, 1.6x at n = 8, and 1.2x
    for 9..15 rows padded to 16 (unpadded, 13..15 rows are slower than F.linear); past 16 rows it wins
    only on whole 16-row panels (32 rows: 1.2x, 64: 1.5x, 128-512: 1.0-1.1x; 17-31 rows often lose), so
    other counts and larger ones keep F.linear. A forward of one token is 1.8x faster
    (65 -> 36 ms), and a speculative tree of 2-3 tokens costs less than one token did before. GPU
    and other dtypes use F.linear.
    """
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    whole = n % SMALL_ROWS == 0 and n <= 512  # whole 16-row panels: as fast or faster up to 512 rows
    if x.device.type != "cpu" or x.dtype != torch.float32 or not (0 < n <= SMALL_ROWS or whole):
        return F.linear(x, weight, bias)
    rows = x.reshape(n, x.shape[-1])
    padded = 2 if n == 1 else SMALL_ROWS if 8 < n < SMALL_ROWS else n
    if padded > n:
        rows = torch.cat([rows, rows.new_zeros(padded - n, rows.shape[1])])
    out = (weight @ rows.t())[:, :n].t()
    if bias is not None:
        out = out + bias
    return out.contiguous().view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear computed through :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def empty_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """A :class:`Linear` without storage, to be filled by ``load_weights``."""
    return Linear(in_features, out_features, bias=bias, device="meta")


class RMSNorm(nn.Module):
    """HF-compatible RMSNorm: normalize in float32, cast back, then scale by the weight."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, device="meta"), requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda:  # the fused CUDA kernel normalizes 16-bit inputs in float32 itself: two launches fewer
            return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def rope_inv_freq(head_dim: int, theta: float, scaling: dict, freq_factors: Optional[tuple]) -> Tensor:
    """Inverse frequencies [head_dim/2], in float32 as HF computes them (so the caches agree bit for bit)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    if freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float32, device="cpu")
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the neox / HF "rotate half" layout.

    cos and sin of every position are precomputed once into ``cos_sin_cache`` [max_positions, head_dim];
    a forward indexes it by the batch's positions once and every layer reuses the result.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict,
                 freq_factors: Optional[tuple] = None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling, freq_factors)
        # explicit device: built for real even when the model is constructed under a meta device
        t = torch.arange(max_positions, dtype=torch.int64, device="cpu").float()
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [T, 1, head_dim/2] for ``positions`` [T], ready to broadcast over heads."""
        cos, sin = self.cos_sin_cache[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [T, H, D] by the position angles (first half paired with second half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class GatedMLP(nn.Module):
    """SiLU-gated MLP, gate and up projections fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = empty_linear(hidden_size, 2 * intermediate_size)
        self.down_proj = empty_linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
