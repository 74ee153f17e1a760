"""Building blocks shared by the decoder families: RMSNorm, rotary embedding, gated MLP.

Linear layers are created on the ``meta`` device: their weights always come from a checkpoint
(:meth:`sift.models.llama.LlamaForCausalLM.load_weights`), so initializing them would be wasted time.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


SMALL_ROWS = 16  # up to this many rows a CPU float32 product may run as weight @ x.T (see linear)
CALIBRATED_ROWS = (1, 2, 4, 8, 16, 32, 64)  # row counts whose product form calibrate_linear measures
# what calibrate_linear measured, per (weight shapes, thread count): a measurement of this host, made once
# per process; which form a model runs is its own (LlamaForCausalLM.set_linear_products), never read from here
_measured: dict = {}


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


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, weight_first: Optional[dict] = None) -> Tensor:
    """``F.linear``, or on CPU in float32 the same product as ``weight @ x.T`` for the row counts where
    ``weight_first`` ({rows: use weight @ x.T} over :data:`CALIBRATED_ROWS`, from :func:`calibrate_linear`)
    says that form is faster on this host's BLAS.

    Which form wins at a few rows depends on the host, so it is measured, not assumed: on one of this
    project's 2-core machines ``weight @ x.T`` made a one-token forward 1.8x faster (65 -> 36 ms, MKL's
    gemv then ran well below memory bandwidth); on a later one (a 480 MiB L3 that nearly holds the
    model) the same form was 2.2x slower than ``F.linear`` at one row and slower at every count.
    Without a choice, and on GPU or in other dtypes, this is ``F.linear``.
    """
    if not weight_first or x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    point = _row_point(x.numel() // x.shape[-1] if x.shape[-1] else 0)
    if point is None or not weight_first[point]:
        return F.linear(x, weight, bias)
    return _weight_first_product(x, weight, bias)


@torch.inference_mode()
def calibrate_linear(weights: list, reps: int = 2, margin: float = 0.95) -> dict:
    """Choose, for each of :data:`CALIBRATED_ROWS`, the faster of ``F.linear`` and ``weight @ x.T`` for a
    CPU float32 model with these ``weights`` (in forward order): each form is timed over one pass through
    all of them, as a decode step reads them (mostly from memory, not cache), interleaved, best of
    ``reps``; ``weight @ x.T`` is kept only where it is faster by ``margin``. Measured once per process for
    a given set of shapes and thread count. Returns {rows: weight @ x.T chosen} (empty: no CPU float32
    weights), for the model's :meth:`~sift.models.llama.LlamaForCausalLM.set_linear_products`."""
    weights = [w for w in weights if w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2]
    key = (tuple(tuple(w.shape) for w in weights), torch.get_num_threads())
    if not weights:
        return {}
    if key in _measured:
        return dict(_measured[key])
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
    _measured[key] = chosen
    return dict(chosen)


class Linear(nn.Linear):
    """nn.Linear computed through :func:`linear`, in the product form its model was given at load."""

    weight_first: Optional[dict] = None  # set by LlamaForCausalLM.set_linear_products

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.weight_first)


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


