"""GGUF blocks repacked for the kernels (models/gguf_quant.py) dequantize to exactly what
``gguf.quants.dequantize`` gives: the embedded model's tensors and tensors written with the gguf package."""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from sift.models.gguf_quant import repack
from sift.models.loader import _nbytes, read_gguf
from sift.models.quant import Int4Linear, Int8BlockLinear, quantized_linear

CPU = torch.device("cpu")


def _reference(raw: np.ndarray, qtype: T, shape: tuple) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw.reshape(shape[0], -1), qtype)).reshape(shape)


@pytest.fixture(scope="module")
def embedded(gguf_path):
    gf = read_gguf(gguf_path)
    return {name: (np.frombuffer(gf.buffer, np.uint8, _nbytes(info), info.offset), T(info.ggml_type), info.shape)
            for name, info in gf.tensors.items() if len(info.shape) == 2}


def test_every_embedded_tensor_repacks(embedded):
    """Every Q4_1 zero m + 8d is a float32 (repack checks it and would return None), so all stay quantized."""
    assert {qtype for _, qtype, _ in embedded.values()} == {T.Q4_1, T.Q8_0}
    assert all(repack(raw, qtype, shape, name) is not None for name, (raw, qtype, shape) in embedded.items())


@pytest.mark.parametrize("layer", [0, 29])
def test_embedded_tensors_repack_exactly(embedded, layer):
    names = [n for n in embedded if n.startswith(f"blk.{layer}.")] + (["token_embd.weight"] if layer == 0 else [])
    for name in names:
        raw, qtype, shape = embedded[name]
        assert torch.equal(repack(raw, qtype, shape, name).dequantize(), _reference(raw, qtype, shape)), name


@pytest.mark.parametrize("name", ["blk.0.attn_k.weight", "blk.3.attn_output.weight", "token_embd.weight"])
def test_the_kernels_dequantize_embedded_tensors_exactly(embedded, name):
    """Read back through the packed kernels themselves (a product with the identity)."""
    raw, qtype, shape = embedded[name]
    q = repack(raw, qtype, shape, name)
    if name == "token_embd.weight":  # 49152 rows: read back the first 256
        q.codes, q.scale = q.codes[:256], q.scale[:256]
    layer = quantized_linear(q, torch.float32, CPU)
    assert isinstance(layer, Int8BlockLinear if qtype == T.Q8_0 else Int4Linear)
    assert torch.equal(layer.weight, _reference(raw, qtype, shape)[:q.shape[0]])


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_tensors_written_with_gguf_repack_exactly(qtype):
    g = np.random.default_rng(int(qtype))
    w = (g.standard_normal((192, 576)) * 0.05 + g.standard_normal((192, 1)) * 0.02).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block: scale 0
    raw = quantize(w, qtype)
    q = repack(raw.reshape(-1), qtype, w.shape)
    ref = _reference(raw, qtype, w.shape)
    assert torch.equal(q.dequantize(), ref)
    assert torch.equal(quantized_linear(q, torch.float32, CPU).weight, ref)


def _random_blocks(qtype: T, n_blocks: int, f16_fields: tuple, seed: int) -> np.ndarray:
    """Random valid blocks: random bytes, with the float16 fields at ``f16_fields`` set to small scales."""
    g = np.random.default_rng(seed)
    blocks = g.integers(0, 256, (n_blocks, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    for at in f16_fields:
        blocks[:, at:at + 2] = (g.random(n_blocks) * 1e-3 + 1e-5).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks


def test_q4_k_repacks_exactly():
    shape = (64, 512)
    raw = _random_blocks(T.Q4_K, 64 * 2, (0, 2), seed=1).reshape(-1)
    q = repack(raw, T.Q4_K, shape)
    assert q.bits == 4 and q.group_size == 32
    assert torch.equal(q.dequantize(), _reference(raw, T.Q4_K, shape))


@pytest.mark.parametrize("qtype,f16_fields", [(T.Q5_K, (0, 2)), (T.Q6_K, (208,))])
def test_other_k_quants_requantize_within_half_an_int8_step(qtype, f16_fields):
    shape = (64, 512)
    raw = _random_blocks(qtype, 64 * 2, f16_fields, seed=2).reshape(-1)
    q = repack(raw, qtype, shape)
    ref = _reference(raw, qtype, shape)
    assert q.bits == 8 and q.group_size == 32
    step = q.scale.repeat_interleave(32, dim=1)
    assert bool(((q.dequantize() - ref).abs() <= step * (0.5 + 1e-5)).all())


def test_float_and_unsupported_types_stay_floating_point():
    w = np.random.default_rng(3).standard_normal((32, 64)).astype(np.float32)
    assert repack(w.view(np.uint8).reshape(-1), T.F32, w.shape) is None
    raw = _random_blocks(T.Q5_0, 32 * 2, (0,), seed=4).reshape(-1)
    assert repack(raw, T.Q5_0, (32, 64)) is None
