"""Weight-only quantized linear layers and embeddings, on torch's packed kernels.

One storage form, :class:`GroupQuant`, carries every quantized weight between the loader and the model:
integer ``codes`` [N, K] with a ``scale`` (and optionally a ``zero``) per group of ``group_size`` inputs, so
that ``w = (codes - offset) * scale + zero`` (``offset`` 8 for unsigned 4-bit codes, 0 for int8). It is what
an HF tensor quantizes to (:func:`quantize_int8`, :func:`quantize_int4`) and what a GGUF block type repacks
to (models/gguf_quant.py), and it concatenates along N (the fused q/k/v and gate/up rows).

At the model it becomes one of the :class:`QuantizedLinear` family (:func:`quantized_linear`):

- :class:`Int4Linear`: 4-bit codes, asymmetric, group 32/64/128/256. CPU ``_weight_int4pack_mm_for_cpu``
  (float32, bfloat16 or float16 activations), CUDA ``_weight_int4pack_mm`` (bfloat16 only; the tinygemm
  kernel). Both dequantize ``fma(q - 8, scale, zero)``: exact for GGUF Q4_0/Q4_1 blocks (see gguf_quant).
- :class:`Int8Linear`: int8 codes, one symmetric scale per output row, ``_weight_int8pack_mm`` (CPU; CUDA
  in torch >= 2.9, else a dequantize-then-matmul fallback).
- :class:`Int8BlockLinear`: int8 codes with a scale per 32 inputs (GGUF Q8_0), which no torch kernel takes:
  the codes are split exactly into two 4-bit planes, ``q + 128 = 16 a + b``, run as two int4 products
  (``a`` with scale 16d, zero 0; ``b`` with scale d, zero 8d) and summed. No value is re-rounded.

Each class keeps :attr:`QuantizedLinear.weight` as a dequantizing property for one-off readers (token
skipping's neuron picks); the forward never dequantizes.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
logger = logging.getLogger(__name__)

INT4_GROUP_SIZES = (32, 64, 128, 256)
METHODS = ("auto", "none", "int8", "int4")


# ---------------------------------------------------------------- storage form

@dataclass
class GroupQuant:
    """``w[n, k] = (codes[n, k] - offset) * scale[n, k // group_size] + zero[n, k // group_size]``.

    codes: uint8 0..15 (``bits`` 4, offset 8) or int8 (``bits`` 8, offset 0); scale, zero: float32 [N, G]
    (zero None: 0). ``group_size == K`` is one scale per row. Tensor-like for ``torch.cat`` along rows, so a
    model's ``load_weights`` fuses q/k/v or gate/up without knowing the weights are quantized.
    """
    codes: Tensor
    scale: Tensor
    zero: Optional[Tensor]
    group_size: int
    bits: int

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def offset(self) -> int:
        return 8 if self.bits == 4 else 0

    def map_rows(self, fn) -> "GroupQuant":
        """The same weight with its rows rearranged by ``fn`` (applied to codes, scale and zero alike)."""
        return GroupQuant(fn(self.codes), fn(self.scale), None if self.zero is None else fn(self.zero),
                          self.group_size, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The plain-torch reference: the kernels' own formula, ``fma(codes - offset, scale, zero)``."""
        scale = self.scale.float().repeat_interleave(self.group_size, dim=1)
        codes = self.codes.float() - self.offset
        if self.zero is None:
            return (codes * scale).to(dtype)
        return torch.addcmul(self.zero.float().repeat_interleave(self.group_size, dim=1), codes, scale).to(dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        parts = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if func is not torch.cat or dim != 0:
            return NotImplemented
        first = parts[0]
        if any(not isinstance(p, GroupQuant) or (p.group_size, p.bits, p.zero is None)
               != (first.group_size, first.bits, first.zero is None) for p in parts):
            return _fuse_mixed(parts)
        return GroupQuant(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                          None if first.zero is None else torch.cat([p.zero for p in parts]),
                          first.group_size, first.bits)


def _fuse_mixed(parts: list) -> GroupQuant:
    """Rows of different formats fused into one product (a GGUF Q4_K_M stores attn_v as Q6_K beside Q4_K
    q and k): requantized together to int8 blocks of 32 (a step under a quarter of any 4-6 bit type's)."""
    values = torch.cat([p.dequantize() if isinstance(p, GroupQuant) else p.float() for p in parts])
    logger.info("fusing %s weights: requantized to int8 blocks of 32",
                "/".join(f"int{p.bits}-g{p.group_size}" if isinstance(p, GroupQuant) else str(p.dtype)
                         for p in parts))
    return quantize_int8_blocks(values, 32)


def quantize_int8_blocks(w: Tensor, group_size: int = 32) -> GroupQuant:
    """Symmetric int8 with one scale per ``group_size`` inputs (for GGUF types no kernel takes as stored)."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    scale = (groups.abs().amax(dim=2) / 127).clamp(min=1e-12)
    codes = (groups / scale[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(n, k)
    return GroupQuant(codes, scale, None, group_size, 8)


def quantize_int8(w: Tensor) -> GroupQuant:
    """Symmetric int8, one scale per output row: ``scale = max|w| / 127``."""
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    codes = (w / scale).round().clamp(-127, 127).to(torch.int8)
    return GroupQuant(codes, scale, None, w.shape[1], 8)


def quantize_int4(w: Tensor, group_size: int) -> GroupQuant:
    """Asymmetric 4-bit per group of ``group_size`` inputs: codes ``round((w - min) / scale)`` with
    ``scale = (max - min) / 15``, stored with the kernels' zero ``min + 8 scale``."""
    w = w.float()
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    return GroupQuant(codes.reshape(n, k), scale, lo + 8 * scale, group_size, 4)


def int4_group_size(requested: int, in_features: int) -> int:
    """The largest supported group size <= ``requested`` that divides ``in_features`` (576 is not a multiple
    of 128, so SmolLM2's hidden-width inputs run group 64 when 128 is asked for)."""
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if g <= requested and in_features % g == 0:
            return g
    raise ValueError(f"no int4 group size <= {requested} divides {in_features} inputs")


# ---------------------------------------------------------------- kernels

def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def int4_supported(n: int, k: int, group_size: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the packed int4 kernel takes this shape (CPU: N % 16; CUDA: N % 8, K % 32, bfloat16)."""
    if group_size not in INT4_GROUP_SIZES or k % group_size:
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and n % 8 == 0 and k % 32 == 0
    return device.type == "cpu" and n % 16 == 0


def pack_int4(codes: Tensor, device: torch.device) -> Tensor:
    """Codes uint8 [N, K] (0..15) in the device kernel's packed layout."""
    if device.type == "cuda":  # the tinygemm layout, from [N, K/2] bytes with the even column high
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(device)
        return torch.ops.aten._convert_weight_to_int4pack(pairs, _inner_k_tiles(codes.shape[1]))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def int4_mm(x: Tensor, packed: Tensor, group_size: int, scales_and_zeros: Tensor) -> Tensor:
    """x [M, K] @ dequantized(packed).T -> [M, N], in x's dtype."""
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


@functools.lru_cache(maxsize=None)
def _int8_kernel_runs(device_type: str, dtype: torch.dtype) -> bool:
    try:
        torch.ops.aten._weight_int8pack_mm(torch.ones(1, 32, dtype=dtype, device=device_type),
                                           torch.ones(16, 32, dtype=torch.int8, device=device_type),
                                           torch.ones(16, dtype=dtype, device=device_type))
        return True
    except (NotImplementedError, RuntimeError):
        logger.info("no _weight_int8pack_mm for %s %s: int8 weights are dequantized per product", device_type,
                    dtype)
        return False


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------- layers

class QuantizedLinear(nn.Module):
    """A linear layer over quantized weights; ``weight`` dequantizes (for one-off readers only)."""

    def __init__(self, in_features: int, out_features: int, bias: Optional[Tensor]):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def _finish(self, out: Tensor, x: Tensor) -> Tensor:
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> Tensor:
        """[N, K] float: the kernel's own dequantization, read back through a product with the identity
        (each output is one weight times 1 plus zeros, so no value is rounded)."""
        eye = torch.eye(self.in_features, dtype=self.dtype, device=self.device)
        bias, self.bias = self.bias, None
        try:
            return self(eye).t().contiguous()
        finally:
            self.bias = bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int4Linear(QuantizedLinear):
    def __init__(self, q: GroupQuant, dtype: torch.dtype, device: torch.device, bias: Optional[Tensor] = None):
        super().__init__(q.shape[1], q.shape[0], bias)
        assert q.bits == 4 and q.zero is not None
        self.group_size, self.dtype, self.device = q.group_size, dtype, device
        self.register_buffer("packed", pack_int4(q.codes, device))
        # [K / group, N, 2]: scale then zero, in the activation dtype as the kernels require
        self.register_buffer("scales_and_zeros",
                             torch.stack([q.scale.t(), q.zero.t()], dim=-1).to(device=device, dtype=dtype).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        return self._finish(int4_mm(_rows(x), self.packed, self.group_size, self.scales_and_zeros), x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", int4 group {self.group_size}"


class Int8Linear(QuantizedLinear):
    def __init__(self, q: GroupQuant, dtype: torch.dtype, device: torch.device, bias: Optional[Tensor] = None):
        super().__init__(q.shape[1], q.shape[0], bias)
        assert q.bits == 8 and q.group_size == q.shape[1] and q.zero is None
        self.dtype, self.device = dtype, device
        self.register_buffer("codes", q.codes.to(device))
        self.register_buffer("scales", q.scale.reshape(-1).to(device=device, dtype=dtype))
        self.fused = _int8_kernel_runs(device.type, dtype)

    def forward(self, x: Tensor) -> Tensor:
        rows = _rows(x)
        if self.fused:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.codes, self.scales)
        else:
            out = F.linear(rows, self.codes.to(rows.dtype)) * self.scales
        return self._finish(out, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8 per channel"


def split_int8_blocks(q: GroupQuant) -> tuple[GroupQuant, GroupQuant]:
    """int8 codes with a scale d per group as two exact 4-bit planes: ``q + 128 = 16 a + b`` (a, b in 0..15),
    ``d q = (a - 8) 16d + [(b - 8) d + 8d]``. Every plane value is a small integer times a float16-derived
    d, so representable in float32 without rounding, and so is their sum."""
    assert q.bits == 8 and q.zero is None
    u = (q.codes.to(torch.int16) + 128).to(torch.uint8)
    high = GroupQuant(u >> 4, q.scale * 16, torch.zeros_like(q.scale), q.group_size, 4)
    low = GroupQuant(u & 15, q.scale, q.scale * 8, q.group_size, 4)
    return high, low


class Int8BlockLinear(QuantizedLinear):
    """int8 codes with per-group scales (GGUF Q8_0) as two int4 products summed (:func:`split_int8_blocks`)."""

    def __init__(self, q: GroupQuant, dtype: torch.dtype, device: torch.device, bias: Optional[Tensor] = None):
        super().__init__(q.shape[1], q.shape[0], bias)
        self.dtype, self.device = dtype, device
        high, low = split_int8_blocks(q)
        self.high, self.low = Int4Linear(high, dtype, device), Int4Linear(low, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        rows = _rows(x)
        return self._finish(self.high(rows) + self.low(rows), x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", int8 in two int4 planes, group {self.high.group_size}"


def quantized_linear(q: GroupQuant, dtype: torch.dtype, device: torch.device,
                     bias: Optional[Tensor] = None) -> nn.Module:
    """The layer that runs ``q`` on ``device`` with ``dtype`` activations; where no kernel takes the shape or
    dtype, a plain linear over the dequantized weight (logged)."""
    n, k = q.shape
    if q.bits == 8 and q.group_size == k:
        return Int8Linear(q, dtype, device, bias)
    if int4_supported(n, k, q.group_size, device, dtype):
        return Int8BlockLinear(q, dtype, device, bias) if q.bits == 8 else Int4Linear(q, dtype, device, bias)
    logger.info("no packed kernel for a [%d, %d] %d-bit group-%d weight on %s %s: dequantized", n, k, q.bits,
                q.group_size, device.type, str(dtype).removeprefix("torch."))
    from sift.models.layers import Linear

    layer = Linear(k, n, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(q.dequantize(dtype).to(device), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


class QuantizedEmbedding(nn.Module):
    """Token embedding rows dequantized on lookup: the gathered rows only, exactly as :meth:`GroupQuant.dequantize`."""

    def __init__(self, q: GroupQuant, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.group_size, self.bits, self.dtype = q.group_size, q.bits, dtype
        self.register_buffer("codes", q.codes.to(device))
        self.register_buffer("scale", q.scale.float().to(device))
        self.register_buffer("zero", None if q.zero is None else q.zero.float().to(device))

    def quant(self, ids: Optional[Tensor] = None) -> GroupQuant:
        pick = (lambda t: t) if ids is None else (lambda t: t[ids])
        return GroupQuant(pick(self.codes), pick(self.scale), None if self.zero is None else pick(self.zero),
                          self.group_size, self.bits)

    def forward(self, input_ids: Tensor) -> Tensor:
        flat = input_ids.reshape(-1)
        return self.quant(flat).dequantize(self.dtype).view(*input_ids.shape, self.embedding_dim)

    @property
    def weight(self) -> Tensor:
        """The whole table dequantized (for one-off readers: LANTERN's neighbour table)."""
        return self.quant().dequantize(self.dtype)


# ---------------------------------------------------------------- loading

def quantize_tensor(w: Tensor, method: str, group_size: int) -> GroupQuant:
    """An HF (or dequantized) [N, K] weight quantized at load: ``method`` int8 or int4."""
    if method == "int8":
        return quantize_int8(w)
    return quantize_int4(w, int4_group_size(group_size, w.shape[1]))


def is_quantizable(name: str, shape: tuple) -> bool:
    """Weights that ``--quantization int8/int4`` quantizes: 2-D linear weights, not embeddings or norms."""
    return len(shape) == 2 and name.endswith("weight") and "embed" not in name and "norm" not in name


def install_quantized(model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Swap every module that ``load_weights`` handed a :class:`GroupQuant` (``module.quantized``) for its
    quantized form; a tied LM head over a quantized embedding gets its own quantized product. Returns the
    number of modules swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            q = child.__dict__.pop("quantized", None)
            if q is None:
                continue
            if isinstance(child, nn.Embedding):
                new = QuantizedEmbedding(q, dtype, device)
            elif isinstance(child, nn.Linear):
                new = quantized_linear(q, dtype, device, None if child.bias is None else child.bias.data)
            else:
                raise TypeError(f"no quantized form of {type(child).__name__}")
            setattr(parent, name, new)
            swapped += 1
    if getattr(model, "lm_head", False) is None and isinstance(getattr(model, "embed_tokens", None),
                                                                QuantizedEmbedding):
        model.lm_head = quantized_linear(model.embed_tokens.quant(), dtype, device)
    return swapped


def hold_quantized(module: nn.Module, name: str, q: GroupQuant) -> None:
    """What a model's ``load_weights`` does with a quantized tensor: keep it on the module for
    :func:`install_quantized`, with an empty placeholder parameter on the weights' device (so code that
    reads the parameter's device, as the rotary cache's placement does, still finds it)."""
    module.quantized = q
    setattr(module, name, nn.Parameter(torch.empty(0, device=q.codes.device), requires_grad=False))


def quantize_linears(model: nn.Module, method: str, group_size: int, dtype: torch.dtype,
                     device: torch.device) -> int:
    """Quantize a loaded model's float linear layers in place (for random-weight ``dummy`` loads)."""
    from sift.models.layers import Linear

    for module in model.modules():
        if isinstance(module, Linear) and module.weight.device.type != "meta":
            module.quantized = quantize_tensor(module.weight.data, method, group_size)
    return install_quantized(model, dtype, device)