def rope_inv_freq(head_dim: int, theta: float, scaling: dict, freq_factors: Optional[tuple],
                  max_positions: Optional[int] = None) -> Tensor:
    """Inverse frequencies [head_dim/2] (``head_dim``: the rotated width), in float32 as HF computes them
    (so the caches agree bit for bit). ``dynamic`` scaling depends on the position and is applied in
    :func:`rope_cos_sin`; here it is the unscaled base. ``max_positions``: the context the model is built
    for, which picks LongRoPE's long or short factors."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / theta ** exponents
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
    elif rope_type == "yarn":
        inv_freq = _yarn_inv_freq(head_dim, theta, scaling)
    elif rope_type == "longrope":
        # HF switches to the long factors inside a forward whose positions pass the original context; with a
        # KV cache that would leave earlier keys rotated by the short ones. The choice here is made once, by
        # the context the model is built for (as llama.cpp does): long factors when it exceeds the original.
        long = max_positions is not None and max_positions > scaling["original_max_position_embeddings"]
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device="cpu")
        inv_freq = 1.0 / (ext * theta ** exponents)
    if freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float32, device="cpu")
    return inv_freq


def _yarn_inv_freq(dim: int, base: float, scaling: dict) -> Tensor:
    """YaRN (NTK-by-parts): frequencies that turn fewer than ``beta_slow`` times over the original context
    are interpolated by ``factor``, those turning more than ``beta_fast`` times are kept, a linear ramp between."""
    factor = scaling["factor"]
    old_len = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    keep = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_attention_factor(scaling: dict, max_positions: int) -> float:
    """The factor YaRN and LongRoPE multiply cos and sin by (1 for the other types), as HF derives it."""
    rope_type = scaling.get("rope_type", "default")
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if rope_type == "yarn":
        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
        return float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    if rope_type == "longrope":
        old_len = scaling["original_max_position_embeddings"]
        factor = scaling.get("factor") or max_positions / old_len
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    return 1.0


def rope_cos_sin(rotary_dim: int, max_positions: int, theta: float, scaling: dict,
                 freq_factors: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
    """cos and sin [max_positions, rotary_dim/2] of every position's angles, float32, on the CPU.

    ``dynamic`` (dynamic NTK): HF recomputes the base from the longest position of each forward; a token
    decoded alone at position p is rotated with the base of length p + 1, and so is every token here (a
    key keeps the rotation it was written with, so prefill chunking cannot change it)."""
    t = torch.arange(max_positions, dtype=torch.int64, device="cpu").float()
    inv_freq = rope_inv_freq(rotary_dim, theta, scaling, freq_factors, max_positions)
    freqs = torch.outer(t, inv_freq)
    if scaling.get("rope_type") == "dynamic":
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        seq_len = torch.arange(old_len, max_positions, dtype=torch.int64, device="cpu") + 1
        base = theta * ((factor * seq_len / old_len) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
        freqs[old_len:] = t[old_len:, None] * (1.0 / base[:, None] ** exponents[None, :])
    factor = rope_attention_factor(scaling, max_positions)
    return freqs.cos() * factor, freqs.sin() * factor


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the neox / HF "rotate half" layout, over the first ``rotary_dim`` of
    each head's ``head_dim`` dimensions (all of them unless a partial rotary factor says otherwise).

    cos and sin of every position are precomputed once into ``cos_sin_cache`` [max_positions, 2, rotary_dim],
    full width with the sign of "rotate half" folded into sin (see :func:`apply_rotary`); a forward indexes
    it by the batch's positions once and every layer reuses the result.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict,
                 freq_factors: Optional[tuple] = None, rotary_dim: Optional[int] = None):
        super().__init__()
        self.rotary_dim = rotary_dim or head_dim
        # explicit device inside: built for real even when the model is constructed under a meta device
        cos, sin = rope_cos_sin(self.rotary_dim, max_positions, theta, scaling, freq_factors)
        self.register_buffer("cos_sin_cache", torch.stack([torch.cat([cos, cos], dim=-1),
                                                           torch.cat([-sin, sin], dim=-1)], dim=1),
                             persistent=False)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, signed sin [T, 1, rotary_dim] for ``positions`` [T], ready to broadcast over heads."""
        cos, sin = self.cos_sin_cache[positions].to(dtype).unsqueeze(2).unbind(1)
        return cos, sin


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [T, H, D] by the position angles, halves paired (HF's ``x * cos + rotate_half(x) * sin``):
    rotating the halves is a roll by D/2 once sin's first half carries rotate_half's minus sign. Four ops
    where splitting into halves took nine; the same float operations, so the same bits. When cos is
    narrower than D (partial rotary), only the first cos.shape[-1] dimensions turn."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :rd], cos, sin), x[..., rd:]], dim=-1)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# HF hidden_act names -> the gate activation of a gated MLP
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu_pytorch_tanh": gelu_tanh, "gelu_tanh": gelu_tanh}


class GatedMLP(nn.Module):
    """Gated MLP (SiLU by default; GeGLU with ``act="gelu_pytorch_tanh"``), gate and up projections fused
    into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        self.gate_up_proj = empty_linear(hidden_size, 2 * intermediate_size)
        self.down_proj = empty_linear(intermediate_size, hidden_size)
        self.act = ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)

    def heavy_neurons(self, m: int) -> tuple[Tensor, Tensor]:
        """The m intermediate neurons with the largest weight bound ||g_j|| ||u_j|| ||d_j||
        (|act(g.x) u.x| <= ||g|| ||u|| ||x||^2 for SiLU): their fused gate/up rows [2m, in] and down
        columns [out, m]."""
        gate, up = self.gate_up_proj.weight.chunk(2, dim=0)
        down = self.down_proj.weight
        bound = gate.float().norm(dim=1) * up.float().norm(dim=1) * down.float().norm(dim=0)
        idx = bound.topk(min(m, bound.numel())).indices.sort().values
        return torch.cat([gate[idx], up[idx]]).contiguous(), down[:, idx].contiguous()

    def relative_update(self, x: Tensor, h: Tensor, rank: int) -> Tensor:
        """Low-rank Transformation Probing (token skipping): ||MLP(x)|| / ||h|| per row of x (the normed
        input) and h (the residual), predicted by the MLP restricted to its ``rank`` heaviest neurons
        (:meth:`heavy_neurons`, picked on first use and kept). Not a truncated SVD: at the same cost
        (r = 128 neurons vs an SVD of rank 32) the SVD proxy ranked tokens' MLP updates little better than
        chance on SmolLM2 (Spearman 0.23-0.52 vs 0.40-0.61 for the neurons, layers 8-26 of a pydoc prompt)
        and MLP-only skipping with it cost nearly what random choices do (forced perplexity 44.2 vs 26.8
        with the neurons, 23.0 with the true update, 49.5 random; dense 16.3), and the SVD proxy
        reconstructs the full intermediate width for its activation, as much work as the MLP's own."""
        proxies = self.__dict__.setdefault("_proxies", {})
        if rank not in proxies:
            proxies[rank] = self.heavy_neurons(rank)
        gate_up, down = proxies[rank]
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        update = F.linear(self.act(gate) * up, down)
        return update.float().norm(dim=-1) / h.float().norm(dim=-1).clamp(min=1e-6)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scales by ``1 + weight`` and multiplies in float32 before casting back (HF's order)."""

    def forward(self, x: Tensor) -> Tensor:
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1.0 + self.weight.float())).to(x.dtype)
