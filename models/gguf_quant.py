"""GGUF quantized blocks -> :class:`sift.models.quant.GroupQuant`, without dequantizing when the kernels can take
the block's own numbers.

Per ggml type (w: what ``gguf.quants.dequantize`` computes in float32; d, m, dmin float16):

- Q4_0 ``d (q - 8)``: int4 group 32, scale d, zero 0. Exact.
- Q4_1 ``d q + m``: int4 group 32, scale d, zero ``m + 8 d``. The kernels compute ``fma(q - 8, d, zero)``,
  one rounding of ``d q + m`` as numpy's ``d * q + m`` (its product is exact), so exact whenever
  ``m + 8 d`` is a float32, which is checked per tensor.
- Q8_0 ``d q``: int8 codes with a scale per 32 (run as two exact int4 planes, models/quant.py). Exact.
- Q4_K ``(d sc) q - dmin m`` per 32-element sub-block (6-bit sc, m): int4 group 32, scale ``d sc``, zero
  ``8 d sc - dmin m``. Exact when that zero is a float32 (checked); otherwise requantized as below.
- Q5_K, Q6_K (and a Q4_K whose zeros would round): requantized from the dequantized values to int8 with a
  symmetric scale per 32, a step at most a quarter of the type's own (5 and 6 bits per sub-block); not exact.
- F32, F16, BF16 stay floating point; every other type is dequantized (logged).
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import Q4_K, dequantize

from sift.models.quant import GroupQuant, is_quantizable, quantize_int8_blocks, quantize_tensor

logger = logging.getLogger(__name__)

EXACT_TYPES = (T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K)
REQUANTIZED_TYPES = (T.Q5_K, T.Q6_K)
FLOAT_TYPES = (T.F32, T.F16, T.BF16)


def _f16(raw: np.ndarray) -> torch.Tensor:
    """float16 fields [B, 2] bytes -> float32 [B] (exact)."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).astype(np.float32).reshape(-1))


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[B, 16] bytes -> [B, 32] codes, ggml's order: the 16 low nibbles, then the 16 high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _zero_is_exact(zero: torch.Tensor, exact: torch.Tensor) -> bool:
    return bool(torch.equal(zero.double(), exact))


def q4_0(blocks: np.ndarray, n: int, k: int) -> GroupQuant:
    d = _f16(blocks[:, :2])
    codes = torch.from_numpy(_nibbles(blocks[:, 2:])).reshape(n, k)
    scale = d.reshape(n, k // 32)
    return GroupQuant(codes, scale, torch.zeros_like(scale), 32, 4)


def q4_1(blocks: np.ndarray, n: int, k: int) -> Optional[GroupQuant]:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    zero = m + 8 * d
    if not _zero_is_exact(zero, m.double() + 8 * d.double()):
        return None
    codes = torch.from_numpy(_nibbles(blocks[:, 4:])).reshape(n, k)
    return GroupQuant(codes, d.reshape(n, k // 32), zero.reshape(n, k // 32), 32, 4)


def q8_0(blocks: np.ndarray, n: int, k: int) -> GroupQuant:
    d = _f16(blocks[:, :2])
    codes = torch.from_numpy(np.ascontiguousarray(blocks[:, 2:]).view(np.int8)).reshape(n, k)
    return GroupQuant(codes, d.reshape(n, k // 32), None, 32, 8)


def q4_k(blocks: np.ndarray, n: int, k: int) -> Optional[GroupQuant]:
    """Super-blocks of 256: d, dmin, 12 bytes of 6-bit (sc, m) for 8 sub-blocks of 32, 128 bytes of codes
    (each 32-byte chunk: sub-block 2j in its low nibbles, 2j + 1 in its high ones)."""
    b = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2])[:, None], _f16(blocks[:, 2:4])[:, None]
    sc, mn = (torch.from_numpy(a.astype(np.float32)) for a in Q4_K.get_scale_min(blocks[:, 4:16]))
    scale, low = d * sc, dmin * mn  # exact: float16 times a 6-bit integer
    zero = 8 * scale - low
    if not _zero_is_exact(zero, 8 * scale.double() - low.double()):
        return None
    qs = blocks[:, 16:].reshape(b, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = torch.from_numpy((qs & 0x0F).reshape(n, k))
    return GroupQuant(codes, scale.reshape(n, k // 32), zero.reshape(n, k // 32), 32, 4)


_REPACK = {T.Q4_0: q4_0, T.Q4_1: q4_1, T.Q8_0: q8_0, T.Q4_K: q4_k}


def repack(raw: np.ndarray, qtype: T, shape: tuple, name: str = "") -> Optional[GroupQuant]:
    """A 2-D tensor's raw bytes (``raw`` uint8, as stored) as a GroupQuant, or None: keep it in floating point
    (a float type, or a type no kernel takes, dequantized: logged)."""
    if qtype in FLOAT_TYPES or len(shape) != 2:
        return None
    n, k = shape
    if qtype in _REPACK and k % 32 == 0:
        from gguf import GGML_QUANT_SIZES

        blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
        q = _REPACK[qtype](blocks, n, k)
        if q is not None:
            return q
        logger.info("%s: %s zeros would round in float32; requantized to int8 blocks", name, qtype.name)
    elif qtype not in REQUANTIZED_TYPES or k % 32:
        logger.info("%s: no kernel for ggml type %s; dequantized", name, qtype.name)
        return None
    values = torch.from_numpy(dequantize(raw.reshape(n, -1), qtype)).reshape(n, k)
    return quantize_int8_blocks(values)


def gguf_quantized(raw: np.ndarray, qtype: T, shape: tuple, name: str, hf_name: str, method: str,
                   group_size: int, dequantized) -> Optional[GroupQuant]:
    """What ``--quantization`` makes of one GGUF tensor: ``auto`` keeps its blocks (:func:`repack`), ``int8``/
    ``int4`` requantize its dequantized values (``dequantized()``) like an HF weight's, ``none`` (and any
    1-D tensor) None: dequantized to floating point."""
    if method == "none" or len(shape) != 2:
        return None
    if method == "auto":
        return repack(raw, qtype, shape, name)
    if not is_quantizable(hf_name, shape):
        return None
    return quantize_tensor(dequantized(), method, group_size)
