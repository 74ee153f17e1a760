"""Building blocks shared by the decoder families: RMSNorm, rotary embedding, gated MLP.

Linear layers are created on the ``meta`` device: their weights always come from a checkpoint
(:meth:`models.llama.LlamaForCausalLM.load_weights`), so initializing them would be wasted time.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


SMALL_ROWS = 16  # up to this many rows a CPU float32 product may run as weight @ x.T (see linear)
CALIBRATED_ROWS = (1, 2, 4, 8, 16, 32, 64)  # row counts whose product form calibrate_linear measures
_weight_first: dict = {}  # calibrated row count -> weight @ x.T was the faster product on this host
_calibrated_for: Optional[tuple] = None


def _row_point(n: int) -> Optional[int]:
    """The calibrated row count whose choice a product of ``n`` rows follows (the next one up; whole
    16-row panels past 64 follow 64), or None for the counts only ``F.linear`` runs: none, 17..31 rows,
    counts past 16 that are not whole 16-row panels (they lost on every host measured), more than 512."""
    if 0 < n and (n <= SMALL_ROWS or (n % SMALL_ROWS == 0 and n <= 512)):
        return next((p for p in CALIBRATED_ROWS if p >= n), CALIBRATED_ROWS[-1])
    return None


def _weight_first_product(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear`` computed as ``weight @ x.T``: one row padded to two (MKL's single-column path is its
    slow gemv), 9..15 rows padded to 16 (unpadded, 13..15 rows measured slower than 16)."""
    n = x.numel() // x.shape[-1]
    rows = x.reshape(n, x.shape[-1])
    padded = 2 if n == 1 else SMALL_ROWS if 8 < n < SMALL_ROWS else n
    if padded > n:
        rows = torch.cat([rows, rows.new_zeros(padded - n, rows.shape[1])])
    out = (weight @ rows.t())[:, :n].t()
    if bias is not None:
        out = out + bias
    return out.contiguous().view(*x.shape[:-1], weight.shape[0])


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear``, or on CPU in float32 the same product as ``weight @ x.T`` for the row counts where
    :func:`calibrate_linear` measured that form faster on this host's BLAS.

    Which form wins at a few rows depends on the host, so it is measured, not assumed: on one of this
    project's 2-core machines ``weight @ x.T`` made a one-token forward 1.8x faster (65 -> 36 ms, MKL's
    gemv then ran well below memory bandwidth); on a later one (a 480 MiB L3 that nearly holds the
    model) the same form was 2.2x slower than ``F.linear`` at one row and slower at every count.
    Before calibration, and on GPU or in other dtypes, this is ``F.linear``.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or not _weight_first:
        return F.linear(x, weight, bias)
    point = _row_point(x.numel() // x.shape[-1] if x.shape[-1] else 0)
    if point is None or not _weight_first[point]:
        return F.linear(x, weight, bias)
    return _weight_first_product(x, weight, bias)


@contextlib.contextmanager
def linear_products(weight_first: dict):
    """Within the block, ``weight_first`` ({rows: use weight @ x.T}, over :data:`CALIBRATED_ROWS`) instead of
    the calibrated choice: for benchmarks that compare the two forms."""
    saved = dict(_weight_first)
    _weight_first.clear()
    _weight_first.update(weight_first)
    try:
        yield
    finally:
        _weight_first.clear()
        _weight_first.update(saved)


@torch.inference_mode()
def calibrate_linear(weights: list, reps: int = 2, margin: float = 0.95) -> dict:
    """Choose, for each of :data:`CALIBRATED_ROWS`, the faster of ``F.linear`` and ``weight @ x.T`` for a
    CPU float32 model with these ``weights`` (in forward order): each form is timed over one pass through
    all of them, as a decode step reads them (mostly from memory, not cache), interleaved, best of
    ``reps``; ``weight @ x.T`` is kept only where it is faster by ``margin``. Once per process for a
    given set of shapes and thread count. Returns {rows: weight @ x.T chosen}."""
    global _calibrated_for
    weights = [w for w in weights if w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2]
    key = (tuple(tuple(w.shape) for w in weights), torch.get_num_threads())
    if not weights or key == _calibrated_for:
        return dict(_weight_first)
    inputs = {w.shape[1]: {n: torch.randn(n, w.shape[1]) for n in CALIBRATED_ROWS} for w in weights}
    chosen = {}
    for n in CALIBRATED_ROWS:
        best = {False: math.inf, True: math.inf}
        for _ in range(reps):
            for weight_first in (False, True):
                t = time.perf_counter()
                for w in weights:
                    x = inputs[w.shape[1]][n]
                    _weight_first_product(x, w, None) if weight_first else F.linear(x, w)
                best[weight_first] = min(best[weight_first], time.perf_counter() - t)
        chosen[n] = best[True] < margin * best[False]
    _weight_first.clear()
    _weight_first.update(chosen)
    _calibrated_for = key
    return dict(chosen)


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
        if x.dtype == torch.float32:  # one op (HF's math bit for bit); on CPU half the time of three
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
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

    cos and sin of every position are precomputed once into ``cos_sin_cache`` [max_positions, 2, head_dim],
    full width with the sign of "rotate half" folded into sin (see :func:`apply_rotary`); a forward indexes
    it by the batch's positions once and every layer reuses the result.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict,
                 freq_factors: Optional[tuple] = None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling, freq_factors)
        # explicit device: built for real even when the model is constructed under a meta device
        t = torch.arange(max_positions, dtype=torch.int64, device="cpu").float()
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos_sin_cache", torch.stack([torch.cat([cos, cos], dim=-1),
                                                           torch.cat([-sin, sin], dim=-1)], dim=1),
                             persistent=False)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, signed sin [T, 1, head_dim] for ``positions`` [T], ready to broadcast over heads."""
        cos, sin = self.cos_sin_cache[positions].to(dtype).unsqueeze(2).unbind(1)
        return cos, sin


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [T, H, D] by the position angles, halves paired (HF's ``x * cos + rotate_half(x) * sin``):
    rotating the halves is a roll by D/2 once sin's first half carries rotate_half's minus sign. Four ops
    where splitting into halves took nine; the same float operations, so the same bits."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class GatedMLP(nn.Module):
    """SiLU-gated MLP, gate and up projections fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = empty_linear(hidden_size, 2 * intermediate_size)
        self.down_proj = empty_linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
